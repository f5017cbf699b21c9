"""``fedpt.eval_cache``: a finished evaluation is reused only for the same computation."""

import torch

from fedpt.config import load_config
from fedpt.eval_cache import EvalCache, adapter_digest
from fedpt.evaluate import EvalResult


def _result() -> EvalResult:
    return EvalResult(rouge_l=12.5, num_prompts=2, protocol="greedy", per_seed=[12.5],
                      samples=[("p1", "a1"), ("p2", "a2")], ids=["x", "y"], prompts=["p1", "p2"],
                      references=[("r1",), ("r2", "r2b")], seeds=[None], predictions=[["a1", "a2"]],
                      scores=[[10.0, 15.0]])


def test_a_result_survives_the_process_and_a_torn_file_is_not_trusted(tmp_path):
    cfg = load_config(preset="tiny").to_dict()
    key = EvalCache(cfg, tmp_path).key("small", "dolly", ["x", "y"])
    EvalCache(cfg, tmp_path).put(key, _result())
    assert EvalCache(cfg, tmp_path).get(key) == _result()  # a new process reads it back, tuples and all
    (tmp_path / f"{key}.json").write_text('{"rouge_l": 12.5, "num_pro')  # a stop mid-write (without the rename)
    assert EvalCache(cfg, tmp_path).get(key) is None
    assert EvalCache(cfg, None).get(key) is None  # memory only: nothing on disk is read


def test_the_key_changes_with_everything_that_changes_the_result():
    cfg = load_config(preset="tiny")
    base = EvalCache(cfg.to_dict()).key("small", "dolly", ["x", "y"])
    other_systems = load_config(preset="tiny", overrides=["run.systems=['fedavg-large']"])
    assert EvalCache(other_systems.to_dict()).key("small", "dolly", ["x", "y"]) == base  # pieces share it
    shorter = load_config(preset="tiny", overrides=["eval.max_new_tokens=7"])
    assert EvalCache(shorter.to_dict()).key("small", "dolly", ["x", "y"]) != base
    cache = EvalCache(cfg.to_dict())
    assert len({base, cache.key("large", "dolly", ["x", "y"]), cache.key("small", "sni", ["x", "y"]),
                cache.key("small", "dolly", ["x"]), cache.key("small", "dolly", ["y", "x"])}) == 5


def test_the_adapter_digest_sees_one_changed_value():
    state = {"b.lora_B.weight": torch.zeros(3, 4), "a.lora_A.weight": torch.randn(4, 3)}
    same = {k: state[k].clone() for k in reversed(list(state))}  # another dict order
    assert adapter_digest(state) == adapter_digest(same)
    same["b.lora_B.weight"][2, 3] = 1e-6
    assert adapter_digest(state) != adapter_digest(same)
