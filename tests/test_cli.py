"""Bad input through the real entry point: one line on stderr, exit status 2, nothing overwritten."""

import json
from pathlib import Path

import pytest

from fedpt.cli import main


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: ")
    return err[0]


def _run(*args) -> int:
    preset = [] if "--preset" in args or "--config" in args else ["--preset", "tiny"]
    return main(["run", "--no-progress", *preset, *args])


@pytest.mark.parametrize("args, message", [
    (["--set", "train.lrr=1"], "unknown key 'train.lrr'"),
    (["--set", "train.steps=-1"], "train.steps must be > 0"),
    (["--system", "fedsgd"], "unknown system 'fedsgd'"),
    (["--preset", "nope"], "unknown preset 'nope'"),
    (["--set", "data.source=/does/not/exist.jsonl"], "does not exist"),
])
def test_bad_config_is_one_line(tmp_path, capsys, args, message):
    assert _run(*args, "--out", str(tmp_path / "run")) == 2
    assert message in _error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_missing_config_file(tmp_path, capsys):
    assert _run("--config", str(tmp_path / "none.toml"), "--out", str(tmp_path / "run")) == 2
    assert "does not exist" in _error_line(capsys)


def test_broken_dataset_line_names_file_and_line(tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    rows = [json.dumps({"instruction": f"q{i}", "response": f"a{i}"}) for i in range(60)]
    rows[41] = '{"instruction": "broken", '
    data.write_text("\n".join(rows) + "\n")
    assert _run("--set", f"data.source='{data}'", "--out", str(tmp_path / "run")) == 2
    assert f"{data}:42: not valid JSON" in _error_line(capsys)


def test_empty_partition(tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"q{i}", "response": "a"}) + "\n" for i in range(20)))
    assert _run("--set", f"data.source='{data}'", "--set", "data.eval_size=4", "--set", "data.kd_pool_size=4",
                "--set", "federation.num_clients=16", "--set", "federation.clients_per_round=2",
                "--set", "data.partitioner='iid'", "--out", str(tmp_path / "run")) == 2
    assert "partition is empty" in _error_line(capsys)


def test_tokenizer_mismatch_names_both_models(tmp_path, capsys, fedpt_home):
    from fedpt.models.tiny import TINY_SHAPES, build_model, build_tokenizer

    other = tmp_path / "other-vocab"
    tokenizer = build_tokenizer(vocab_size=700)
    build_model(TINY_SHAPES["tiny-small"], tokenizer, seed=0, pretrain_steps=0).save_pretrained(other)
    tokenizer.save_pretrained(other)
    assert _run("--set", f"model.large='{other}'", "--out", str(tmp_path / "run")) == 2
    line = _error_line(capsys)
    assert "tiny-small" in line and str(other) in line and "differ" in line
    assert not (tmp_path / "run").exists()


def test_existing_run_is_never_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "rounds.jsonl").write_text("precious\n")
    assert _run("--out", str(out)) == 2
    assert "--overwrite" in _error_line(capsys)
    assert (out / "rounds.jsonl").read_text() == "precious\n"


def test_overwrite_never_deletes_a_directory_that_is_not_a_run(tmp_path, capsys):
    out = tmp_path / "home"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    assert _run("--out", str(out), "--overwrite") == 2
    assert "--overwrite will not delete it" in _error_line(capsys)
    assert (out / "thesis.tex").read_text() == "years of work"


def test_generate_needs_a_run_directory(tmp_path, capsys):
    assert main(["generate", "--run", str(tmp_path), "hello"]) == 2
    assert "not a fedpt run directory" in _error_line(capsys)


def test_models_too_big_for_memory_are_refused_before_loading(tmp_path, capsys, monkeypatch):
    import collections

    import psutil

    memory = collections.namedtuple("svmem", "total available")
    monkeypatch.setattr(psutil, "virtual_memory", lambda: memory(2**30, 2**20))  # 1 MiB free
    assert _run("--out", str(tmp_path / "run")) == 2
    line = _error_line(capsys)
    assert "the model weights alone need" in line and "0.0 GiB is available" in line
    assert not (tmp_path / "run").exists()


def test_resume_of_a_directory_that_is_not_a_run(tmp_path, capsys):
    assert main(["run", "--resume", str(tmp_path)]) == 2
    assert "is not a fedpt run directory (no config.toml)" in _error_line(capsys)


def test_resume_with_a_corrupt_checkpoint_is_refused_and_nothing_changes(tmp_path, capsys):
    import torch

    from fedpt.checkpoint import save_checkpoint
    from fedpt.config import load_config

    run = tmp_path / "run"
    run.mkdir()
    cfg = load_config(preset="tiny")
    cfg.save(run / "config.toml")
    folder = run / "fedpt" / "checkpoints"
    save_checkpoint(folder, 1, {"w": torch.ones(4)}, cfg.to_dict())
    (folder / "round-0001" / "adapter.safetensors").write_bytes(b"truncated")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert main(["run", "--no-progress", "--resume", str(run)]) == 2
    assert "is corrupt or incomplete" in _error_line(capsys)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_a_misspelt_fault_injection_variable_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FEDPT_KILL_AT", "distilation@2")
    assert _run("--out", str(tmp_path / "run")) == 2
    assert "FEDPT_KILL_AT='distilation@2': expected <point>@<round>" in _error_line(capsys)


