"""``fedpt bench``: where FedPT's time goes on this machine, as ratios measured side by side.

Every ratio compares things measured in the same process, interleaved repeat by repeat (best
of ``--repeats``), so a busy machine slows both sides alike:

- **P1** proxy-tuned decoding (the product's path: ``ProxyTunedLM`` over the large LM and
  ``MixedAdapterDiff``, one doubled small-model batch) ÷ the large LM decoding alone, tokens/s;
- **P2** the same ÷ a straightforward three-model loop (``TwoSourceDiff``: three forwards,
  three KV caches per token);
- **P9** (with llama.cpp installed) the large LM decoding through the product's path on the
  ``llamacpp`` backend ÷ a bare llama.cpp greedy loop on the same GGUF file (batch 1); the
  llama.cpp large LM also joins P1 ("proxy (llamacpp large)"), beside torch's;
- **P3** achieved FLOP/s of the large LM's prefill and of a device's LoRA training step
  ÷ the GEMM bound measured in the same run (a 512-row matmul of the large LM's MLP shape).
  FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode``, not by formula.

Run per dtype (``--dtypes auto,bfloat16,float32``): whether bf16 pays depends on the CPU (see
``fedpt.models.loading.fast_bf16_matmul``). Writes ``OUT.json`` and ``OUT.md``.

``--parts`` adds the cost ratios of ``fedpt.bench_costs``: ``memory`` (P4 device memory and P5
bytes, FedPT ÷ FedAvg-large), ``clients`` (P6 simulation memory, 100 clients ÷ 4) and ``job``
(P7 wall time and P8 peak memory of the default job, tens of minutes on the real pair).
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

PARTS = ("decoding", "memory", "clients", "job")


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
    llamacpp: bool = True  # also measure the large LM in llama.cpp, when its bindings are installed
    parts: list[str] = field(default_factory=lambda: ["decoding"])
    runs: Path = Path("runs/bench")  # where the clients and job parts put their fedpt runs

    def validate(self) -> None:
        from fedpt.config import DTYPES

        for part in self.parts:
            if part not in PARTS:
                raise FedPTError(f"--parts: '{part}' is not one of {', '.join(PARTS)}")
        if not self.parts:
            raise FedPTError(f"--parts: name at least one of {', '.join(PARTS)}")
        for dtype in self.dtypes:
            if dtype not in DTYPES:
                raise FedPTError(f"--dtypes: '{dtype}' is not one of {', '.join(DTYPES)}")
        if not self.batches or min(self.batches) < 1:
            raise FedPTError("--batches: give positive batch sizes, e.g. 1,8")
        for name in ("new_tokens", "prompt_tokens", "repeats"):
            if getattr(self, name) < (2 if name == "new_tokens" else 1):
                raise FedPTError(f"--{name.replace('_', '-')} is too small: {getattr(self, name)}")


def run_case_process(script: str, case: str, env: dict[str, str], best: dict[str, dict]) -> dict:
    """Run bench ``script --case CASE`` in a fresh process (its peak memory its own); its last line
    of output is the case's JSON. Keeps it in ``best[case]`` with the fewest ``seconds`` of the
    repeats so far, and returns it; a failing case stops the bench with the child's last line."""
    import subprocess
    import sys

    child = subprocess.run([sys.executable, script, "--case", case], capture_output=True, text=True, env=env)
    if child.returncode != 0:
        raise SystemExit(f"{case}: {child.stderr.strip().splitlines()[-1]}")
    result = json.loads(child.stdout.strip().splitlines()[-1])
    result["seconds"] = min(result["seconds"], best.get(case, {}).get("seconds", float("inf")))
    best[case] = result
    return result


