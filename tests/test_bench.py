"""`fedpt bench` on the tiny pair: every ratio is there and finite, FLOPs are counted right, bad input is one line."""

import json

import pytest
import torch

from fedpt.bench import counted_flops
from fedpt.cli import main


def test_flops_are_counted_as_two_per_multiply_add():
    x, w = torch.randn(5, 7), torch.randn(11, 7)
    assert counted_flops(lambda: torch.nn.functional.linear(x, w)) == 2 * 5 * 7 * 11


def test_bench_on_the_tiny_pair_writes_every_ratio(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "--preset", "tiny", "--dtypes", "float32", "--batches", "1,2", "--new-tokens", "3",
                 "--repeats", "1", "--out", str(out)]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    [result] = report["results"]
    assert result["dtype"] == "float32" and [row["batch"] for row in result["decoding"]] == [1, 2]
    for row in result["decoding"]:
        assert all(rate > 0 for rate in row["tok_s"].values())
        assert 0 < row["P1_proxy_over_large"] < float("inf") and 0 < row["P2_proxy_over_three_model_loop"]
        assert row["same_tokens_product_vs_loop"]  # fp32: one doubled batch decodes what three models do
        assert row["same_tokens_overlapped_vs_in_turn"]
    # The large LM's prefill does at least 2 FLOPs per weight of its decoder layers per prompt token.
    from fedpt.models.loading import load_model

    large = load_model("tiny-large", "float32")
    body = sum(p.numel() for name, p in large.get_decoder().layers.named_parameters() if name.endswith("weight")
               and p.dim() == 2)
    batch, length = result["prefill"]["shape"]
    assert result["prefill"]["gflop"] * 1e9 >= 2 * body * batch * length
    assert 0 < result["prefill"]["P3_over_bound"] and 0 < result["train_step"]["P3_over_bound"]
    assert "P1" in out.with_suffix(".md").read_text() and "P1" in capsys.readouterr().out
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is not None:  # CI installs it: the llama.cpp rows and P9
        for row in result["decoding"]:
            assert 0 < row["P1_all_llamacpp"] < float("inf") and 0 < row["llamacpp_large_over_torch_large"]
            assert row["greedy_tokens_llamacpp_vs_torch_large"] == 1.0  # f32 GGUF of the same model
        first = result["decoding"][0]
        assert 0 < first["P9_product_llamacpp_over_bare_llamacpp"] < float("inf")
        assert first["same_tokens_product_vs_bare_llamacpp"]  # the product's loop decodes what llama.cpp does
        assert "P9" in out.with_suffix(".md").read_text()


@pytest.mark.parametrize("args, words", [(["--dtypes", "fp8"], "--dtypes"), (["--batches", "0"], "--batches"),
                                         (["--batches", "a"], "--batches"), (["--new-tokens", "1"], "--new-tokens")])
def test_bad_bench_arguments_are_one_line(tmp_path, capsys, args, words):
    out = tmp_path / "bench"
    assert main(["bench", "--preset", "tiny", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and words in err and "\n" not in err
    assert not out.with_suffix(".json").exists()


def test_p7_target_follows_the_cpu():
    """Issue 18: 8 min where torch has fast bf16 matmuls, 15 on AVX2-only CPUs (fp32 training)."""
    from fedpt.bench import p7_target_minutes

    assert p7_target_minutes(frozenset({"avx2", "fma"})) == 15
    assert p7_target_minutes(frozenset({"avx2", "avx512f", "avx512_bf16"})) == 8
    assert p7_target_minutes(frozenset({"avx2", "amx_tile"})) == 8


def test_bench_scripts_write_their_numbers_and_table(tmp_path, capsys):
    from fedpt.bench import write_results

    write_results(tmp_path / "deep" / "result", {"ratio": 0.9, "cpu": "x"}, ["| a |", "|---|"])
    assert json.loads((tmp_path / "deep" / "result.json").read_text()) == {"ratio": 0.9, "cpu": "x"}
    assert (tmp_path / "deep" / "result.md").read_text() == "| a |\n|---|\n"
    assert capsys.readouterr().out == "| a |\n|---|\n"
    write_results(tmp_path / "quiet", {}, ["x"], show=False)
    assert capsys.readouterr().out == "" and (tmp_path / "quiet.md").read_text() == "x\n"


def test_run_case_process_keeps_the_fastest_repeat_and_stops_on_a_failing_case(tmp_path):
    import os

    from fedpt.bench import run_case_process

    script = tmp_path / "case.py"
    script.write_text("import json, sys\ncase = sys.argv[2]\nif case == 'bad':\n"
                      "    raise SystemExit('no such rows: bad')\n"
                      "print('noise')\nprint(json.dumps({'seconds': float(case), 'case': case}))\n")
    best: dict[str, dict] = {}
    assert run_case_process(str(script), "3.5", dict(os.environ), best)["seconds"] == 3.5
    best["3.5"]["seconds"] = 2.0  # an earlier repeat was faster: it stays
    assert run_case_process(str(script), "3.5", dict(os.environ), best) == {"seconds": 2.0, "case": "3.5"}
    with pytest.raises(SystemExit, match="bad: no such rows: bad"):
        run_case_process(str(script), "bad", dict(os.environ), best)
