"""``fedpt experiment --systems``: pieces of one experiment in one folder, exported for the repository.

Two pieces (fedavg-large, then fedpt) into one folder against one run of both systems, on the tiny
pair. What holds: every fedavg-large number, prediction and adapter is bit-identical, and so is
FedPT's device training; FedPT's server side (distillation, proxy evaluation) agrees to float32
rounding only. The reason is not the pieces: when fedavg-large shares a run, the server loads the
large LM wrapped with its LoRA adapter (peft), and the frozen large LM's logits read through that
wrapper (adapter disabled) differ from the plain model's by ~3e-6 in float32, which moves FedPT's
KD loss in the 8th digit and its adapter by ~1e-7. A run of FedPT alone repeats bit for bit.
"""

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedpt.cli import main

from .conftest import FAST

PIECE = ["experiment", "--preset", "tiny", "--alphas", "0,1", *FAST]
TIMINGS = {"seconds", "device_train_seconds", "distill_seconds", "eval_seconds", "device_peak_memory_bytes",
           "device_prepare_seconds", "device_busiest_seconds", "device_processes", "device_seconds",
           "device_threads_max",
           "nodes", "partitions"}  # partitions: listed in node-id order, and node ids are random per simulation
DEVICE_SIDE = {"round", "system", "train_loss", "clients", "failures", "problems", "bytes_down", "bytes_up",
               "bytes_down_per_device", "bytes_up_per_device", "device_train_tokens"}


def _snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def pieces(tmp_path_factory):
    root = tmp_path_factory.mktemp("pieces")
    folder, together = root / "pieces", root / "together"
    assert main([*PIECE, "--no-progress", "--out", str(folder), "--systems", "fedavg-large"]) == 0
    first_report = (folder / "results.md").read_text()
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):  # with progress: the alpha sweep shows model, set, prompts, ETA
        assert main([*PIECE, "--out", str(folder), "--systems", "fedpt"]) == 0
    assert main([*PIECE, "--no-progress", "--out", str(together), "--systems", "fedpt,fedavg-large"]) == 0
    return {"folder": folder, "together": together, "first_report": first_report, "stderr": stderr.getvalue()}


def _records(folder: Path) -> dict[tuple[str, int], dict]:
    rows = [json.loads(line) for line in (folder / "rounds.jsonl").read_text().splitlines()]
    return {(r["system"], r["round"]): {k: v for k, v in r.items() if k not in TIMINGS} for r in rows}


@pytest.mark.slow
def test_pieces_give_the_results_of_one_run(pieces):
    folder, together = pieces["folder"], pieces["together"]
    mine, theirs = _records(folder), _records(together)
    assert mine.keys() == theirs.keys() == {(s, r) for s in ("fedpt", "fedavg-large") for r in (0, 1, 2)}
    for key in mine:
        if key[0] == "fedavg-large":
            assert mine[key] == theirs[key], key
        else:  # FedPT: devices bit-identical, server side to float32 rounding (module docstring)
            assert {k: mine[key][k] for k in DEVICE_SIDE if key[1] == 1 or k != "train_loss"} == \
                   {k: theirs[key][k] for k in DEVICE_SIDE if key[1] == 1 or k != "train_loss"}, key
            for k, v in mine[key].items():
                if isinstance(v, float):
                    assert v == pytest.approx(theirs[key][k], rel=1e-5, abs=1e-6), (key, k)
    for system, exact in (("fedavg-large", True), ("fedpt", False)):
        a = load_file(folder / system / "adapter" / "adapter_model.safetensors")
        b = load_file(together / system / "adapter" / "adapter_model.safetensors")
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]) if exact else torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), (system, k)
        names = sorted(p.name for p in (folder / system / "predictions").iterdir())
        assert names == sorted(p.name for p in (together / system / "predictions").iterdir())
        for name in names:
            rows = [json.loads(line) for line in (folder / system / "predictions" / name).read_text().splitlines()]
            other = [json.loads(line) for line in (together / system / "predictions" / name).read_text().splitlines()]
            assert [r["id"] for r in rows] == [r["id"] for r in other], name
            if exact:
                assert rows == other, name
    # the alpha sweep ran in the fedpt piece, over the same prompts
    assert json.loads((folder / "alpha_sweep.json").read_text()).keys() == {"fedpt", "fedpt:aggregated"}
    assert (folder / "fedpt" / "predictions" / "round-0002.dolly-tiny.proxy-alpha0.jsonl").is_file()
    # one summary over both pieces; pieces.json: one entry per piece, with CPU, dtype and wall time
    summary = json.loads((folder / "summary.json").read_text())
    assert list(summary["systems"]) == ["fedpt", "fedavg-large"]
    assert [row["comparison"] for row in summary["comparisons"]][0] == "FedPT vs FedAvg-large"
    entries = json.loads((folder / "pieces.json").read_text())
    assert [e["systems"] for e in entries] == [["fedavg-large"], ["fedpt"]]
    for entry in entries:
        assert entry["finished"] and entry["wall_seconds"] > 0 and entry["cpu"] and entry["dtype"] == "float32"
        assert "--systems" in entry["command"]
    assert set(entries[0]["params"]) == {"large"} and set(entries[1]["params"]) == {"small"}
    config = (folder / "config.toml").read_text()
    assert "systems = [\n    \"fedpt\",\n    \"fedavg-small\",\n    \"fedavg-large\",\n    \"fedavg-pt\",\n]" in config