def write_results(out: str | Path, data: dict[str, Any], lines: list[str], show: bool = True) -> None:
    """A bench script's results: ``OUT.json`` (the numbers) and ``OUT.md`` (the table), printed too."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(data, indent=1))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    if show:
        print("\n".join(lines))


def p7_target_minutes(flags: frozenset[str] | None = None) -> int:
    """Issue 18's P7 target for the CPU: 8 min where torch has fast bf16 matmuls (AVX-512-BF16,
    AMX), 15 min on AVX2-only CPUs (every trained model runs in fp32 there)."""
    from fedpt.cpu import cpu_flags, has_amx

    flags = cpu_flags() if flags is None else flags
    return 8 if "avx512_bf16" in flags or has_amx(flags) else 15


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


def raw_llamacpp_seconds(engine: Any, prompt: list[int], new_tokens: int) -> tuple[float, list[int]]:
    """A bare llama.cpp greedy loop (C API, one sequence, argmax over the full logits in numpy):
    the reference for P9. Seconds for the ``new_tokens - 1`` steps after the prefill, and the tokens."""
    import numpy as np

    lib = engine.lib
    params = lib.llama_context_default_params()
    params.n_ctx, params.n_batch = len(prompt) + new_tokens + 16, 512
    params.n_threads = params.n_threads_batch = engine.threads
    ctx = lib.llama_init_from_model(engine.model, params)
    try:
        def feed(tokens: list[int]) -> int:
            array = (lib.llama_token * len(tokens))(*tokens)
            if lib.llama_decode(ctx, lib.llama_batch_get_one(array, len(tokens))) != 0:
                raise FedPTError("llama.cpp failed to decode in the reference loop")
            return int(np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx, -1), shape=(engine.n_vocab,)).argmax())

        out = [feed(prompt)]
        start = time.perf_counter()
        while len(out) < new_tokens:
            out.append(feed([out[-1]]))
        return time.perf_counter() - start, out
    finally:
        lib.llama_free(ctx)


def with_random_lora(base: Any, lora_cfg: Any, scale: float = 0.01) -> Any:
    """``base`` with a LoRA adapter whose B is nonzero (B = 0 would make the diff exactly 0):
    speed does not depend on what an adapter learned. Seeded: the same adapter every time."""
    from fedpt.models.lora import attach_lora

    model = attach_lora(base, lora_cfg, seed=0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator).to(param.dtype) * scale)
    return model.eval()


def bench_dtype(cfg: Any, bench: BenchConfig, dtype: str, log: Callable[[str], None]) -> dict[str, Any]:
    """All measurements for one dtype: GEMM bound, decoding (P1, P2), prefill and training (P3)."""
    from fedpt.data.prompts import (
        collate,
        encode_prompts_left,
        encode_sft,
        format_prompt,
    )
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

    made: dict[str, ProxyTunedLM] = {}

    def product() -> ProxyTunedLM:  # kept, to read which step mode its trial chose
        made["product"] = ProxyTunedLM(LocalLogitSource(large), MixedAdapterDiff(small), cfg.proxy.alpha)
        return made["product"]

    sources = {
        "large alone": lambda: LocalLogitSource(large),
        "proxy (product)": product,
        "proxy (product, parts in turn)": lambda: ProxyTunedLM(LocalLogitSource(large), MixedAdapterDiff(small),
                                                               cfg.proxy.alpha, overlap=False),
        "proxy (three-model loop)": lambda: ProxyTunedLM(
            LocalLogitSource(large), TwoSourceDiff(LocalLogitSource(small), LocalLogitSource(small, use_adapter=False)),
            cfg.proxy.alpha, overlap=False),
    }
    engine = llamacpp_engine(cfg.model.large) if bench.llamacpp else None
    if engine is not None:
        from fedpt.models.llamacpp import LlamaCppAdapterDiff

        small_engine = llamacpp_engine(cfg.model.small)
        adapter = small_engine.load_peft_adapter(small)  # the same random adapter, as GGUF
        sources |= {
            "large alone (llamacpp)": engine.source,
            "proxy (llamacpp large)": lambda: ProxyTunedLM(engine.source(), MixedAdapterDiff(small), cfg.proxy.alpha),
            "proxy (all llamacpp)": lambda: ProxyTunedLM(engine.source(), LlamaCppAdapterDiff(small_engine, adapter),
                                                         cfg.proxy.alpha),
        }
    decoding = []
    for batch in bench.batches:
        ids, mask = encode_prompts_left(tokenizer, prompts[:batch], bench.prompt_tokens)
        seconds = {name: float("inf") for name in sources}
        tokens: dict[str, list[list[int]]] = {}
        raw = engine is not None and batch == 1  # P9 is defined at batch 1
        for repeat in range(bench.repeats):
            for name, make in sources.items():  # interleaved: noise hits every source alike
                took, tokens[name] = decode_seconds(make, ids, mask, bench.new_tokens, tokenizer.pad_token_id)
                seconds[name] = min(seconds[name], took)
            if raw:
                took, tokens["llama.cpp bare loop"] = raw_llamacpp_seconds(
                    engine, ids[0][mask[0].bool()].tolist(), bench.new_tokens)
                tokens["llama.cpp bare loop"] = [tokens["llama.cpp bare loop"]]
                seconds["llama.cpp bare loop"] = min(seconds.get("llama.cpp bare loop", float("inf")), took)
        rate = {name: batch * (bench.new_tokens - 1) / s for name, s in seconds.items()}
        row = {"batch": batch, "tok_s": rate,
               "P1_proxy_over_large": rate["proxy (product)"] / rate["large alone"],
               "P1_parts_in_turn": rate["proxy (product, parts in turn)"] / rate["large alone"],
               "steps_overlapped": made["product"].trial.chosen.get(batch),
               "same_tokens_overlapped_vs_in_turn": tokens["proxy (product)"] == tokens["proxy (product, parts in turn)"],
               "P2_proxy_over_three_model_loop": rate["proxy (product)"] / rate["proxy (three-model loop)"],
               "same_tokens_product_vs_loop": tokens["proxy (product)"] == tokens["proxy (three-model loop)"]}
        if engine is not None:
            row["P1_llamacpp_proxy_over_llamacpp_large"] = rate["proxy (llamacpp large)"] / rate["large alone (llamacpp)"]
            row["P1_all_llamacpp"] = rate["proxy (all llamacpp)"] / rate["large alone (llamacpp)"]
            row["all_llamacpp_proxy_over_torch_proxy"] = rate["proxy (all llamacpp)"] / rate["proxy (product)"]
            row["llamacpp_large_over_torch_large"] = rate["large alone (llamacpp)"] / rate["large alone"]
            row["llamacpp_proxy_over_torch_proxy"] = rate["proxy (llamacpp large)"] / rate["proxy (product)"]
            row["greedy_tokens_llamacpp_vs_torch_large"] = _agreement(tokens["large alone (llamacpp)"],
                                                                      tokens["large alone"])
            row["greedy_tokens_all_llamacpp_vs_torch_proxy"] = _agreement(tokens["proxy (all llamacpp)"],
                                                                          tokens["proxy (product)"])
        if raw:
            row["P9_product_llamacpp_over_bare_llamacpp"] = rate["large alone (llamacpp)"] / rate["llama.cpp bare loop"]
            row["same_tokens_product_vs_bare_llamacpp"] = tokens["large alone (llamacpp)"] == tokens["llama.cpp bare loop"]
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


def llamacpp_engine(large_spec: str) -> Any:
    """The large LM in llama.cpp for the benchmark, or None when the bindings are not installed."""
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        return None
    from fedpt.models.llamacpp import LlamaCppModel, gguf_path

    return LlamaCppModel(gguf_path(large_spec))


def _agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Fraction of rows whose greedy continuations are identical."""
    return sum(x == y for x, y in zip(a, b)) / len(a)


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

    def save() -> None:
        # after every part: a slow one (bf16 training on an AVX2-only CPU takes minutes per
        # step; the default job tens of minutes) can be stopped without losing the others
        bench.out.with_suffix(".json").write_text(json.dumps(report, indent=1))
        bench.out.with_suffix(".md").write_text(markdown(report))

    if "decoding" in bench.parts:
        for dtype in dtypes:
            report["results"].append(bench_dtype(cfg, bench, dtype, log))
            save()
    from fedpt import bench_costs

    for part, measure in (("memory", lambda: bench_costs.memory_and_bytes(cfg, log)),
                          ("clients", lambda: bench_costs.clients_memory(cfg, bench.runs, log)),
                          ("job", lambda: bench_costs.default_job(cfg, bench.runs, log))):
        if part in bench.parts:
            report[part] = measure()
            save()
    return report


