"""`fedpt experiment` on the tiny pair: every artefact is written, and a rerun resumes instead of redoing."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from fedpt.cli import main

from .conftest import FAST



def _proxy_scores(run_dir, system: str, alphas, expert=None) -> dict[float, float]:
    """Rouge-L on the first evaluation set of the large LM proxy-tuned by ``system``'s saved adapter
    (or by the adapter tensors in the safetensors file ``expert``)."""
    from peft import PeftModel, set_peft_model_state_dict
    from safetensors.torch import load_file

    from fedpt.config import load_config
    from fedpt.evaluate import evaluate_rouge
    from fedpt.models.loading import load_model, load_tokenizer
    from fedpt.models.logits import LocalLogitSource, MixedAdapterDiff
    from fedpt.proxy import ProxyTunedLM
    from fedpt.server import load_eval_sets, load_splits

    cfg = load_config(path=run_dir / "config.toml")
    tokenizer = load_tokenizer(cfg.model.small)
    examples = next(iter(load_eval_sets(cfg, load_splits(cfg)).values()))
    large = LocalLogitSource(load_model(cfg.model.large, cfg.model.dtype))
    tuned = PeftModel.from_pretrained(load_model(cfg.model.small, cfg.model.dtype), run_dir / system / "adapter")
    if expert is not None:
        set_peft_model_state_dict(tuned, load_file(expert))
    return {alpha: evaluate_rouge(ProxyTunedLM(large, MixedAdapterDiff(tuned), alpha), tokenizer, examples, cfg.eval,
                                  cfg.data).rouge_l
            for alpha in alphas}


@pytest.mark.slow
def test_experiment_writes_results_and_resumes(tmp_path, capsys):
    out = tmp_path / "exp"
    args = ["experiment", "--preset", "tiny", "--no-progress", "--out", str(out), "--alphas", "0,1,2", *FAST]
    assert main(args) == 0
    results = (out / "results.md").read_text()
    for heading in ("## Rouge-L, pretrained and final", "## Rouge-L per round", "## Alpha sweep",
                    "## Cost per device per round"):
        assert heading in results
    assert (out / "rouge_per_round.png").stat().st_size > 10_000 and (out / "alpha_sweep.png").is_file()
    sweep = json.loads((out / "alpha_sweep.json").read_text())
    assert set(sweep) == {"fedpt", "fedpt:aggregated"}
    assert set(sweep["fedpt"]) == set(sweep["fedpt:aggregated"]) == {"0.0", "1.0", "2.0"}
    rows = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    by = {(r["system"], r["round"]): r for r in rows}
    # alpha = 0 is the large LM alone (round 0's score). The run's own alpha (1) is taken from its
    # last round's record, the others are evaluated by the sweep: check both kinds against a
    # proxy-tuned large LM built here from the saved final adapter.
    assert sweep["fedpt"]["0.0"]["dolly-tiny"] == by[("fedpt", 0)]["rougeL_sets"]["dolly-tiny"]["large"]
    for alpha, score in _proxy_scores(out, "fedpt", (1.0, 2.0)).items():
        assert sweep["fedpt"][str(alpha)]["dolly-tiny"] == score, alpha
    # The other expert: the last round's FedAvg'd adapter before distillation (saved by the round).
    # alpha = 0 is the large LM again, whichever expert; the others match a proxy built from the file.
    aggregated = out / "fedpt" / "aggregated" / "round-2.safetensors"
    assert sweep["fedpt:aggregated"]["0.0"] == sweep["fedpt"]["0.0"]
    expected = _proxy_scores(out, "fedpt", (1.0, 2.0), expert=aggregated)
    for alpha, score in expected.items():
        assert sweep["fedpt:aggregated"][str(alpha)]["dolly-tiny"] == score, alpha
    from safetensors.torch import load_file

    before, after = load_file(aggregated), load_file(out / "fedpt" / "adapter" / "adapter_model.safetensors")
    assert any(not torch.allclose(before[k], after[k].float()) for k in before), "not the pre-distillation adapter"
    assert (out / "fedpt" / "predictions" / "round-0002.dolly-tiny.proxy-aggregated-alpha1.jsonl").is_file()
    for system in ("fedpt", "fedavg-small", "fedavg-large", "fedavg-pt"):
        assert f"| {system} |" in results
    rounds_before = sorted((out / "rounds.jsonl").read_text().splitlines())
    assert main(args) == 0  # everything done: nothing is trained again
    # Same records, to the digit (a resume rewrites the log grouped by training group, so the
    # order of lines may change; their content may not).
    assert sorted((out / "rounds.jsonl").read_text().splitlines()) == rounds_before


def test_experiment_refuses_a_different_config(tmp_path, capsys):
    out = tmp_path / "exp"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["experiment", "--preset", "tiny", "--out", str(out)]) == 2
    assert "not a fedpt experiment" in capsys.readouterr().err


@pytest.mark.slow
def test_a_stop_during_the_alpha_sweep_says_how_to_go_on_and_the_rerun_finishes_it(tmp_path):
    """SIGTERM while the sweep decodes (after Flower's simulation took the signals over): exit
    128 + 15 with the one line saying what to do, and the same command finishes the sweep."""
    out, marker = tmp_path / "exp", tmp_path / "paused"
    args = ["experiment", "--preset", "tiny", "--no-progress", "--out", str(out), "--alphas", "0,1",
            "--systems", "fedpt", *FAST]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "FEDPT_PAUSE_AT": "alpha-sweep@2",
           "FEDPT_PAUSE_FILE": str(marker)}
    proc = subprocess.Popen([sys.executable, "-m", "fedpt.cli", *args], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while not marker.is_file():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == 128 + signal.SIGTERM, err.decode()[-2000:]
    assert err.decode().strip().splitlines()[-1] == ("stopped by SIGTERM; finished rounds are kept: run the same "
                                                     "command again to continue")
    assert main(args) == 0
    sweep = json.loads((out / "alpha_sweep.json").read_text())
    assert set(sweep["fedpt"]) == set(sweep["fedpt:aggregated"]) == {"0.0", "1.0"}
