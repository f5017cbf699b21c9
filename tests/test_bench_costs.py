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


def lora_shapes(spec: str, rank: int) -> dict[str, tuple[int, int]]:
    """The adapter a device exchanges, from the model's config alone: per LoRA matrix, its name (as
    peft names it) and shape; A (r x in) and B (out x r) on q, k, v, o of every layer."""
    from transformers import AutoConfig

    from fedpt.models.loading import resolve_spec

    c = AutoConfig.from_pretrained(resolve_spec(spec).path)
    head_dim = c.hidden_size // c.num_attention_heads
    q, kv = c.num_attention_heads * head_dim, c.num_key_value_heads * head_dim
    fans = {"q_proj": (c.hidden_size, q), "k_proj": (c.hidden_size, kv), "v_proj": (c.hidden_size, kv),
            "o_proj": (q, c.hidden_size)}
    shapes = {}
    for layer in range(c.num_hidden_layers):
        for target, (fan_in, fan_out) in fans.items():
            name = f"base_model.model.model.layers.{layer}.self_attn.{target}"
            shapes[f"{name}.lora_A.weight"] = (rank, fan_in)
            shapes[f"{name}.lora_B.weight"] = (fan_out, rank)
    return shapes


def adapter_message_bytes(spec: str, rank: int) -> int:
    """Bytes of that adapter as Flower's ArrayRecord counts them (``count_bytes``): per array its
    serialized .npy (header + fp32 data) and its key, counted here with numpy itself."""
    import io

    import numpy as np

    total = 0
    for name, shape in lora_shapes(spec, rank).items():
        buffer = io.BytesIO()
        np.save(buffer, np.zeros(shape, dtype=np.float32), allow_pickle=False)
        total += len(buffer.getvalue()) + len(name)
    return total


def test_memory_and_bytes_parts(tmp_path, fedpt_home, tiny_cfg):
    out = tmp_path / "bench"
    assert main(["bench", "--preset", "tiny", "--parts", "memory", "--out", str(out), *SMALL_JOB]) == 0
    mem = json.loads(out.with_suffix(".json").read_text())["memory"]
    assert "results" not in mem and set(mem["devices"]) == {"fedpt", "fedavg-large"}
    assert tiny_cfg.lora.targets == ["q_proj", "k_proj", "v_proj", "o_proj"] and tiny_cfg.lora.rank == 8
    raw = {}
    for system, spec in (("fedpt", "tiny-small"), ("fedavg-large", "tiny-large")):
        device = mem["devices"][system]
        # One device's first round as SMALL_JOB sets it: 1 step on 2 of the longest examples, each
        # filling data.max_seq_len, so the tokens it trained on are known in advance.
        assert device["model"] == spec and device["steps"] == 1 and device["tokens"] == 2 * tiny_cfg.data.max_seq_len
        assert device["dtype"] == device["frozen_weights"] == "float32"  # tiny checkpoints are fp32
        assert device["rss_before_load"] < device["rss_after_load"] <= device["peak_rss"]
        raw[system] = device["peak_rss"] - device["rss_before_load"]  # P4's memory, from the raw readings
        assert device["training_memory"] == raw[system]
        # P5: the adapter down and back up, each way the exact bytes Flower counts
        assert mem["bytes_per_device_per_round"][system] == 2 * adapter_message_bytes(spec, rank=8)
    # Each device ran in a fresh process: the large model's device did not start from the memory
    # the small one's had reached (one process for both would carry that over).
    assert mem["devices"]["fedavg-large"]["rss_before_load"] < mem["devices"]["fedpt"]["peak_rss"]
    assert mem["P4_device_memory_fedpt_over_fedavg_large"] == pytest.approx(raw["fedpt"] / raw["fedavg-large"])
    assert mem["P5_bytes_fedpt_over_fedavg_large"] == pytest.approx(
        adapter_message_bytes("tiny-small", 8) / adapter_message_bytes("tiny-large", 8))
    assert "**P4**" in out.with_suffix(".md").read_text() and "**P5**" in out.with_suffix(".md").read_text()


def read_run(run_dir):
    """What a finished run wrote: its config (as a dict), summary and round records."""
    from fedpt.config import load_config

    rounds = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines() if line.strip()]
    return (load_config(path=run_dir / "config.toml").to_dict(), json.loads((run_dir / "summary.json").read_text()),
            rounds)


def test_clients_and_job_parts_run_fedpt_and_read_a_finished_job_back(tmp_path, fedpt_home, capsys):
    import time

    out, runs = tmp_path / "bench", tmp_path / "runs"
    args = ["bench", "--preset", "tiny", "--parts", "clients,job", "--out", str(out), "--runs", str(runs), *SMALL_JOB]
    started = time.monotonic()
    assert main(args) == 0
    elapsed = time.monotonic() - started
    report = json.loads(out.with_suffix(".json").read_text())

    # P6 from the two runs' own files: configs that differ in the number of clients only, the same
    # 4 devices trained in the one round, and the ratio of the peaks their summaries recorded.
    few, many = (read_run(runs / f"clients-{count}") for count in (4, 100))
    assert few[0]["federation"]["num_clients"] == 4 and many[0]["federation"]["num_clients"] == 100
    assert few[0]["federation"]["clients_per_round"] == 4
    assert few[0] | {"federation": {}} == many[0] | {"federation": {}}
    assert {k: v for k, v in few[0]["federation"].items() if k != "num_clients"} \
        == {k: v for k, v in many[0]["federation"].items() if k != "num_clients"}
    for config, summary, rounds in (few, many):
        assert [r["clients"] for r in rounds if r["round"] > 0] == [4]
        assert summary["peak_memory_bytes"] > 0
    assert report["clients"]["P6_peak_memory_many_over_few"] == pytest.approx(
        many[1]["peak_memory_bytes"] / few[1]["peak_memory_bytes"])

    # P7, P8 from the job's own files; the job ran inside the bench call, so within its time.
    job = report["job"]
    _, summary, rounds = read_run(runs / "job")
    assert not job["reused_finished_run"]
    assert job["P7_wall_seconds"] == summary["wall_seconds"] and 0 < job["P7_wall_seconds"] < elapsed
    assert job["P8_peak_memory_bytes"] == summary["peak_memory_bytes"] > 0
    assert job["P8_device_process_peak_bytes"] == max(r["device_peak_memory_bytes"] or 0 for r in rounds) > 0
    assert job["rouge_l"]["fedpt"] == summary["systems"]["fedpt"]["final"]["rougeL_sets"]

    # A finished job is read back, not run again: the folder is left exactly as it was.
    before = {p: p.stat().st_mtime_ns for p in (runs / "job").rglob("*")}
    assert main(["bench", "--preset", "tiny", "--parts", "job", "--out", str(out), "--runs", str(runs), *SMALL_JOB]) == 0
    again = json.loads(out.with_suffix(".json").read_text())["job"]
    assert again["reused_finished_run"] and again["P7_wall_seconds"] == summary["wall_seconds"]
    assert again["P8_peak_memory_bytes"] == summary["peak_memory_bytes"]
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