def markdown(report: dict[str, Any]) -> str:
    lines = [f"`{report['command']}` ({report['date']}); small `{report['small']}`, large `{report['large']}`, "
             f"{report['threads']} torch threads; `auto` is {report['auto_dtype']} on this machine; best of "
             f"{report['bench']['repeats']} interleaved repeats, {report['bench']['new_tokens']} new tokens per row."]
    if report["results"]:
        lines += decoding_markdown(report)
    lines += costs_markdown(report)
    return "\n".join(lines) + "\n"


def costs_markdown(report: dict[str, Any]) -> list[str]:
    """P4-P8 (fedpt.bench_costs), where measured."""
    lines = []
    if "memory" in report:
        mem = report["memory"]
        lines += ["", "| system | device LM | training memory (peak − before load) | peak RSS | seconds | "
                  "bytes per device per round |", "|---|---|---|---|---|---|"]
        for system, d in mem["devices"].items():
            lines.append(f"| {system} | `{d['model']}` ({d['dtype']}, frozen weights {d['frozen_weights']}, "
                         f"{d['steps']} step(s), {d['tokens']} tokens) | "
                         f"{d['training_memory'] / 2**30:.2f} GiB | {d['peak_rss'] / 2**30:.2f} GiB | "
                         f"{d['seconds']:.1f} | {mem['bytes_per_device_per_round'][system] / 2**20:.2f} MiB |")
        lines += ["", f"**P4** device memory, FedPT ÷ FedAvg-large: "
                      f"**{mem['P4_device_memory_fedpt_over_fedavg_large']:.3f}** (target ≤ 0.40); "
                      f"**P5** bytes per device per round: **{mem['P5_bytes_fedpt_over_fedavg_large']:.3f}**"]
    if "clients" in report:
        runs = report["clients"]["runs"]
        lines += ["", "| simulated clients (4 sampled) | peak memory, all processes | largest device process | "
                  "devices trained | seconds |", "|---|---|---|---|---|"]
        for clients, r in runs.items():
            lines.append(f"| {clients} | {r['peak_memory_bytes'] / 2**30:.2f} GiB | "
                         f"{r['device_peak_memory_bytes'] / 2**30:.2f} GiB | {r['devices_trained']} | "
                         f"{r['wall_seconds']:.0f} |")
        lines += ["", f"**P6** simulation peak memory, 100 clients ÷ 4: "
                      f"**{report['clients']['P6_peak_memory_many_over_few']:.3f}** (target ≤ 1.2)"]
    if "job" in report:
        job = report["job"]
        lines += ["", f"Default job (`{job['out']}`"
                      + (", a finished run read back" if job["reused_finished_run"] else "") + "): "
                      f"**P7** wall time **{job['P7_wall_seconds'] / 60:.1f} min** (target ≤ {p7_target_minutes()} "
                      "on this CPU); "
                      f"**P8** peak memory **{job['P8_peak_memory_bytes'] / 2**30:.2f} GiB** all processes "
                      f"(target ≤ 10), largest device process **{job['P8_device_process_peak_bytes'] / 2**30:.2f} GiB** "
                      f"(target ≤ 3); devices trained per round {job['devices_trained_per_round']}."]
        if "phases" in job:
            from fedpt import bench_phases

            lines += ["", *bench_phases.markdown(job["phases"])]
    return lines


