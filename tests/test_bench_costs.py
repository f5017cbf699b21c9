"""`fedpt bench --parts memory,clients,job` (P4-P8) on the tiny pair: each number is what it claims."""

import json

import pytest

from fedpt.cli import main

# The tiny preset cut to one round of one system, so that each `fedpt run` the bench starts takes
# seconds; dolly-15k so that 100 simulated clients each hold data.
SMALL_JOB = ["--set", "run.systems=[\"fedpt\"]", "--set", "federation.rounds=1", "--set", "train.steps=1",
             "--set", "distill.steps=1", "--set", "data.eval_size=2", "--set", "data.kd_pool_size=4",
             "--set", "eval.max_new_tokens=4", "--set", "distill.max_new_tokens=4",
             "--set", "data.source=builtin:dolly-15k", "--set", "train.batch_size=2"]


def lora_param_count(spec: str, rank: int) -> int:
    """LoRA A (r x in) and B (out x r) on q, k, v, o of every layer, from the model's config alone."""
    from transformers import AutoConfig

    from fedpt.models.loading import resolve_spec

    c = AutoConfig.from_pretrained(resolve_spec(spec).path)
    head_dim = c.hidden_size // c.num_attention_heads
    shapes = [(c.hidden_size, c.num_attention_heads * head_dim), (c.hidden_size, c.num_key_value_heads * head_dim),
              (c.hidden_size, c.num_key_value_heads * head_dim), (c.num_attention_heads * head_dim, c.hidden_size)]
    return c.num_hidden_layers * sum(rank * (fan_in + fan_out) for fan_in, fan_out in shapes)


def test_memory_and_bytes_parts(tmp_path, fedpt_home):
    out = tmp_path / "bench"
    assert main(["bench", "--preset", "tiny", "--parts", "memory", "--out", str(out), *SMALL_JOB]) == 0
    mem = json.loads(out.with_suffix(".json").read_text())["memory"]
    assert "results" not in mem and set(mem["devices"]) == {"fedpt", "fedavg-large"}
    for system, spec in (("fedpt", "tiny-small"), ("fedavg-large", "tiny-large")):
        device = mem["devices"][system]
        assert device["model"] == spec and device["steps"] == 1 and device["tokens"] > 0
        assert device["dtype"] == device["frozen_weights"] == "float32"  # tiny checkpoints are fp32
        assert device["rss_before_load"] < device["rss_after_load"] <= device["peak_rss"]
        assert device["training_memory"] == device["peak_rss"] - device["rss_before_load"]
        # P5: the adapter down and back up, fp32, plus a small header per array (numpy's .npy)
        params = lora_param_count(spec, rank=8)
        arrays = 2 * 4 * {"tiny-small": 2, "tiny-large": 4}[spec]  # A and B on 4 targets per layer
        sent = mem["bytes_per_device_per_round"][system]
        assert 2 * 4 * params <= sent <= 2 * (4 * params + 256 * arrays)
    assert mem["P4_device_memory_fedpt_over_fedavg_large"] == pytest.approx(
        mem["devices"]["fedpt"]["training_memory"] / mem["devices"]["fedavg-large"]["training_memory"])
    sent = mem["bytes_per_device_per_round"]
    assert mem["P5_bytes_fedpt_over_fedavg_large"] == pytest.approx(sent["fedpt"] / sent["fedavg-large"])
    assert "**P4**" in out.with_suffix(".md").read_text() and "**P5**" in out.with_suffix(".md").read_text()


def test_clients_and_job_parts_run_fedpt_and_read_a_finished_job_back(tmp_path, fedpt_home, capsys):
    out, runs = tmp_path / "bench", tmp_path / "runs"
    args = ["bench", "--preset", "tiny", "--parts", "clients,job", "--out", str(out), "--runs", str(runs), *SMALL_JOB]
    assert main(args) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    clients = report["clients"]
    for count in ("4", "100"):
        run_dir = runs / f"clients-{count}"
        config = (run_dir / "config.toml").read_text()
        assert f"num_clients = {count}" in config and "clients_per_round = 4" in config
        assert clients["runs"][count]["devices_trained"] == [4]  # the same work in both runs
        summary = json.loads((run_dir / "summary.json").read_text())
        assert clients["runs"][count]["peak_memory_bytes"] == summary["peak_memory_bytes"] > 0
    assert clients["P6_peak_memory_many_over_few"] == pytest.approx(
        clients["runs"]["100"]["peak_memory_bytes"] / clients["runs"]["4"]["peak_memory_bytes"])

    job = report["job"]
    summary = json.loads((runs / "job" / "summary.json").read_text())
    assert not job["reused_finished_run"]
    assert job["P7_wall_seconds"] == summary["wall_seconds"] and job["P8_peak_memory_bytes"] == summary["peak_memory_bytes"]
    rounds = [json.loads(line) for line in (runs / "job" / "rounds.jsonl").read_text().splitlines()]
    assert job["P8_device_process_peak_bytes"] == max(r["device_peak_memory_bytes"] or 0 for r in rounds) > 0
    assert job["rouge_l"]["fedpt"] == summary["systems"]["fedpt"]["final"]["rougeL_sets"]

    # A finished job is read back, not run again: the folder is left exactly as it was.
    before = {p: p.stat().st_mtime_ns for p in (runs / "job").rglob("*")}
    assert main(["bench", "--preset", "tiny", "--parts", "job", "--out", str(out), "--runs", str(runs), *SMALL_JOB]) == 0
    again = json.loads(out.with_suffix(".json").read_text())["job"]
    assert again["reused_finished_run"] and again["P7_wall_seconds"] == job["P7_wall_seconds"]
    assert {p: p.stat().st_mtime_ns for p in (runs / "job").rglob("*")} == before

    # ... but a finished job of another config is refused, not reported as this one's.
    assert main(["bench", "--preset", "tiny", "--parts", "job", "--out", str(out), "--runs", str(runs), *SMALL_JOB,
                 "--set", "train.lr=1e-4"]) == 2
    assert "another config" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in (runs / "job").rglob("*")} == before


def test_unknown_part_is_one_line(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "--preset", "tiny", "--parts", "decoding,speed", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "--parts" in err and "speed" in err and "\n" not in err
    assert not out.with_suffix(".json").exists()
