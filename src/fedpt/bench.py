"""``fedpt bench``: where FedPT's time goes on this machine, as ratios measured side by side.

Every ratio compares things measured in the same process, interleaved repeat by repeat (best
of ``--repeats``), so a busy machine slows both sides alike:

- **P1** proxy-tuned decoding (the product's path: ``ProxyTunedLM`` over the large LM and
  ``MixedAdapterDiff``, one doubled small-model batch) ÷ the large LM decoding alone, tokens/s;
- **P2** the same ÷ a straightforward three-model loop (``TwoSourceDiff``: three forwards,
  three KV caches per token);
- **P3** achieved FLOP/s of the large LM's prefill and of a device's LoRA training step
  ÷ the GEMM bound measured in the same run (a 512-row matmul of the large LM's MLP shape).
  FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode``, not by formula.

Run per dtype (``--dtypes auto,bfloat16,float32``): whether bf16 pays depends on the CPU (see
``fedpt.models.loading.fast_bf16_matmul``). Writes ``OUT.json`` and ``OUT.md``.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedpt.errors import FedPTError


@dataclass
class BenchConfig:
    preset: str = "qwen-cpu"
    config_file: str | None = None
    overrides: list[str] = field(default_factory=list)
    dtypes: list[str] = field(default_factory=lambda: ["auto"])
    batches: list[int] = field(default_factory=lambda: [1, 8])
    new_tokens: int = 32
    prompt_tokens: int = 64
    repeats: int = 3
    out: Path = Path("bench/results/bench")

    def validate(self) -> None:
        from fedpt.config import DTYPES

        for dtype in self.dtypes:
            if dtype not in DTYPES:
                raise FedPTError(f"--dtypes: '{dtype}' is not one of {', '.join(DTYPES)}")
        if not self.batches or min(self.batches) < 1:
            raise FedPTError("--batches: give positive batch sizes, e.g. 1,8")
        for name in ("new_tokens", "prompt_tokens", "repeats"):
            if getattr(self, name) < (2 if name == "new_tokens" else 1):
                raise FedPTError(f"--{name.replace('_', '-')} is too small: {getattr(self, name)}")


def counted_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of ``fn`` as torch's FlopCounterMode counts them (matmuls, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def best_seconds(fn: Callable[[], Any], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def gemm_bound(dtype: torch.dtype, rows: int, inner: int, outer: int, repeats: int) -> float:
    """FLOP/s of ``(rows x inner) @ (inner x outer)`` in ``dtype``: what a dense layer can reach here."""
    x, w = torch.randn(rows, inner).to(dtype), torch.randn(outer, inner).to(dtype)
    torch.nn.functional.linear(x, w)  # first call: kernel selection, allocations
    return 2 * rows * inner * outer / best_seconds(lambda: torch.nn.functional.linear(x, w), repeats + 2)


def decode_seconds(make_source: Callable[[], Any], ids: torch.Tensor, mask: torch.Tensor, new_tokens: int,
                   pad_id: int) -> tuple[float, list[list[int]]]:
    """Seconds for the ``new_tokens - 1`` steps after the prefill (greedy, no stop tokens) and the tokens."""
    from fedpt.proxy import DecodeSession, Decoding

    session = DecodeSession(make_source(), ids, mask, [], pad_id, Decoding(max_new_tokens=new_tokens))
    try:
        tokens = [session.advance()[0]]
        start = time.perf_counter()
        while not session.done:
            tokens.append(session.advance()[0])
        return time.perf_counter() - start, torch.stack(tokens, 1).tolist()
    finally:
        session.close()


def with_random_lora(base: Any, lora_cfg: Any) -> Any:
    """``base`` with a LoRA adapter whose B is nonzero (B = 0 would make the diff exactly 0):
    speed does not depend on what an adapter learned. Seeded: the same adapter every time."""
    from fedpt.models.lora import attach_lora

    model = attach_lora(base, lora_cfg, seed=0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator).to(param.dtype) * 0.01)
    return model.eval()


def bench_dtype(cfg: Any, bench: BenchConfig, dtype: str, log: Callable[[str], None]) -> dict[str, Any]:
    """All measurements for one dtype: GEMM bound, decoding (P1, P2), prefill and training (P3)."""
    from fedpt.data.prompts import collate, encode_prompts_left, encode_sft, format_prompt
    from fedpt.data.records import load_examples
    from fedpt.models.loading import load_model, load_tokenizer, torch_dtype
    from fedpt.models.logits import LocalLogitSource, MixedAdapterDiff
    from fedpt.proxy import ProxyTunedLM, TwoSourceDiff
    from fedpt.train import response_loss

    tokenizer = load_tokenizer(cfg.model.small)
    large = load_model(cfg.model.large, dtype)
    small = with_random_lora(load_model(cfg.model.small, dtype), cfg.lora)
    mlp = large.get_decoder().layers[0].mlp.up_proj  # the large LM's widest dense shape
    bound = gemm_bound(torch_dtype(dtype), 512, mlp.in_features, mlp.out_features, bench.repeats)
    log(f"{dtype}: GEMM bound {bound / 1e9:.1f} GFLOP/s")
    examples = load_examples(cfg.data.source, cfg.data.fields)
    prompts = [format_prompt(ex, cfg.data.template, tokenizer) for ex in examples[: max(bench.batches)]]

    sources = {
        "large alone": lambda: LocalLogitSource(large),
        "proxy (product)": lambda: ProxyTunedLM(LocalLogitSource(large), MixedAdapterDiff(small), cfg.proxy.alpha),
        "proxy (three-model loop)": lambda: ProxyTunedLM(
            LocalLogitSource(large), TwoSourceDiff(LocalLogitSource(small), LocalLogitSource(small, use_adapter=False)),
            cfg.proxy.alpha),
    }
    decoding = []
    for batch in bench.batches:
        ids, mask = encode_prompts_left(tokenizer, prompts[:batch], bench.prompt_tokens)
        seconds = {name: float("inf") for name in sources}
        tokens: dict[str, list[list[int]]] = {}
        for repeat in range(bench.repeats):
            for name, make in sources.items():  # interleaved: noise hits every source alike
                took, tokens[name] = decode_seconds(make, ids, mask, bench.new_tokens, tokenizer.pad_token_id)
                seconds[name] = min(seconds[name], took)
        rate = {name: batch * (bench.new_tokens - 1) / s for name, s in seconds.items()}
        row = {"batch": batch, "tok_s": rate,
               "P1_proxy_over_large": rate["proxy (product)"] / rate["large alone"],
               "P2_proxy_over_three_model_loop": rate["proxy (product)"] / rate["proxy (three-model loop)"],
               "same_tokens_product_vs_loop": tokens["proxy (product)"] == tokens["proxy (three-model loop)"]}
        decoding.append(row)
        log(f"{dtype}: batch {batch}: " + ", ".join(f"{n} {r:.2f} tok/s" for n, r in rate.items())
            + f"; P1 {row['P1_proxy_over_large']:.3f}, P2 {row['P2_proxy_over_three_model_loop']:.3f}")

    batch = max(bench.batches)
    ids, mask = encode_prompts_left(tokenizer, prompts[:batch], bench.prompt_tokens)
    prefill = lambda: LocalLogitSource(large).prefill(ids, mask)  # noqa: E731
    flops = counted_flops(prefill)
    prefill_rate = flops / best_seconds(prefill, bench.repeats)
    log(f"{dtype}: large prefill {batch}x{ids.shape[1]}: {prefill_rate / 1e9:.1f} GFLOP/s")

    rows = [encode_sft(tokenizer, format_prompt(ex, cfg.data.template, tokenizer), ex.response,
                       cfg.data.max_prompt_tokens, cfg.data.max_seq_len) for ex in examples[: cfg.train.batch_size]]
    train_batch = collate(rows, tokenizer.pad_token_id)
    small.train()

    def train_step() -> None:  # forward + backward of a device step (the optimizer touches LoRA only)
        response_loss(small, train_batch).backward()
        small.zero_grad(set_to_none=True)

    train_flops = counted_flops(train_step)
    train_rate = train_flops / best_seconds(train_step, bench.repeats)
    small.eval()
    log(f"{dtype}: device LoRA step {tuple(train_batch['input_ids'].shape)}: {train_rate / 1e9:.1f} GFLOP/s")
    return {
        "dtype": dtype, "gemm_bound_gflop_s": bound / 1e9, "decoding": decoding,
        "prefill": {"shape": list(ids.shape), "gflop": flops / 1e9, "gflop_s": prefill_rate / 1e9,
                    "P3_over_bound": prefill_rate / bound},
        "train_step": {"shape": list(train_batch["input_ids"].shape), "gflop": train_flops / 1e9,
                       "gflop_s": train_rate / 1e9, "P3_over_bound": train_rate / bound},
    }


def run_bench(bench: BenchConfig, log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)
              ) -> dict[str, Any]:
    from fedpt.config import load_config
    from fedpt.models.loading import resolve_dtype

    bench.validate()
    cfg = load_config(path=bench.config_file, preset=None if bench.config_file else bench.preset,
                      overrides=bench.overrides)
    dtypes = list(dict.fromkeys(resolve_dtype(d) for d in bench.dtypes))  # "auto" names one of the others
    report = {"command": "fedpt " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("fedpt") else " ".join(sys.argv),
              "date": time.strftime("%Y-%m-%d %H:%M"), "small": cfg.model.small, "large": cfg.model.large,
              "threads": torch.get_num_threads(), "auto_dtype": resolve_dtype("auto"),
              "bench": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(bench).items()},
              "results": []}
    bench.out.parent.mkdir(parents=True, exist_ok=True)
    for dtype in dtypes:
        report["results"].append(bench_dtype(cfg, bench, dtype, log))
        # written after every dtype: a slow one (bf16 training on an AVX2-only CPU takes minutes
        # per step) can be stopped without losing what was measured before it
        bench.out.with_suffix(".json").write_text(json.dumps(report, indent=1))
        bench.out.with_suffix(".md").write_text(markdown(report))
    return report


def markdown(report: dict[str, Any]) -> str:
    lines = [f"`{report['command']}` ({report['date']}); small `{report['small']}`, large `{report['large']}`, "
             f"{report['threads']} torch threads; `auto` is {report['auto_dtype']} on this machine; best of "
             f"{report['bench']['repeats']} interleaved repeats, {report['bench']['new_tokens']} new tokens per row.", "",
             "| dtype | batch | large alone tok/s | proxy (product) tok/s | three-model loop tok/s | "
             "**P1** proxy ÷ large | **P2** proxy ÷ loop |", "|---|---|---|---|---|---|---|"]
    for res in report["results"]:
        for row in res["decoding"]:
            rate = row["tok_s"]
            lines.append(f"| {res['dtype']} | {row['batch']} | {rate['large alone']:.2f} | {rate['proxy (product)']:.2f} | "
                         f"{rate['proxy (three-model loop)']:.2f} | **{row['P1_proxy_over_large']:.3f}** | "
                         f"**{row['P2_proxy_over_three_model_loop']:.3f}** |")
    lines += ["", "| dtype | GEMM bound GFLOP/s | large prefill GFLOP/s | **P3** prefill ÷ bound | "
              "device LoRA step GFLOP/s | **P3** training ÷ bound |", "|---|---|---|---|---|---|"]
    for res in report["results"]:
        lines.append(f"| {res['dtype']} | {res['gemm_bound_gflop_s']:.1f} | {res['prefill']['gflop_s']:.1f} | "
                     f"**{res['prefill']['P3_over_bound']:.2f}** | {res['train_step']['gflop_s']:.1f} | "
                     f"**{res['train_step']['P3_over_bound']:.2f}** |")
    return "\n".join(lines) + "\n"