@pytest.mark.slow
def test_the_alpha_sweep_shows_model_set_prompts_and_eta(pieces):
    err = pieces["stderr"].replace("\r", "\n")
    # alpha 0 and 1 for both experts, alpha 1 of the distilled one read from the run: 3 x 8 prompts
    assert "alpha sweep: 24 prompt decodings (greedy, max_new_tokens=8)" in err
    assert "fedpt proxy alpha=0 on dolly-tiny (8 prompts) |" in err
    assert "fedpt:aggregated proxy alpha=1 on dolly-tiny (8 prompts) |" in err
    assert "24/24 prompts [" in err and "<" in err  # tqdm: elapsed<remaining
    assert "fedpt proxy alpha=0 on dolly-tiny: Rouge-L" in err


@pytest.mark.slow
def test_the_report_of_a_partial_folder_says_not_yet_run(pieces):
    first = pieces["first_report"]  # after the fedavg-large piece only
    assert "Systems: fedpt: not yet run; fedavg-small: not yet run; fedavg-large: finished; fedavg-pt: not yet run." \
        in first
    assert "- **FedPT vs FedAvg-large**: not yet run (needs fedpt)." in first
    assert "| fedpt | not yet run | | | | | |" in first
    final = (pieces["folder"] / "results.md").read_text()
    assert "| FedPT vs FedAvg-large | dolly-tiny | fedpt proxy | fedavg-large large |" in final
    assert "| fedavg-small | not yet run | | | | | | | |" in final


@pytest.mark.parametrize("extra, key", [(["--set", "train.lr=0.5"], "train.lr"),
                                        (["--set", "run.seed=1"], "run.seed"),
                                        (["--set", "data.split_seed=7"], "data.split_seed"),
                                        (["--set", "federation.rounds=3"], "federation.rounds")])
