"""The server's models and its side of a round: steps 4 (proxy-tune) and 5 (distill), and evaluation.

``ServerModels`` holds the tokenizer, the small LM with its LoRA adapter (tuned view =
adapter on, base view = adapter off) and the large LM, which it only ever queries through a
``LogitSource`` (next-token logits). The large LM gets an adapter of its own only for the
fedavg-large baseline, which is white-box by definition. No Flower here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedpt import profile
from fedpt.config import FedPTConfig
from fedpt.data.prompts import format_prompt
from fedpt.data.records import (
    Example,
    Splits,
    check_disjoint,
    load_eval_set,
    load_examples,
    source_name,
    split_examples,
)
from fedpt.distill import DistillResult, distill
from fedpt.errors import FedPTError
from fedpt.eval_cache import EvalCache, adapter_digest
from fedpt.evaluate import EvalResult, evaluate_rouge_sets, example_id
from fedpt.models.logits import LocalLogitSource, LogitSource, MixedAdapterDiff
from fedpt.models.lora import adapter_is_identity, attach_lora, get_adapter_state, set_adapter_state
from fedpt.proxy import ProxyTunedLM


def load_splits(cfg: FedPTConfig) -> Splits:
    return split_examples(load_examples(cfg.data.source, cfg.data.fields), cfg.data.eval_size, cfg.data.kd_pool_size,
                          cfg.data.split_seed)


def load_eval_sets(cfg: FedPTConfig, splits: Splits) -> dict[str, list[Example]]:
    """Named evaluation sets: the held-out split of the training source first, then ``data.eval_sets``.

    Each extra set is checked to share no prompt with device data or the KD pool.
    """
    sets = {source_name(cfg.data.source): splits.eval}
    extra = {source_name(src): load_eval_set(src, cfg.data.eval_sets_size, cfg.data.split_seed, cfg.data.fields)
             for src in cfg.data.eval_sets}
    check_disjoint(splits, extra)
    return sets | extra


def large_logit_source(cfg: FedPTConfig, small_base: Any) -> tuple[Any, Callable[[], LogitSource]]:
    """The large LM as ``model.large_backend`` says: (local model or None, factory of LogitSources).

    The one place that picks the backend. ``remote`` and ``openai`` load no large weights here:
    the large LM stays a black box behind its service. Every backend's logit width must equal
    the small LM's (proxy arithmetic adds logits index by index).
    """
    from fedpt.models.loading import check_logit_width, load_model

    model = cfg.model
    if model.large_backend == "local":
        large = load_model(model.large, model.dtype)
        check_logit_width(small_base, large, model.small, model.large)
        return large, lambda: LocalLogitSource(large, use_adapter=False)
    if model.large_backend == "llamacpp":  # frozen weights run by llama.cpp from the GGUF file
        from fedpt.models.llamacpp import LlamaCppModel, gguf_path

        engine = LlamaCppModel(gguf_path(model.large))
        width = small_base.get_output_embeddings().weight.shape[0]
        if engine.n_vocab != width:
            raise FedPTError(f"small model '{model.small}' outputs {width} logits but the GGUF of large model "
                             f"'{model.large}' has {engine.n_vocab} tokens; proxy-tuning needs equal widths")
        return None, engine.source
    if model.large_backend == "remote":
        from fedpt.models.remote import (
            LogitsService,
            RemoteLogitSource,
            check_remote_width,
            read_api_key,
        )

        service = LogitsService(model.large_url, read_api_key(model.large_api_key_file))
        check_remote_width(service, small_base, model.small)
        return None, lambda: RemoteLogitSource(service)
    from fedpt.models.openai_topk import (
        openai_logit_source,  # top-k log-probabilities only
    )

    return None, openai_logit_source(cfg, small_base)


def evaluation_engines(cfg: FedPTConfig) -> dict[str, str]:
    """Which engine computes each evaluated model and the KD teacher (summary.json records it)."""
    model = cfg.model
    tuned = "llama.cpp" if model.eval_engine == "llamacpp" else "torch"
    large = {"local": "torch", "llamacpp": "llama.cpp"}.get(model.large_backend, model.large_backend)
    views = "llama.cpp" if model.small_proxy_backend == "llamacpp" else "torch"
    proxy = f"large LM: {large}; small LM's tuned and base views: {views}"
    return {"small (pretrained and tuned)": tuned, "large (pretrained)": large,
            "large (tuned by fedavg-large)": tuned, "proxy": proxy, "kd teacher": proxy}


@dataclass
class ServerModels:
    cfg: FedPTConfig
    tokenizer: Any
    small: Any  # PeftModel over the small base
    large: Any  # the local large LM (a PeftModel only when fedavg-large runs); None with a remote backend
    splits: Splits
    eval_sets: dict[str, list[Example]]
    initial: dict[str, dict[str, Any]] = field(default_factory=dict)  # adapters before any training
    eval_cache: EvalCache | None = None  # finished (model, set) evaluations: see fedpt.eval_cache

    large_source: Callable[[], LogitSource] | None = None  # a fresh black-box LogitSource per call
    small_engine: Any = None  # the small LM in llama.cpp (model.small_proxy_backend = "llamacpp")
    large_engine: Any = None  # the large LM in llama.cpp (model.large_backend = "llamacpp")

    @classmethod
    def load(cls, cfg: FedPTConfig, splits: Splits, large_trainable: bool,
             run_dir: Path | None = None, distils: bool = False) -> ServerModels:
        """``run_dir``: where finished evaluations are kept (``<run_dir>/eval-cache``), so a stop
        loses at most the set being decoded; None keeps them in memory. ``distils``: the torch
        small LM is the KD student (a training run), not only a model to decode."""
        with profile.phase("model loading (server)"):
            return cls._load(cfg, splits, large_trainable, run_dir, distils)

    @classmethod
    def _load(cls, cfg: FedPTConfig, splits: Splits, large_trainable: bool, run_dir: Path | None,
              distils: bool) -> ServerModels:
        from fedpt.eval_cache import FOLDER
        from fedpt.models.loading import load_model, load_model_for_training, load_tokenizer

        tokenizer = load_tokenizer(cfg.model.small)
        # Fresh copies, not the per-process cache: peft injects adapters into the base in place.
        # When llama.cpp decodes every view of the small LM, torch only trains it (the KD student):
        # its frozen base then stays as stored and is upcast layer by layer, as on devices
        # (``load_model_for_training``: the same numbers in half the memory on fp32 CPUs). Torch
        # decoding keeps full-width weights: it is bound by reading them.
        decoded_by_llamacpp = cfg.model.eval_engine == "llamacpp" and cfg.model.small_proxy_backend == "llamacpp"
        load_small = load_model_for_training if distils and decoded_by_llamacpp else load_model
        small_base = load_small(cfg.model.small, cfg.model.dtype)
        large, large_source = large_logit_source(cfg, small_base)
        small = attach_lora(small_base, cfg.lora, seed=cfg.run.seed)
        if large_trainable:  # fedavg-large: the devices' adapter lives on a torch copy (white box)
            if large is None:  # evaluated in llama.cpp (model.eval_engine): torch holds the adapter only
                large = load_model(cfg.model.large, cfg.model.dtype)
            large = attach_lora(large, cfg.lora, seed=cfg.run.seed)
        initial = {"small": get_adapter_state(small)}
        if large_trainable:
            initial["large"] = get_adapter_state(large)
        small_engine = None
        if cfg.model.small_proxy_backend == "llamacpp":
            from fedpt.models.llamacpp import LlamaCppModel, gguf_path

            small_engine = LlamaCppModel(gguf_path(cfg.model.small))
        # llama.cpp's factory is the bound `LlamaCppModel.source`: its model also evaluates tuned large LMs
        large_engine = large_source.__self__ if cfg.model.large_backend == "llamacpp" else None
        return cls(cfg, tokenizer, small, large, splits, load_eval_sets(cfg, splits), initial,
                   eval_cache=EvalCache(cfg.to_dict(), run_dir / FOLDER if run_dir is not None else None),
                   large_source=large_source, small_engine=small_engine, large_engine=large_engine)

    # -- adapters ----------------------------------------------------------------------------

    def initial_adapter(self, device_model: str) -> dict[str, Any]:
        """Every system of a run starts from the same adapter, whatever ran before it."""
        return self.initial[device_model]

    def load_adapter(self, device_model: str, state: dict[str, Any]) -> None:
        set_adapter_state(self.model(device_model), state)

    def adapter_state(self, device_model: str) -> dict[str, Any]:
        return get_adapter_state(self.model(device_model))

    def model(self, device_model: str) -> Any:
        return self.small if device_model == "small" else self.large

    # -- step 4: proxy-tuning ---------------------------------------------------------------

    def large_logits(self) -> LogitSource:
        """The black-box large LM: logits only (a local one's adapter, if any, stays off)."""
        if self.large_source is not None:
            return self.large_source()
        return LocalLogitSource(self.large, use_adapter=False)

    def proxy_tune(self, alpha: float | None = None) -> ProxyTunedLM:
        """The proxy-tuned large LM for the small adapter currently loaded."""
        return ProxyTunedLM(self.large_logits(), self.small_diff(), self.cfg.proxy.alpha if alpha is None else alpha)

    def small_diff(self) -> Any:
        """``z_small_tuned - z_small_base`` for the loaded adapter, where ``model.small_proxy_backend`` says."""
        if self.small_engine is None:
            return MixedAdapterDiff(self.small)
        from fedpt.models.llamacpp import LlamaCppAdapterDiff

        return LlamaCppAdapterDiff(self.small_engine, self.small_engine.load_peft_adapter(self.small))

    # -- the models as evaluated ---------------------------------------------------------------

    def tuned_source(self, device_model: str) -> LogitSource:
        """The small LM (or fedavg-large's large LM) with its loaded adapter, in the run's evaluation engine.

        ``model.eval_engine = "llamacpp"``: the GGUF file plus the adapter exported to a GGUF LoRA
        (llama.cpp applies it at alpha / r, as peft does), so every system is judged by one engine.
        """
        model = self.model(device_model)
        if self.cfg.model.eval_engine != "llamacpp":
            return LocalLogitSource(model)
        engine = self.small_engine if device_model == "small" else self.large_engine
        if adapter_is_identity(model):  # round 0: the pretrained model; no adapter, no LoRA products,
            return engine.source()      # and its prompts' states serve the base view later (PromptStates)
        return engine.source(engine.load_peft_adapter(model))

    # -- step 5: distillation ---------------------------------------------------------------

    def distill(self, server_round: int, after_step: Callable[[int], None] | None = None) -> DistillResult:
        """Distill the proxy-tuned large LM into the loaded small adapter, in place."""
        teacher = self.proxy_tune()
        prompts = [format_prompt(ex, self.cfg.data.template, self.tokenizer) for ex in self.splits.kd_pool]
        return distill(teacher, self.small, self.tokenizer, prompts, self.cfg.distill, self.cfg.data,
                       seed=self.cfg.run.seed * 1000 + server_round, after_step=after_step)

    # -- evaluation -------------------------------------------------------------------------

    def identity(self, role: str, alpha: float | None = None) -> str:
        """What an evaluated model is, for ``evaluate``'s cache: the role plus a digest of the adapter
        that defines it (the small one for the proxy, with its alpha)."""
        digest = adapter_digest(self.adapter_state("large" if role == "large" else "small"))
        if role == "proxy":
            return f"proxy@{digest}@alpha={self.cfg.proxy.alpha if alpha is None else alpha:g}"
        return f"{role}@{digest}"

    def evaluate(self, source: LogitSource, identity: str | None = None, progress: Any = None,
                 label: str = "") -> dict[str, EvalResult]:
        """Rouge-L on every evaluation set. With ``identity`` (``"small"``/``"large"`` for the
        pretrained models, shared by every system; ``identity(role)`` after training) each set's
        result is kept in ``eval_cache`` as soon as it is done and reused instead of recomputed.
        ``progress`` (a ``fedpt.progress.PromptProgress``) is told of every set and batch as ``label``."""
        from fedpt.evaluate import decodings

        seeds = len(decodings(self.cfg.eval))
        results, todo, keys = {}, {}, {}
        for name, examples in self.eval_sets.items():
            key = (self.eval_cache.key(identity, name, [example_id(ex) for ex in examples])
                   if identity is not None and self.eval_cache is not None else None)
            cached = self.eval_cache.get(key) if key is not None else None
            if cached is None:
                todo[name], keys[name] = examples, key
                continue
            results[name] = cached
            if progress is not None:
                progress.start(label, name, len(examples), seeds)
                progress.advance(len(examples) * seeds)
                progress.done(label, name, cached)

        def keep(name: str, result: EvalResult) -> None:  # as soon as a set is done: a stop loses no finished set
            if keys[name] is not None:
                self.eval_cache.put(keys[name], result)
            if progress is not None:
                progress.done(label, name, result)

        groups = [list(todo)] if self.cfg.eval.pack_sets and todo else [[name] for name in todo]
        for group in groups:
            if progress is not None:
                progress.start(label, " + ".join(group), sum(len(todo[name]) for name in group), seeds)
            with profile.phase(f"evaluation: {label or 'model'}"):
                results.update(evaluate_rouge_sets(source, self.tokenizer, {name: todo[name] for name in group},
                                                   self.cfg.eval, self.cfg.data, on_set=keep,
                                                   on_prompts=progress.advance if progress is not None else None))
        return {name: results[name] for name in self.eval_sets}
