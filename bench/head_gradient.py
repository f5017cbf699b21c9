"""A device step's LM head: its gradient taken in the forward pass vs a checkpointed chunk, side by side.

    OMP_NUM_THREADS=1 python bench/head_gradient.py [--batches 4] [--repeats 2] [--out bench/results/head_gradient]

``response_loss`` runs the LM head on labelled positions only, a chunk at a time. With the head
frozen (LoRA), each chunk's gradient with respect to the hidden states can be taken while its logits
exist: two products with the head per token. Checkpointing the chunk instead computes its logits
twice (forward, then again in the backward pass) before the backward product: three. On
Qwen2.5-0.5B the head (151,936 x 896) is a quarter of the weights. This runs ``--batches`` packed
device steps of the qwen-cpu preset (4 Dolly rows each, the device's model, activation
checkpointing, one thread as a simulated device has), both ways alternating batch by batch over
``--repeats`` rounds, and checks that the loss and every LoRA gradient are the same bit for bit.
Prints seconds per step, the ratio and the CPU; writes ``OUT.json`` and ``OUT.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="bench/results/head_gradient")
    args = parser.parse_args()

    from device_threads import device_stepper

    import torch

    from fedpt.cpu import cpu_summary
    from fedpt.data.prompts import pack
    from fedpt.train import response_loss

    model, rows_of, _ = device_stepper()

    def step(rows: list, in_forward: bool) -> tuple[float, torch.Tensor, dict[str, torch.Tensor]]:
        started = time.perf_counter()
        loss = response_loss(model, pack(rows), head_gradient_in_forward=in_forward)
        loss.backward()
        seconds = time.perf_counter() - started
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return seconds, loss.detach(), grads

    seconds = {True: [], False: []}
    identical, tokens = True, 0
    for repeat in range(args.repeats):
        for b in range(args.batches):
            rows = rows_of(b)
            tokens += sum(len(ids) for ids, _ in rows) if repeat == 0 else 0
            order = (True, False) if (repeat + b) % 2 == 0 else (False, True)  # alternate who goes first
            results = {}
            for in_forward in order:
                results[in_forward] = step(rows, in_forward)
                seconds[in_forward].append(results[in_forward][0])
                print(f"repeat {repeat} batch {b} {'in forward ' if in_forward else 'checkpointed'}: "
                      f"{results[in_forward][0]:.1f} s, loss {results[in_forward][1].item():.6f}", flush=True)
            a, c = results[True], results[False]
            identical &= torch.equal(a[1], c[1]) and a[2].keys() == c[2].keys() and all(
                torch.equal(a[2][n], c[2][n]) for n in a[2])
    fused, ckpt = sum(seconds[True]), sum(seconds[False])
    data = {"cpu": cpu_summary(), "threads": torch.get_num_threads(), "batches": args.batches,
            "repeats": args.repeats, "tokens_per_pass": tokens, "seconds_in_forward": fused,
            "seconds_checkpointed": ckpt, "ratio": fused / ckpt, "bit_identical": identical}
    lines = [f"# The LM head's gradient in the forward pass vs a checkpointed chunk ({data['cpu']})", "",
             f"`OMP_NUM_THREADS={data['threads']} python bench/head_gradient.py --batches {args.batches} "
             f"--repeats {args.repeats}`: {args.batches} packed device steps ({tokens} tokens) x {args.repeats}, "
             "alternating.", "",
             "| head gradient | seconds (all steps) | per step |", "|---|---|---|",
             f"| checkpointed chunk (3 head products) | {ckpt:.1f} | {ckpt / len(seconds[False]):.1f} |",
             f"| in the forward pass (2) | {fused:.1f} | {fused / len(seconds[True]):.1f} |", "",
             f"Ratio **{data['ratio']:.3f}**; loss and LoRA gradients bit-identical: **{identical}**."]
    from fedpt.bench import write_results

    write_results(args.out, data, lines)


if __name__ == "__main__":
    main()
