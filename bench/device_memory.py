"""Peak RSS of one device's LoRA step (qwen-cpu preset, 4 x 320 tokens) in a fresh process: python bench/device_memory.py {on|off} (activation checkpointing)."""
import fedpt  # noqa: F401
import resource, sys, time, torch
from fedpt.config import load_config
from fedpt.data.records import load_examples
from fedpt.models.loading import load_model, load_tokenizer
from fedpt.models.lora import attach_lora
from fedpt.train import local_tune
torch.set_num_threads(1)  # as a Ray device actor
cfg = load_config(overrides=[f"train.gradient_checkpointing={'true' if sys.argv[1] == 'on' else 'false'}",
                             "train.steps=1"])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
model = attach_lora(load_model(cfg.model.small, cfg.model.dtype), cfg.lora, seed=0)
loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
examples = sorted(load_examples(cfg.data.source), key=lambda e: -len(e.response))[:4]  # full 320-token rows
t = time.perf_counter()
result = local_tune(model, load_tokenizer(cfg.model.small), examples, cfg.data, cfg.train, seed=0)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(f"checkpointing {sys.argv[1]}: dtype {next(model.parameters()).dtype}, tokens {result.tokens}, "
      f"step {time.perf_counter() - t:.1f} s, loss {result.loss:.4f}, RSS after load {loaded / 2**20:.2f} GiB, "
      f"peak {peak / 2**20:.2f} GiB, training adds {(peak - loaded) / 2**20:.2f} GiB", flush=True)