def _port_check(tmp_path, port: str, path: str | None = None, root=None):
    """The flwr-run-local.sh script up to its port check (it exits 2 there on every case below)."""
    import os
    import subprocess
    from pathlib import Path

    root = root or Path(__file__).resolve().parents[1]
    env = {**os.environ, "FEDPT_SUPERLINK_PORT": port, "FLWR_HOME": str(tmp_path)}
    if path is not None:
        env["PATH"] = path
    return subprocess.run(["/bin/bash", str(root / "scripts" / "flwr-run-local.sh")], capture_output=True, text=True,
                          env=env, timeout=60)


def test_an_occupied_superlink_port_is_one_line(tmp_path):
    import shutil
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = _port_check(tmp_path, str(port))
    assert done.returncode == 2
    assert done.stderr.strip() == (f"error: port {port} is in use (a SuperLink left running?): stop that process "
                                   "or set FEDPT_SUPERLINK_PORT")
    # The same check for other reasons to fail says so instead of blaming a busy port (the check
    # used to report "in use" for any failure of its python one-liner, e.g. no python on PATH).
    done = _port_check(tmp_path, "notaport")
    assert done.returncode == 2 and done.stderr.strip() == "error: FEDPT_SUPERLINK_PORT='notaport' is not a port number"
    no_python = tmp_path / "bin"  # a PATH with the one tool the script needs before its check, no python
    no_python.mkdir()
    (no_python / "dirname").symlink_to(shutil.which("dirname"))
    # A copy of the script in a project without .venv: the script puts the project's .venv/bin on
    # PATH first, so in a checkout with a virtual environment python is always found.
    project = tmp_path / "project"
    (project / "scripts").mkdir(parents=True)
    shutil.copy(Path(__file__).resolve().parents[1] / "scripts" / "flwr-run-local.sh", project / "scripts")
    done = _port_check(tmp_path, str(port), path=str(no_python), root=project)
    assert done.returncode == 2
    assert done.stderr.strip() == "error: no python on PATH: activate fedpt's virtual environment first"


def test_a_data_file_that_is_not_utf8_is_one_line(tmp_path, capsys):
    data = tmp_path / "latin1.jsonl"
    rows = [json.dumps({"instruction": f"q{i}", "response": f"a{i}"}) for i in range(60)]
    rows[6] = '{"instruction": "caf\xe9", "response": "x"}'
    data.write_bytes(("\n".join(rows) + "\n").encode("latin-1"))
    assert _run("--set", f"data.source='{data}'", "--out", str(tmp_path / "run")) == 2
    column = rows[6].index("\xe9") + 1  # one byte per character before it
    assert _error_line(capsys) == (f"error: {data}:7: not UTF-8 text (byte 0xe9 at column {column}); "
                                   "save the file as UTF-8")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("systems, large_backend, views, expected_server, expected_device", [
    # sizes below: small torch 10, large torch 30, small GGUF 4, large GGUF 12
    (["fedpt"], "local", "torch", 10 + 30, 10),
    (["fedpt"], "llamacpp", "llamacpp", 10 + 12 + 4, 10),
    # fedavg-large trains the large LM in torch: with llama.cpp serving it, the server holds both
    (["fedpt", "fedavg-large"], "llamacpp", "llamacpp", 10 + 12 + 4 + 30, 30),
    (["fedpt", "fedavg-large"], "local", "torch", 10 + 30, 30),  # one torch copy carries the adapter
])
def test_the_memory_check_counts_every_copy_the_run_holds(monkeypatch, systems, large_backend, views,
                                                          expected_server, expected_device):
    from fedpt.config import load_config
    from fedpt.models import loading
    from fedpt.runner import weights_needed

    engine = "llamacpp" if large_backend == "llamacpp" else "torch"  # fedavg-large beside llama.cpp needs it
    cfg = load_config(preset="tiny", overrides=[f"run.systems={systems}", f"model.large_backend='{large_backend}'",
                                                f"model.small_proxy_backend='{views}'", f"model.eval_engine='{engine}'"])
    torch_sizes = {cfg.model.small: 10, cfg.model.large: 30}
    gguf_sizes = {cfg.model.small: 4, cfg.model.large: 12}
    monkeypatch.setattr(loading, "weights_bytes", lambda spec, dtype: torch_sizes[spec])
    monkeypatch.setattr(loading, "gguf_bytes", lambda spec: gguf_sizes[spec])
    server, device, _ = weights_needed(cfg)
    assert (server, device) == (expected_server, expected_device)
