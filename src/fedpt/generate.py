"""Answer a prompt with a finished run's models: the proxy-tuned large LM by default."""

from __future__ import annotations

from pathlib import Path

from fedpt.config import load_config
from fedpt.data.prompts import format_prompt
from fedpt.data.records import Example
from fedpt.errors import FedPTError
from fedpt.systems import SYSTEM_SPECS

MODELS = ("proxy", "small", "large")


def generate_answer(run_dir: Path, prompt: str, alpha: float | None = None, system: str | None = None,
                    model: str = "proxy", max_new_tokens: int | None = None) -> str:
    """Greedy answer from ``model`` (proxy-tuned large, tuned small, or plain large) of ``run_dir``."""
    from peft import PeftModel

    from fedpt.models.loading import load_model, load_tokenizer
    from fedpt.models.logits import LocalLogitSource, MixedAdapterDiff
    from fedpt.proxy import Decoding, ProxyTunedLM, generate_ids

    config_path = run_dir / "config.toml"
    if not config_path.is_file():
        raise FedPTError(f"{run_dir} is not a fedpt run directory (no config.toml); give --run the --out of a run")
    cfg = load_config(path=config_path)
    system = system or next((s for s in cfg.run.systems if SYSTEM_SPECS[s].device_model == "small"),
                            cfg.run.systems[0])
    if system not in cfg.run.systems:
        raise FedPTError(f"run {run_dir} has no system '{system}'; it ran: {', '.join(cfg.run.systems)}")
    adapter_dir = run_dir / system / "adapter"
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FedPTError(f"{adapter_dir} holds no adapter: the run did not finish system '{system}'")
    spec = SYSTEM_SPECS[system]
    if spec.device_model == "large" and model != "large":
        raise FedPTError(f"system '{system}' tuned the large LM itself: use --model large")
    tokenizer = load_tokenizer(cfg.model.small)
    if spec.device_model == "large":
        source = LocalLogitSource(PeftModel.from_pretrained(load_model(cfg.model.large, cfg.model.dtype), adapter_dir))
    elif model == "large":
        source = LocalLogitSource(load_model(cfg.model.large, cfg.model.dtype))
    else:
        small = PeftModel.from_pretrained(load_model(cfg.model.small, cfg.model.dtype), adapter_dir)
        source = LocalLogitSource(small) if model == "small" else ProxyTunedLM(
            LocalLogitSource(load_model(cfg.model.large, cfg.model.dtype)), MixedAdapterDiff(small),
            cfg.proxy.alpha if alpha is None else alpha)
    text = format_prompt(Example(prompt), cfg.data.template, tokenizer)
    decoding = Decoding(max_new_tokens=max_new_tokens or cfg.eval.max_new_tokens)
    ids = generate_ids(source, tokenizer, [text], decoding, 1, cfg.data.max_prompt_tokens)
    return tokenizer.decode(ids[0], skip_special_tokens=True).strip()
