"""Shared fixtures: a private FEDPT_HOME with the tiny model pair, built once per test session."""

from __future__ import annotations

import os

import pytest

# Small budgets for end-to-end runs of the tiny preset (seconds, not minutes).
FAST = ["--set", "data.eval_size=8", "--set", "data.kd_pool_size=8", "--set", "eval.max_new_tokens=8",
        "--set", "distill.max_new_tokens=8", "--set", "train.steps=2", "--set", "distill.steps=2"]

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")  # as the CLI sets it: before torch loads MKL
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # as the CLI sets it, whatever test runs first
# The README's command runs two pytest-xdist workers (-n 2): most of a serial run's time is spent
# waiting on child processes, Ray and servers, and two workers overlap that waiting. They share
# 2 cores, so each runs one thread, and so does every process a test starts (it inherits this):
# two processes of 2 threads each on 2 cores run 3-6x slower.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"


@pytest.fixture(scope="session", autouse=True)
def fedpt_home(tmp_path_factory) -> str:
    """Tests never touch the user's cache; the tiny pair is built here once (seeded, ~20 s)."""
    home = os.environ.get("FEDPT_TEST_HOME") or str(tmp_path_factory.mktemp("fedpt-home"))
    os.environ["FEDPT_HOME"] = home
    return home


@pytest.fixture(scope="session")
def tiny_pair(fedpt_home):
    """(tokenizer, small, large) tiny models in fp32, loaded through the real loading code."""
    from fedpt.models.loading import load_model, load_tokenizer

    return load_tokenizer("tiny-small"), load_model("tiny-small", "float32"), load_model("tiny-large", "float32")


@pytest.fixture(scope="session")
def tiny_cfg():
    from fedpt.config import load_config

    return load_config(preset="tiny")


# The 2-round FedPT run of the tiny preset with the local (torch) large LM: the reference that the
# other large-LM backends' runs are compared with (remote, llamacpp). Built once per session.
FEDPT_2_ROUNDS = [*FAST, "--set", "run.systems=['fedpt']", "--set", "federation.rounds=2"]


@pytest.fixture(scope="session")
def local_fedpt_run(fedpt_home, tmp_path_factory):
    from fedpt.cli import main

    out = tmp_path_factory.mktemp("local-run")
    assert main(["run", "--preset", "tiny", "--no-progress", "--overwrite", "--out", str(out), *FEDPT_2_ROUNDS]) == 0
    return out


@pytest.fixture
def one_thread():
    """One torch thread for the test, the count from before restored after. Tiny models gain
    nothing from threads (on a loaded 2-core box they cost 5x: 36 s vs 6 s in test_secagg), and
    tests of thread changes need a known start."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# Resume tests (tests/test_resume.py, tests/test_resume_signals.py): a 3-round FedPT run of the
# tiny preset, stopped somewhere and resumed, must end bit-identical to this one, never stopped.
RESUME_RUN = [*FAST, "--set", "run.systems=['fedpt']", "--set", "federation.rounds=3"]
RESUME_KEYS = ("train_loss", "kd_loss", "kd_kl_before", "kd_kl_after", "rougeL_small", "rougeL_proxy", "bytes_up",
               "clients", "failures")


@pytest.fixture(scope="session")
def uninterrupted(fedpt_home, tmp_path_factory):
    """The reference: the 3-round run, never stopped (built once per worker that needs it)."""
    from fedpt.cli import main

    full = tmp_path_factory.mktemp("full")
    assert main(["run", "--preset", "tiny", "--no-progress", "--overwrite", "--out", str(full), *RESUME_RUN]) == 0
    return full


def assert_same_run(full, resumed_dir) -> None:
    """Bit-identical: every round's metrics and the final adapter."""
    import json

    import torch
    from safetensors.torch import load_file

    rows = [json.loads(line) for line in (full / "rounds.jsonl").read_text().splitlines()]
    resumed = [json.loads(line) for line in (resumed_dir / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in resumed] == [0, 1, 2, 3]
    for a, b in zip(rows, resumed):
        assert {k: a[k] for k in RESUME_KEYS} == {k: b[k] for k in RESUME_KEYS}, a["round"]
    a = load_file(full / "fedpt" / "adapter" / "adapter_model.safetensors")
    b = load_file(resumed_dir / "fedpt" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
