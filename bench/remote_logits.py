"""Proxy-tuned decoding with the large LM behind `fedpt serve` (remote full logits, loopback) vs in-process.

    python bench/remote_logits.py [--small qwen2.5-coder-0.5b-instruct] [--large qwen2.5-coder-1.5b-instruct]
                                  [--adapter runs/default/fedpt/adapter] [--batches 1,8] [--repeats 3]
                                  [--new-tokens 32] [--prompt-tokens 64] [--out bench/results/remote_logits]

Starts `fedpt serve --model LARGE` on 127.0.0.1 (a free port), then decodes the same prompts
greedily with ``ProxyTunedLM(large, MixedAdapterDiff(small+adapter), alpha)`` where the large
LM is either the local model (``LocalLogitSource``) or the service (``RemoteLogitSource``, bf16
logits on the wire, the model's own dtype: lossless). Runs alternate local/remote in one process
(interleaved, so a busy machine slows both alike); reported per backend and batch size, best
of ``--repeats`` passes (the first pass is counted too: best-of drops its warm-up cost):
decode tokens/s (the steps after the prefill, where the service's per-step round trip is paid)
and end-to-end tokens/s (prefill included), and their ratios remote / local. Both backends must generate the same
tokens (checked). Without ``--adapter`` (or when it does not exist) a LoRA adapter with random
nonzero B stands in: the speed does not depend on what the adapter learned.
Writes ``OUT.json`` and ``OUT.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import fedpt  # noqa: F401  (before torch: sets MKL_CBWR, which MKL reads when torch loads it)
import torch


def small_with_adapter(spec: str, dtype: str, adapter: Path | None):
    from peft import PeftModel

    from fedpt.bench import with_random_lora
    from fedpt.config import LoraConfig
    from fedpt.models.loading import load_model

    base = load_model(spec, dtype)
    if adapter is not None and (adapter / "adapter_config.json").is_file():
        return PeftModel.from_pretrained(base, adapter).eval(), str(adapter)
    return with_random_lora(base, LoraConfig()), "random LoRA (B ~ N(0, 0.01^2), rank 8, q/k/v/o)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--large", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--adapter", type=Path, default=Path("runs/default/fedpt/adapter"))
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=64, help="prompts keep their last N tokens")
    parser.add_argument("--threads", type=int, default=0, help="torch threads, both processes (0 = all cores)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/remote_logits"))
    args = parser.parse_args()

    from fedpt.data.prompts import encode_prompts_left, format_prompt
    from fedpt.data.records import load_examples
    from fedpt.models.loading import load_model, load_tokenizer
    from fedpt.models.logits import LocalLogitSource, MixedAdapterDiff
    from fedpt.models.remote import LogitsService, RemoteLogitSource
    from fedpt.proxy import DecodeSession, Decoding, ProxyTunedLM
    from fedpt.serving.launch import launch

    if args.threads:
        torch.set_num_threads(args.threads)
    served = launch(["--model", args.large, "--dtype", args.dtype, "--threads", str(args.threads)])
    url = served.url
    try:
        tokenizer = load_tokenizer(args.small)
        small, adapter_name = small_with_adapter(args.small, args.dtype, args.adapter)
        large = load_model(args.large, args.dtype)
        service = LogitsService(url)
        assert service.info()["vocab_size"] == large.get_output_embeddings().weight.shape[0]
        batches = [int(b) for b in args.batches.split(",")]
        examples = load_examples("builtin:dolly-15k")[: max(batches)]
        prompts = [format_prompt(ex, "alpaca", tokenizer) for ex in examples]
        cfg = Decoding(max_new_tokens=args.new_tokens)  # greedy
        backends = {"local": lambda: LocalLogitSource(large), "remote": lambda: RemoteLogitSource(service)}
        times: dict[str, dict[int, list[tuple[float, float]]]] = {name: {b: [] for b in batches} for name in backends}
        outputs: dict[tuple[str, int], list[list[int]]] = {}
        for batch in batches:
            ids, mask = encode_prompts_left(tokenizer, prompts[:batch], args.prompt_tokens)
            for repeat in range(args.repeats):
                for name, make in backends.items():
                    # greedy, fixed length: no stop ids, so every pass makes the same number of tokens
                    session = DecodeSession(ProxyTunedLM(make(), MixedAdapterDiff(small), args.alpha), ids, mask,
                                            [], tokenizer.pad_token_id, cfg)
                    start = time.perf_counter()
                    tokens = [session.advance()[0]]  # prefill + first token
                    prefilled = time.perf_counter()
                    while not session.done:
                        tokens.append(session.advance()[0])
                    end = time.perf_counter()
                    session.close()
                    times[name][batch].append((prefilled - start, end - prefilled))
                    outputs[(name, batch)] = torch.stack(tokens, 1).tolist()
                    print(f"batch {batch} {name:<6} pass {repeat}: prefill {prefilled - start:6.2f} s, decode "
                          f"{batch * (args.new_tokens - 1) / (end - prefilled):6.2f} tok/s", file=sys.stderr, flush=True)
            same = outputs[("local", batch)] == outputs[("remote", batch)]
            print(f"batch {batch}: remote tokens {'==' if same else '!='} local tokens", file=sys.stderr)
        service.close()
    finally:
        served.stop(timeout=60)

    rows = []
    for batch in batches:
        decode = {name: batch * (args.new_tokens - 1) / min(t[1] for t in times[name][batch]) for name in backends}
        total = {name: batch * args.new_tokens / min(sum(t) for t in times[name][batch]) for name in backends}
        rows.append({"batch": batch, "local_decode_tok_s": decode["local"], "remote_decode_tok_s": decode["remote"],
                     "decode_ratio": decode["remote"] / decode["local"], "local_total_tok_s": total["local"],
                     "remote_total_tok_s": total["remote"], "total_ratio": total["remote"] / total["local"],
                     "same_tokens": outputs[("local", batch)] == outputs[("remote", batch)],
                     "seconds_prefill_decode": {name: times[name][batch] for name in backends}})
    result = {"small": args.small, "large": args.large, "dtype": args.dtype, "adapter": adapter_name,
              "alpha": args.alpha, "new_tokens": args.new_tokens, "prompt_tokens": args.prompt_tokens, "repeats": args.repeats,
              "threads": torch.get_num_threads(), "command": "python " + " ".join(sys.argv), "rows": rows,
              "date": time.strftime("%Y-%m-%d %H:%M")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = [f"Proxy-tuned greedy decoding, prompts cut to their last {args.prompt_tokens} tokens, {args.new_tokens} "
             "new tokens per row; the large LM in-process vs. behind `fedpt serve` on loopback (logits in the "
             f"model dtype on the wire: lossless); best of {args.repeats} interleaved passes.",
             f"Models: `{args.small}` + `{args.large}` ({args.dtype}), adapter: {adapter_name}, alpha {args.alpha}, "
             f"{torch.get_num_threads()} torch threads per process. Command: `{result['command']}` ({result['date']}).",
             "", "| batch | decode tok/s local | decode tok/s remote | **remote / local (decode)** | "
             "end-to-end tok/s local | remote | remote / local (end-to-end) | same tokens |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['batch']} | {r['local_decode_tok_s']:.2f} | {r['remote_decode_tok_s']:.2f} | "
              f"**{r['decode_ratio']:.3f}** | {r['local_total_tok_s']:.2f} | {r['remote_total_tok_s']:.2f} | "
              f"{r['total_ratio']:.3f} | {'yes' if r['same_tokens'] else 'no'} |" for r in rows]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