@pytest.mark.slow
def test_a_piece_with_another_config_is_refused_and_the_folder_untouched(pieces, capsys, extra, key):
    folder = pieces["folder"]
    before = _snapshot(folder)
    capsys.readouterr()
    assert main([*PIECE, "--no-progress", "--out", str(folder), "--systems", "fedavg-small", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "different config" in err[0], err
    assert f"{key} (folder: " in err[0]
    assert _snapshot(folder) == before


def test_run_systems_is_not_a_piece_setting(tmp_path, capsys):
    assert main(["experiment", "--preset", "tiny", "--out", str(tmp_path / "x"), "--set", "run.systems=['fedpt']"]) == 2
    assert "--systems" in capsys.readouterr().err
    assert main(["experiment", "--preset", "tiny", "--out", str(tmp_path / "x"), "--systems", "fedsgd"]) == 2
    assert "unknown system 'fedsgd'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_export_keeps_what_the_report_needs(pieces, tmp_path, capsys, monkeypatch):
    from fedpt import export
    from fedpt.report import render

    folder, dest = pieces["folder"], tmp_path / "results" / "paper"
    assert main(["export", str(folder), str(dest)]) == 0
    files = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert not [f for f in files if "checkpoints" in f or f.endswith(".lock") or f.startswith("evals")]
    assert {"config.toml", "rounds.jsonl", "summary.json", "pieces.json", "alpha_sweep.json", "partitions.json",
            "partitions.md", "partitions.png", "fedpt/adapter/adapter_model.safetensors",
            "fedavg-large/adapter/adapter_config.json"} <= set(files)
    assert export.check_committed(dest) == []
    for system in ("fedpt", "fedavg-large"):
        bf16 = load_file(dest / system / "adapter" / "adapter_model.safetensors")
        fp32 = load_file(folder / system / "adapter" / "adapter_model.safetensors")
        assert all(bf16[k].dtype == torch.bfloat16 and torch.equal(bf16[k], fp32[k].to(torch.bfloat16)) for k in fp32)
        config = json.loads((dest / system / "adapter" / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == ("tiny-large" if system == "fedavg-large" else "tiny-small")
        assert config["target_modules"] == sorted(config["target_modules"])  # one order, whatever peft's set gave
        assert sorted(p.name for p in (dest / system / "predictions").iterdir()) == \
               sorted(p.name for p in (folder / system / "predictions").iterdir())
    # FedPT's other expert, the last round's adapter before distillation, travels in bf16 beside it
    final = max(json.loads(line)["round"] for line in (folder / "rounds.jsonl").read_text().splitlines()
                if json.loads(line)["system"] == "fedpt")
    pre = load_file(dest / "fedpt" / "adapter-pre-distillation" / "adapter_model.safetensors")
    fp32 = load_file(folder / "fedpt" / "aggregated" / f"round-{final}.safetensors")
    assert pre.keys() == fp32.keys() and all(torch.equal(pre[k], fp32[k].to(torch.bfloat16)) for k in fp32)
    assert not (dest / "fedavg-large" / "adapter-pre-distillation").exists()
    summary = json.loads((dest / "summary.json").read_text())
    assert summary["systems"]["fedpt"]["predictions"] == "fedpt/predictions"
    # both experts' sweep values travel with FedPT
    assert json.loads((dest / "alpha_sweep.json").read_text()) == json.loads((folder / "alpha_sweep.json").read_text())
    # The report of the exported folder is the run folder's, number for number (only the links differ).
    out_run, out_dest = render(folder, folder / "results.md")[0], render(dest, dest / "results.md")[0]
    assert out_run.replace("# FedPT experiment: pieces", "") == out_dest.replace("# FedPT experiment: paper", "")
    # Exporting again changes nothing; a different config or an oversized file is refused, DEST untouched.
    capsys.readouterr()
    assert main(["export", str(folder), str(dest)]) == 0
    assert "already in" in capsys.readouterr().out
    before = _snapshot(dest)
    other = tmp_path / "other"
    other.mkdir()
    config = (folder / "config.toml").read_text()
    (other / "config.toml").write_text(config.replace("seed = 0\nthreads", "seed = 5\nthreads"))  # run.seed
    assert main(["export", str(other), str(dest)]) == 2  # not finished anything: refused before any config check
    (other / "rounds.jsonl").write_text((folder / "rounds.jsonl").read_text())
    for system in ("fedpt", "fedavg-large"):
        (other / system / "adapter").mkdir(parents=True)
        (other / system / "adapter" / "adapter_model.safetensors").write_bytes(b"")
    capsys.readouterr()
    assert main(["export", str(other), str(dest)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "different config: run.seed (folder: 0, this piece: 5)" in err[0], err
    assert _snapshot(dest) == before
    monkeypatch.setattr(export, "MAX_FILE_BYTES", 1000)
    fresh = tmp_path / "fresh"
    assert main(["export", str(folder), str(fresh)]) == 2
    assert "over the 0 MiB a committed file may have" in capsys.readouterr().err
    assert not fresh.exists() or not any(fresh.iterdir())
    assert not [p for p in fresh.parent.iterdir() if p.name.startswith(".fresh-export-")]  # staging removed


@pytest.mark.slow
def test_fedpt_eval_shows_model_set_prompts_and_eta(pieces, capsys):
    assert main(["eval", "--run", str(pieces["folder"]), "--system", "fedpt", "--model", "proxy",
                 "--name", "progress"]) == 0
    err = capsys.readouterr().err.replace("\r", "\n")
    assert "fedpt eval: 8 prompt decodings (greedy, max_new_tokens=8)" in err
    assert "fedpt proxy on dolly-tiny (8 prompts) |" in err and "8/8 prompts [" in err
    assert "fedpt proxy on dolly-tiny: Rouge-L" in err


def test_a_checkpoint_belongs_to_its_system_not_to_its_piece():
    """A system's checkpoint resumes in a piece with other systems beside it (run.systems is not compared)."""
    from fedpt.checkpoint import config_changes
    from fedpt.config import load_config

    alone = load_config(preset="tiny", overrides=["run.systems=['fedpt']"]).to_dict()
    beside = load_config(preset="tiny", overrides=["run.systems=['fedpt','fedavg-large']"]).to_dict()
    assert config_changes(alone, beside) == []
    assert config_changes(alone, load_config(preset="tiny", overrides=["run.seed=3"]).to_dict()) == ["run.seed"]


@pytest.mark.slow
def test_rerunning_finished_systems_in_another_piece_retrains_nothing(pieces):
    """Last in this file: it adds a piece to the shared folder. fedpt's checkpoints were written by a piece
    of fedpt alone; a piece of both systems takes them as they are and trains nothing again."""
    folder = pieces["folder"]
    before = sorted((folder / "rounds.jsonl").read_text().splitlines())  # timings too: a retrained round differs
    assert main([*PIECE, "--no-progress", "--out", str(folder), "--systems", "fedpt,fedavg-large"]) == 0
    assert sorted((folder / "rounds.jsonl").read_text().splitlines()) == before
    entries = json.loads((folder / "pieces.json").read_text())
    assert [e["systems"] for e in entries][-1] == ["fedpt", "fedavg-large"] and entries[-1]["finished"]
