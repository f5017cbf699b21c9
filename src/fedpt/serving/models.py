"""What ``fedpt serve`` serves: a plain causal LM, or the proxy-tuned large LM of a finished run."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedpt.errors import FedPTError
from fedpt.models.logits import LocalLogitSource, LogitSource, PrefixCache

# A ChatML template for tokenizers that ship none (the tiny test models): Qwen's turn format.
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@dataclass
class ServedModel:
    """One model behind the API. ``source(alpha)`` gives a fresh LogitSource (its own KV cache)."""

    name: str
    tokenizer: Any
    model: Any  # the plain model, or the large LM of a run
    dtype: str
    small: Any = None  # a run's tuned small LM (PeftModel); None for a plain model
    alpha: float | None = None  # a run's proxy.alpha; None for a plain model
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Plain models: clients that resend a growing sequence (the top-k backend) prefill only what is new.
    prefix_cache: PrefixCache = field(default_factory=PrefixCache)

    def __post_init__(self) -> None:
        from fedpt.models.loading import vocabulary_hash
        from fedpt.proxy import stop_token_ids

        self.eos_ids = stop_token_ids(self.tokenizer)
        self.vocab_size = self.model.get_output_embeddings().weight.shape[0]  # logit width
        self.token_limit = len(self.tokenizer)  # valid input ids are [0, token_limit)
        self.vocab_hash = vocabulary_hash(self.tokenizer)
        if self.tokenizer.chat_template is None:
            self.tokenizer.chat_template = CHATML

    @property
    def is_run(self) -> bool:
        return self.small is not None

    def source(self, alpha: float | None = None) -> LogitSource:
        if not self.is_run:
            return LocalLogitSource(self.model, prefix_cache=self.prefix_cache)
        from fedpt.models.logits import MixedAdapterDiff
        from fedpt.proxy import ProxyTunedLM

        return ProxyTunedLM(LocalLogitSource(self.model), MixedAdapterDiff(self.small),
                            self.alpha if alpha is None else alpha)


def load_plain(spec: str, dtype: str, name: str | None = None) -> ServedModel:
    from fedpt.models.loading import load_model, load_tokenizer, resolve_dtype

    dtype = resolve_dtype(dtype)  # the dtype on the wire too: a concrete one
    return ServedModel(name or spec, load_tokenizer(spec), load_model(spec, dtype), dtype)


def load_run(run_dir: Path, system: str | None, dtype: str | None, name: str | None = None) -> ServedModel:
    """The proxy-tuned large LM of ``run_dir``: its large LM steered by ``system``'s small adapter."""
    from peft import PeftModel

    from fedpt.config import load_config
    from fedpt.models.loading import check_logit_width, load_model, load_tokenizer, resolve_dtype
    from fedpt.systems import SYSTEM_SPECS

    config_path = run_dir / "config.toml"
    if not config_path.is_file():
        raise FedPTError(f"{run_dir} is not a fedpt run directory (no config.toml); give --run the --out of a run")
    cfg = load_config(path=config_path)
    if cfg.model.large_backend in ("remote", "openai"):  # llamacpp: the same weights are here, served by torch
        raise FedPTError(f"run {run_dir} used a {cfg.model.large_backend} large LM (no weights here); "
                         "serve the proxy where its large LM's weights are")
    proxied = [s for s in cfg.run.systems if SYSTEM_SPECS[s].proxy]
    system = system or (proxied[0] if proxied else None)
    if system is None or system not in proxied:
        raise FedPTError(f"run {run_dir} has no proxy-tuned system '{system}'; "
                         f"choose --system from: {', '.join(proxied) or 'none (the run tuned no small adapter)'}")
    adapter_dir = run_dir / system / "adapter"
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FedPTError(f"{adapter_dir} holds no adapter: the run did not finish system '{system}'")
    dtype = resolve_dtype(dtype or cfg.model.dtype)
    large, small_base = load_model(cfg.model.large, dtype), load_model(cfg.model.small, dtype)
    check_logit_width(small_base, large, cfg.model.small, cfg.model.large)
    small = PeftModel.from_pretrained(small_base, adapter_dir).eval()
    return ServedModel(name or f"{run_dir.name}/{system}", load_tokenizer(cfg.model.small), large, dtype,
                       small=small, alpha=cfg.proxy.alpha)
