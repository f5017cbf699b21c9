"""``fedpt bench --parts job``'s phase table: each phase's bound recomputed here from the models' parameters."""

import pytest

from fedpt.bench_phases import phase_table
from fedpt.config import load_config
from fedpt.models.loading import load_model

BANDWIDTH, GEMM, GEMM_ONE = 2e9, 5e9, 1e9


def test_each_phase_is_divided_by_its_own_bound():
    cfg = load_config(preset="tiny")  # torch everywhere, float32
    assert cfg.model.large_backend == "local" and cfg.model.eval_engine == "torch"
    n_small = sum(p.numel() for p in load_model(cfg.model.small, "float32").parameters())
    n_large = sum(p.numel() for p in load_model(cfg.model.large, "float32").parameters())
    # 300 new tokens in 40 steps (~8 rows a step): the FLOPs bind; 40 in 40 (one row): the bytes bind
    wide = {"batches": 2, "rows": 16, "prompt_tokens": 1000, "decode_steps": 40, "new_tokens": 300}
    narrow = {"batches": 1, "rows": 1, "prompt_tokens": 1000, "decode_steps": 40, "new_tokens": 40}
    profile = {"phases": {"evaluation: small": {"seconds": 3.0, "calls": 2, **wide},
                          "evaluation: large": {"seconds": 2.0, "calls": 1, **narrow},
                          "evaluation: proxy": {"seconds": 6.0, "calls": 2, **wide},
                          # the same work, a quarter of whose prompt FLOPs were restored (llama.cpp's PromptStates)
                          "kd teacher decoding": {"seconds": 6.0, "calls": 2, **wide,
                                                  "prompt_flops_restored": 250 * 2 * (n_large + n_small)},
                          "kd student steps": {"seconds": 4.0, "calls": 3, "steps": 3, "tokens": 900},
                          "ray start-up": {"seconds": 5.0, "calls": 1},
                          "device rounds (wait)": {"seconds": 50.0, "calls": 2, "rounds": 2}},
               "devices": {"device_rounds": 4, "device_seconds": 80.0, "tokens": 5000, "prepare_seconds": 6.0,
                           "busiest_seconds": 47.5, "processes": 2}}
    rows = {row["phase"]: row for row in phase_table(cfg, profile, BANDWIDTH, GEMM, GEMM_ONE)}
    # decoding: each step reads every weight once (4 bytes in float32) and computes 2 FLOPs per
    # parameter per row; the prefill is 2 FLOPs per parameter per prompt token. The torch proxy
    # runs the small LM's two views as one doubled batch.
    small = 300 * 2 * n_small / GEMM + 1000 * 2 * n_small / GEMM
    assert 300 * 2 * n_small / GEMM > 40 * 4 * n_small / BANDWIDTH  # 1.2e-7 n > 0.8e-7 n
    large = 40 * 4 * n_large / BANDWIDTH + 1000 * 2 * n_large / GEMM
    assert 40 * 4 * n_large / BANDWIDTH > 40 * 2 * n_large / GEMM
    proxy = 300 * 2 * (n_large + n_small) / GEMM + 1000 * 2 * (n_large + n_small) / GEMM
    assert rows["evaluation: small"]["ratio"] == pytest.approx(small / 3.0)
    assert rows["evaluation: large"]["ratio"] == pytest.approx(large / 2.0)
    assert rows["evaluation: proxy"]["ratio"] == pytest.approx(proxy / 6.0)
    restored = 300 * 2 * (n_large + n_small) / GEMM + 750 * 2 * (n_large + n_small) / GEMM
    assert rows["kd teacher decoding"]["ratio"] == pytest.approx(restored / 6.0)
    assert rows["kd teacher decoding"]["work"].endswith("1000 prompt tokens (25% of their FLOPs restored, not computed)")
    assert rows["kd student steps"]["ratio"] == pytest.approx(6 * n_small * 900 / GEMM / 4.0)
    devices = rows["device steps (devices' own clocks, summed)"]
    assert devices["ratio"] == pytest.approx(6 * n_small * 5000 / GEMM_ONE / 80.0)
    assert rows["ray start-up"]["kind"] == "overhead" and rows["ray start-up"]["ratio"] is None
    # the wait: the busiest device process (47.5 s) against the mean ((80 + 6) / 2) and the wall (50)
    assert rows["device rounds (wait)"]["work"] == ("2 rounds; busiest of 2 device processes 47.5 s, mean 43.0 s "
                                                    "(set-up 6.0 s summed over devices); 2.5 s outside the busiest")