def decoding_markdown(report: dict[str, Any]) -> list[str]:
    """P1, P2, P3 and, with llama.cpp, P9."""
    lines = ["", "| dtype | batch | large alone tok/s | proxy (product) tok/s | three-model loop tok/s | "
             "**P1** proxy ÷ large | **P2** proxy ÷ loop | steps overlapped | P1 with the parts in turn |",
             "|---|---|---|---|---|---|---|---|---|"]
    for res in report["results"]:
        for row in res["decoding"]:
            rate = row["tok_s"]
            overlapped = {True: "yes", False: "no"}.get(row.get("steps_overlapped"), "undecided")
            in_turn = row.get("P1_parts_in_turn")
            lines.append(f"| {res['dtype']} | {row['batch']} | {rate['large alone']:.2f} | {rate['proxy (product)']:.2f} | "
                         f"{rate['proxy (three-model loop)']:.2f} | **{row['P1_proxy_over_large']:.3f}** | "
                         f"**{row['P2_proxy_over_three_model_loop']:.3f}** | {overlapped} | "
                         f"{'' if in_turn is None else f'{in_turn:.3f}'} |")
    engine_rows = [(res["dtype"], row) for res in report["results"] for row in res["decoding"]
                   if "large alone (llamacpp)" in row["tok_s"]]
    if engine_rows:
        lines += ["", "The large LM in llama.cpp (its GGUF file; the small LM stays in torch, in the dtype shown):", "",
                  "| dtype | batch | large llama.cpp tok/s | proxy (llama.cpp large, torch small) tok/s | **P1** | "
                  "proxy (all llama.cpp) tok/s | **P1** (all llama.cpp) | llama.cpp ÷ torch, large alone | "
                  "llama.cpp ÷ torch, proxy (large / all) | bare llama.cpp tok/s | **P9** |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for dtype, row in engine_rows:
            rate = row["tok_s"]
            bare = rate.get("llama.cpp bare loop")
            p9 = row.get("P9_product_llamacpp_over_bare_llamacpp")
            lines.append(f"| {dtype} | {row['batch']} | {rate['large alone (llamacpp)']:.2f} | "
                         f"{rate['proxy (llamacpp large)']:.2f} | **{row['P1_llamacpp_proxy_over_llamacpp_large']:.3f}** | "
                         f"{rate['proxy (all llamacpp)']:.2f} | **{row['P1_all_llamacpp']:.3f}** | "
                         f"{row['llamacpp_large_over_torch_large']:.2f} | {row['llamacpp_proxy_over_torch_proxy']:.2f} / "
                         f"{row['all_llamacpp_proxy_over_torch_proxy']:.2f} | "
                         f"{'' if bare is None else f'{bare:.2f}'} | {'' if p9 is None else f'**{p9:.3f}**'} |")
    lines += ["", "| dtype | GEMM bound GFLOP/s | large prefill GFLOP/s | **P3** prefill ÷ bound | "
              "device LoRA step GFLOP/s | **P3** training ÷ bound |", "|---|---|---|---|---|---|"]
    for res in report["results"]:
        lines.append(f"| {res['dtype']} | {res['gemm_bound_gflop_s']:.1f} | {res['prefill']['gflop_s']:.1f} | "
                     f"**{res['prefill']['P3_over_bound']:.2f}** | {res['train_step']['gflop_s']:.1f} | "
                     f"**{res['train_step']['P3_over_bound']:.2f}** |")
    return lines
