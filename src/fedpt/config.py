"""Typed run configuration: one dataclass per concern, loaded from TOML, overridable by ``--set``.

A config file has one table per section below (``[model]``, ``[lora]``, ...). Every key is
optional; missing keys take the defaults shown here. ``--set train.lr=1e-3`` overrides one
key after the file is read; its value is parsed as TOML (so ``'["q_proj","v_proj"]'`` is a
list) and falls back to a plain string.

This module knows no torch objects: it is imported by the CLI before anything heavy loads.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from fedpt.errors import FedPTError

DEFAULT_PRESET = "qwen-cpu"  # the real pair; `tiny` is for tests and quick looks
SYSTEMS = ("fedpt", "fedavg-small", "fedavg-large", "fedavg-pt")
DTYPES = ("auto", "float32", "bfloat16", "float16")
AGGREGATIONS = ("fedavg", "median", "trimmed-mean", "krum")
LARGE_BACKENDS = ("local", "llamacpp", "auto", "remote", "openai")
SMALL_PROXY_BACKENDS = ("torch", "llamacpp", "auto")
EVAL_ENGINES = ("torch", "llamacpp", "auto")


def auto_large_backend(large: str, systems: list[str]) -> str:
    """``model.large_backend = "auto"``: llama.cpp for a frozen large LM it can run, torch otherwise.

    llama.cpp needs its bindings and a GGUF file (registered models and built-in tiny models have
    one; a ``.gguf`` spec is one); fedavg-large trains the large LM, which only torch can.
    """
    import importlib.util

    if "fedavg-large" in systems or not _has_gguf(large) or importlib.util.find_spec("llama_cpp") is None:
        return "local"
    return "llamacpp"


def auto_eval_engine(model: "ModelConfig") -> str:
    """``model.eval_engine = "auto"``: the engine that decodes faster on this CPU.

    Measured (docs/performance.md): llama.cpp decodes the large LM 2.2x faster than torch fp32 at
    batch 8 on an AVX2-only EPYC, and 6.7x / about as fast as torch bf16 at batch 1 / 8 on an
    AVX-512-BF16 EPYC; on an AMX Xeon torch bf16 is 1.3x llama.cpp at batch 8 (AMX matmuls,
    and llama.cpp's AMX buffers are off there: they crash). So llama.cpp except on AMX CPUs;
    torch when llama.cpp cannot run both models (no bindings, no GGUF file, a pinned backend).
    """
    import importlib.util

    from fedpt.cpu import has_amx

    usable = (importlib.util.find_spec("llama_cpp") is not None and _has_gguf(model.large) and _has_gguf(model.small)
              and model.large_backend in ("auto", "llamacpp") and model.small_proxy_backend in ("auto", "llamacpp"))
    return "llamacpp" if usable and not has_amx() else "torch"


def _has_gguf(spec: str) -> bool:
    """Registered and built-in tiny models have (or export) a GGUF file; a ``.gguf`` spec is one."""
    from fedpt.models.assets import ASSETS
    from fedpt.models.tiny import TINY_SHAPES

    return spec in ASSETS or spec in TINY_SHAPES or spec.endswith(".gguf")


@dataclass
class ModelConfig:
    """Which causal-LM pair to use. Each spec is a local directory, a ``.gguf`` file, a hub id
    (when a hub is reachable) or a built-in name (``tiny-small``, ``tiny-large``)."""

    small: str = "tiny-small"
    large: str = "tiny-large"  # with a non-local backend: the served model's name (informational)
    # "auto": bfloat16 where the CPU has fast bf16 matmuls (AVX-512/AMX; 2-2.5x faster than fp32
    # there), float32 elsewhere (AVX2-only CPUs run bf16 GEMMs ~5x slower than fp32).
    dtype: str = "auto"
    # Where the large LM's logits come from: "local" (weights loaded here, in torch), "llamacpp"
    # (its GGUF file run by llama.cpp in this process: frozen, logits only, several times faster
    # on a CPU), "remote" (full logits from `fedpt serve`, black box) or "openai" (top-k
    # log-probabilities from any OpenAI-compatible completions endpoint). Only "local" loads the
    # large LM into torch (fedavg-large, which trains it, needs that). "auto" picks "llamacpp"
    # when its bindings are installed and the large LM has a GGUF file, else "local"; the run's
    # config.toml records which.
    large_backend: str = "local"
    large_url: str = ""  # remote/openai: the service's base URL, e.g. http://127.0.0.1:8000
    large_api_key_file: str = ""  # remote/openai: file holding the API key ("" = none)
    # openai: the proxy is restricted to the large LM's top-k tokens (fedpt.models.openai_topk).
    large_model_name: str = ""  # openai: the request's `model`; "" = the one model the server lists
    large_topk: int = 20  # openai: log-probabilities per position (OpenAI allows 5, vLLM 20 unless --max-logprobs)
    # Where the small LM's tuned and base views run when they steer the large LM (proxy
    # evaluation, the distillation teacher): "torch" (one doubled peft batch) or "llamacpp" (its
    # GGUF file, the round's adapter exported to GGUF). Devices and the student always train in
    # torch. "auto": llamacpp when the large LM runs there too and the small LM has a GGUF file.
    small_proxy_backend: str = "torch"
    # Which engine evaluates the run's models (and so judges every system alike): "torch" (the
    # small LM and a tuned large LM in torch; the large LM and the proxy's small views where the two
    # keys above say) or "llamacpp" (every evaluated model and the KD teacher in llama.cpp, whatever
    # the two keys above say; a remote/openai large LM is refused: the GGUF
    # files, a round's LoRA adapter exported to GGUF, for the small LM and for fedavg-large's large
    # LM alike; training stays in torch). "auto": llama.cpp where it decodes faster than torch on
    # this CPU (AVX2-only and AVX-512 CPUs), torch on AMX CPUs (bf16 AMX matmuls beat it at batch 8)
    # and without the bindings or GGUF files. config.toml records the choice.
    eval_engine: str = "torch"

    @property
    def chosen_by_auto(self) -> set[str]:
        """The backend keys "auto" resolved in this process (not saved: config.toml holds the choice)."""
        return self.__dict__.setdefault("_chosen_by_auto", set())

    def validate(self) -> None:
        _check_choice("model.dtype", self.dtype, DTYPES)
        _check_choice("model.large_backend", self.large_backend, LARGE_BACKENDS)
        _check_choice("model.small_proxy_backend", self.small_proxy_backend, SMALL_PROXY_BACKENDS)
        _check_choice("model.eval_engine", self.eval_engine, EVAL_ENGINES)
        _check_positive("model.large_topk", self.large_topk)
        if not self.small or not self.large:
            raise FedPTError("model.small and model.large must both name a model")
        if self.large_backend in ("remote", "openai") and not self.large_url.startswith(("http://", "https://")):
            raise FedPTError(f"model.large_backend = '{self.large_backend}' needs model.large_url, the service's "
                             f"http(s) base URL (got {self.large_url!r})")


@dataclass
class LoraConfig:
    """LoRA adapter on the small LM (and on the large LM for the fedavg-large baseline)."""

    rank: int = 8
    alpha: float = 16.0  # usually 2 * rank
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])

    def validate(self) -> None:
        _check_positive("lora.rank", self.rank)
        _check_positive("lora.alpha", self.alpha)
        _check_range("lora.dropout", self.dropout, 0.0, 1.0, hi_open=True)
        if not self.targets:
            raise FedPTError("lora.targets is empty: name at least one module, e.g. [\"q_proj\"]")


@dataclass
class DataConfig:
    """Instruction data: one source split into device data, a held-out evaluation set and a
    server-side KD prompt pool (instructions only), disjoint by (instruction, input)."""

    source: str = "builtin:dolly-tiny"  # JSONL path (.jsonl or .jsonl.gz) or builtin:<name>
    eval_size: int = 16  # held-out split of `source` (always evaluated, named after the source)
    eval_sets: list[str] = field(default_factory=list)  # extra evaluation-only sources
    eval_sets_size: int = 0  # cap per extra set (0 = all of it)
    fields: list[str] = field(default_factory=list)  # column mapping for user files, e.g. ["response=answer"]
    kd_pool_size: int = 32
    split_seed: int = 1234
    partitioner: str = "dirichlet"  # iid | dirichlet (over the `category` field)
    dirichlet_alpha: float = 1.0
    template: str = "alpaca"  # alpaca | chat (the tokenizer's chat template)
    max_prompt_tokens: int = 256
    max_seq_len: int = 512

    def validate(self) -> None:
        _check_positive("data.eval_size", self.eval_size)
        _check_positive("data.kd_pool_size", self.kd_pool_size)
        _check_range("data.eval_sets_size", self.eval_sets_size, 0, 10**9)
        from fedpt.data.records import parse_field_map

        parse_field_map(self.fields)
        _check_choice("data.partitioner", self.partitioner, ("iid", "dirichlet"))
        _check_positive("data.dirichlet_alpha", self.dirichlet_alpha)
        _check_choice("data.template", self.template, ("alpaca", "chat"))
        _check_positive("data.max_prompt_tokens", self.max_prompt_tokens)
        if self.max_seq_len <= self.max_prompt_tokens:
            raise FedPTError(
                f"data.max_seq_len ({self.max_seq_len}) must exceed data.max_prompt_tokens "
                f"({self.max_prompt_tokens}) to leave room for the response"
            )


@dataclass
class FederationConfig:
    """How many devices, how many per round, how many rounds (Flower simulation on one box)."""

    num_clients: int = 3
    clients_per_round: int = 3
    rounds: int = 2
    client_cpus: float = 1.0  # Ray CPUs per simulated device: 2 cores -> 2 devices at once
    # Simulation: a device still training takes the cores of device processes that have finished
    # their round (torch threads = cores // busy processes; fedpt.federation.core_share).
    share_idle_cores: bool = True
    round_timeout: float = 3600.0  # seconds to wait for device replies; late ones are dropped
    min_results: int = 1  # a round with fewer valid updates fails (the last checkpoint stays valid)
    aggregation: str = "fedavg"  # fedavg | median | trimmed-mean | krum (Flower's robust strategies)
    trim_beta: float = 0.2  # trimmed-mean: fraction cut at each end
    krum_malicious: int = 0  # krum: assumed number of malicious devices
    max_update_norm: float = 0.0  # reject an update whose L2 distance to the broadcast exceeds this (0 = off)
    secure_aggregation: bool = False  # SecAgg+: the server sees only the sum of the updates (fedpt.federation.secagg)
    secagg_max_weight: float = 0.0  # SecAgg+: bound on a device's example count (0 = size of the device split)
    # Stop a system once its proxy-tuned large LM reaches this Rouge-L on the held-out set (checked
    # when it is evaluated: every eval.every rounds); `rounds` stays the budget. 0 = off.
    # Systems without a proxy-tuned large LM (fedavg-small, fedavg-large) run every round.
    target_rouge_l: float = 0.0

    def validate(self) -> None:
        _check_positive("federation.num_clients", self.num_clients)
        _check_positive("federation.rounds", self.rounds)
        _check_positive("federation.client_cpus", self.client_cpus)
        _check_positive("federation.round_timeout", self.round_timeout)
        _check_choice("federation.aggregation", self.aggregation, AGGREGATIONS)
        _check_range("federation.trim_beta", self.trim_beta, 0.0, 0.5, hi_open=True)
        _check_range("federation.krum_malicious", self.krum_malicious, 0, 10**6)
        _check_range("federation.max_update_norm", self.max_update_norm, 0.0, float("inf"))
        _check_range("federation.secagg_max_weight", self.secagg_max_weight, 0.0, float("inf"))
        _check_range("federation.target_rouge_l", self.target_rouge_l, 0.0, 100.0)
        if not 1 <= self.min_results <= self.clients_per_round:
            raise FedPTError(f"federation.min_results must be between 1 and clients_per_round "
                             f"({self.clients_per_round}), got {self.min_results}")
        if not 1 <= self.clients_per_round <= self.num_clients:
            raise FedPTError(
                f"federation.clients_per_round must be between 1 and num_clients "
                f"({self.num_clients}), got {self.clients_per_round}"
            )


@dataclass
class TrainConfig:
    """One device's local LoRA SFT per round (loss on response tokens only)."""

    steps: int = 4
    batch_size: int = 4
    lr: float = 1e-3
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    # Recompute each decoder layer's activations in the backward pass instead of keeping them:
    # ~1/3 more compute for a fraction of the activation memory. Devices are the memory-poor
    # side, and in fp32 (dtype auto on AVX2-only CPUs) two devices training at once next to the
    # server's models ran the 24 GiB machine out of memory without it.
    gradient_checkpointing: bool = True
    # With checkpointing on: the last decoder layers keep their activations (no recomputation in
    # the backward pass) as long as they fit in this many MiB for the step at hand; the rest
    # recompute. Chosen per step from its token count and the bytes per token a layer keeps
    # (measured on the model once), so long steps recompute more. The same numbers either way;
    # 0 = every layer recomputes. Each kept layer saves ~1% of a 24-layer step's time.
    activation_memory_mb: int = 0
    # A step's rows concatenated into one sequence (positions restart per row, attention stays
    # inside each row: transformers' packed-sequence masks) instead of padded to the longest:
    # the same loss and gradients, computed on the real tokens only (random batches of 4 Dolly
    # rows are about half padding). Off = padded batches, as runs made before it trained.
    pack_rows: bool = False

    def validate(self) -> None:
        _check_positive("train.steps", self.steps)
        _check_positive("train.batch_size", self.batch_size)
        _check_positive("train.lr", self.lr)
        _check_range("train.weight_decay", self.weight_decay, 0.0, 1.0)
        _check_positive("train.max_grad_norm", self.max_grad_norm)
        _check_range("train.activation_memory_mb", self.activation_memory_mb, 0, 10**7)


@dataclass
class ProxyConfig:
    """Proxy-tuning: z = z_large + alpha * (z_small_tuned - z_small_base)."""

    alpha: float = 1.0

    def validate(self) -> None:
        _check_range("proxy.alpha", self.alpha, 0.0, 100.0)


@dataclass
class DistillConfig:
    """Server-side distillation of the proxy-tuned large LM into the averaged small LM."""

    steps: int = 4
    batch_size: int = 4
    lr: float = 5e-4
    temperature: float = 1.0
    ce_weight: float = 0.0  # 0 = pure forward KL; >0 mixes CE on the teacher's tokens
    max_new_tokens: int = 32  # teacher response length
    teacher_decoding: str = "greedy"  # greedy | sample
    # Rows the teacher decodes at once (0 = distill.batch_size, as older runs did): decoding is
    # bound by reading the weights per step, so a wider batch costs little more per step than 4.
    teacher_batch_size: int = 0
    # The student's rows end to end without padding, as train.pack_rows does for the devices
    pack_rows: bool = False
    # Forward KL teacher -> student over the whole KD pool before and after the student steps
    # (rounds.jsonl kd_kl_before/after): a diagnostic costing two extra student passes per round.
    pool_kl: bool = False

    def validate(self) -> None:
        _check_positive("distill.steps", self.steps)
        _check_positive("distill.batch_size", self.batch_size)
        _check_positive("distill.lr", self.lr)
        _check_positive("distill.temperature", self.temperature)
        _check_range("distill.ce_weight", self.ce_weight, 0.0, 1.0)
        _check_positive("distill.max_new_tokens", self.max_new_tokens)
        _check_choice("distill.teacher_decoding", self.teacher_decoding, ("greedy", "sample"))
        _check_range("distill.teacher_batch_size", self.teacher_batch_size, 0, 4096)


@dataclass
class EvalConfig:
    """Rouge-L on the held-out set (rougeL F, Porter stemming, max over references, x100)."""

    every: int = 1  # evaluate every N rounds (round 0 and the last round always)
    protocol: str = "greedy"  # greedy | sampling (temperature 1, top-p 1, 5 seeds)
    seeds: list[int] = field(default_factory=lambda: [10, 20, 30, 40, 50])
    max_new_tokens: int = 32
    batch_size: int = 8
    # Decode the sets as one stream of batches (a batch may span two sets), so sets smaller than
    # a batch still fill it: on a CPU a 24-row decoding step costs far less than three 8-row ones.
    # Off = each set in its own batches, as runs made before it did (their config.toml lacks it).
    pack_sets: bool = False
    no_repeat_ngram_size: int = 6  # used by the sampling protocol, as in MiniLLM
    # `fedpt experiment`'s alpha sweep: which evaluation sets (by name, e.g. "dolly-15k"; empty =
    # all) and how many of each set's prompts (its first N; 0 = all). The run's own alpha is
    # always scored on every prompt during training.
    sweep_sets: list[str] = field(default_factory=list)
    sweep_size: int = 0

    def validate(self) -> None:
        _check_positive("eval.every", self.every)
        _check_choice("eval.protocol", self.protocol, ("greedy", "sampling"))
        if not self.seeds:
            raise FedPTError("eval.seeds is empty: give at least one seed, e.g. [10]")
        _check_positive("eval.max_new_tokens", self.max_new_tokens)
        _check_positive("eval.batch_size", self.batch_size)
        _check_range("eval.no_repeat_ngram_size", self.no_repeat_ngram_size, 0, 64)
        _check_range("eval.sweep_size", self.sweep_size, 0, 10**9)


@dataclass
class PrivacyConfig:
    """Central differential privacy on the device updates (Flower's server-side fixed clipping).

    Each update's distance to the broadcast adapter is clipped to ``clipping_norm`` (L2), the
    updates are averaged uniformly, and Gaussian noise of std ``noise_multiplier *
    clipping_norm / devices`` is added *before* proxy-tuning and distillation, so everything
    the server derives is post-processing. Flower's RDP accountant reports epsilon at
    ``delta`` per round (client-level, no sampling amplification).
    """

    dp: str = "off"  # off | central | local (each device noises its own update: fedpt.federation.local_dp)
    noise_multiplier: float = 1.0  # central: noise std = noise_multiplier * clipping_norm / devices
    clipping_norm: float = 1.0  # L2 bound on each device's update (central and local)
    delta: float = 1e-5
    max_epsilon: float = 0.0  # central: refuse a round that would exceed this budget (0 = no limit)
    local_epsilon: float = 1.0  # local: epsilon of each device's release per round (Gaussian mechanism, <= 1)

    def validate(self) -> None:
        _check_choice("privacy.dp", self.dp, ("off", "central", "local"))
        if not 0 < self.local_epsilon <= 1:
            raise FedPTError(f"privacy.local_epsilon must be in (0, 1] (the Gaussian mechanism's calibration), "
                             f"got {self.local_epsilon}")
        _check_positive("privacy.noise_multiplier", self.noise_multiplier)
        _check_positive("privacy.clipping_norm", self.clipping_norm)
        if not 0 < self.delta < 1:
            raise FedPTError(f"privacy.delta must be strictly between 0 and 1, got {self.delta}")
        _check_range("privacy.max_epsilon", self.max_epsilon, 0.0, float("inf"))


@dataclass
class FaultsConfig:
    """Injected device faults, to test a deployment's fault tolerance (``fedpt.faults``).

    Fractions of device rounds, chosen by a seeded hash of (seed, round, device): a device
    crashes (raises), hangs for ``hang_seconds`` before replying, or its process exits.
    """

    crash: float = 0.0
    hang: float = 0.0
    exit: float = 0.0
    hang_seconds: float = 0.0
    seed: int = 0

    def validate(self) -> None:
        for name in ("crash", "hang", "exit"):
            _check_range(f"faults.{name}", getattr(self, name), 0.0, 1.0)
        if self.crash + self.hang + self.exit > 1:
            raise FedPTError("faults.crash + faults.hang + faults.exit must not exceed 1")
        _check_range("faults.hang_seconds", self.hang_seconds, 0.0, float("inf"))
        if self.hang and not self.hang_seconds:
            raise FedPTError("faults.hang > 0 needs faults.hang_seconds > 0 (longer than federation.round_timeout)")


@dataclass
class RunConfig:
    """What to run and how."""

    systems: list[str] = field(default_factory=lambda: ["fedpt"])
    seed: int = 0
    threads: int = 0  # torch threads in the server process; 0 = all cores

    def validate(self) -> None:
        if not self.systems:
            raise FedPTError(f"run.systems is empty: choose from {', '.join(SYSTEMS)}")
        for name in self.systems:
            _check_choice("run.systems", name, SYSTEMS)
        if len(set(self.systems)) != len(self.systems):
            raise FedPTError(f"run.systems lists a system twice: {self.systems}")
        _check_range("run.threads", self.threads, 0, 1024)


@dataclass
class FedPTConfig:
    """The whole run: every default is visible in the section classes above."""

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)

    def validate(self) -> "FedPTConfig":
        for section in dataclasses.fields(self):
            getattr(self, section.name).validate()
        model = self.model
        if model.eval_engine == "auto":  # resolved once, like the backends: a resumed run keeps it
            model.eval_engine = auto_eval_engine(model)
            model.chosen_by_auto.add("eval_engine")
        if model.eval_engine == "llamacpp":  # one engine for every evaluated model and the teacher
            if model.large_backend in ("remote", "openai"):
                raise FedPTError(f"model.eval_engine = 'llamacpp' runs every evaluated model in llama.cpp, but the "
                                 f"large LM is behind a service (model.large_backend = '{model.large_backend}'): "
                                 "use model.eval_engine = 'torch'")
            for key in ("large_backend", "small_proxy_backend"):  # whatever they said: one engine judges all
                if getattr(model, key) == "auto" and "eval_engine" in model.chosen_by_auto:
                    model.chosen_by_auto.add(key)
                setattr(model, key, "llamacpp")
        elif "eval_engine" in model.chosen_by_auto and model.large_backend == "auto":
            model.large_backend = "local"  # auto chose torch to evaluate: the large LM too
        if model.large_backend == "auto":  # resolved once: a resumed run keeps what it started with
            model.large_backend = auto_large_backend(model.large, self.run.systems)
            model.chosen_by_auto.add("large_backend")  # preflight may still fall back to torch
        if model.small_proxy_backend == "auto":
            llamacpp = model.large_backend == "llamacpp" and _has_gguf(model.small)
            model.small_proxy_backend = "llamacpp" if llamacpp else "torch"
            model.chosen_by_auto.add("small_proxy_backend")
        if "fedavg-large" in self.run.systems and model.large_backend != "local" and model.eval_engine != "llamacpp":
            raise FedPTError("fedavg-large tunes the large LM's weights (white-box baseline): it needs "
                             f"model.large_backend = 'local' (or model.eval_engine = 'llamacpp', which evaluates "
                             f"its tuned large LM from the GGUF file and its adapter), not '{model.large_backend}'")
        fed = self.federation
        if fed.secure_aggregation:  # the server sees only the sum: nothing that needs single updates
            if fed.aggregation != "fedavg":
                raise FedPTError(f"federation.aggregation={fed.aggregation!r} needs each device's update; under "
                                 "secure aggregation the server only sees their sum: use 'fedavg'")
            if self.privacy.dp == "central":
                raise FedPTError("privacy.dp='central' clips each device's update on the server, which secure "
                                 "aggregation hides: turn one of them off")
            if self.privacy.dp == "local":
                raise FedPTError("privacy.dp='local' is not implemented for SecAgg+'s message format: "
                                 "turn one of them off")
            if fed.clients_per_round < 2:
                raise FedPTError("secure aggregation needs at least 2 devices per round (federation.clients_per_round)")
        if self.privacy.dp == "central" and self.federation.aggregation != "fedavg":
            raise FedPTError("privacy.dp = 'central' averages with FedAvg (its noise is calibrated to the mean); "
                             f"set federation.aggregation = 'fedavg', not '{self.federation.aggregation}'")
        return self

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any], origin: str = "config") -> "FedPTConfig":
        config = cls()
        for section_name, values in data.items():
            section = _section(config, section_name, origin)
            if not isinstance(values, dict):
                raise FedPTError(f"{origin}: [{section_name}] must be a table of keys")
            for key, value in values.items():
                _assign(section, section_name, key, value, origin)
        return config.validate()

    @classmethod
    def from_json(cls, text: str) -> "FedPTConfig":
        return cls.from_dict(json.loads(text), origin="message config")

    def save(self, path: Path) -> None:
        import tomli_w

        path.write_text(tomli_w.dumps(self.to_dict()))


def preset_names() -> list[str]:
    folder = resources.files("fedpt") / "presets"
    return sorted(p.name.removesuffix(".toml") for p in folder.iterdir() if p.name.endswith(".toml"))


def load_config(
    path: str | Path | None = None,
    preset: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> FedPTConfig:
    """Read a preset or a TOML file, then apply ``section.key=value`` overrides, then validate."""
    if path is not None and preset is not None:
        raise FedPTError("give either --config FILE or --preset NAME, not both")
    if path is not None:
        origin = str(path)
        data = _read_toml(Path(path))
    else:
        preset = preset or DEFAULT_PRESET
        if preset not in preset_names():
            raise FedPTError(f"unknown preset '{preset}': choose from {', '.join(preset_names())}")
        origin = f"preset {preset}"
        data = tomllib.loads((resources.files("fedpt") / "presets" / f"{preset}.toml").read_text())
    for item in overrides:
        section_name, key, value = _parse_override(item)
        data.setdefault(section_name, {})[key] = value
    return FedPTConfig.from_dict(data, origin=origin)


def _read_toml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FedPTError(f"config file {path} does not exist")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise FedPTError(f"config file {path} is not valid TOML: {err}") from None


def _parse_override(item: str) -> tuple[str, str, Any]:
    name, sep, raw = item.partition("=")
    section_name, dot, key = name.strip().partition(".")
    if not sep or not dot or not key:
        raise FedPTError(f"--set expects section.key=value (e.g. train.lr=1e-3), got '{item}'")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word: treat as a string
    return section_name, key.strip(), value


def _section(config: FedPTConfig, name: str, origin: str) -> Any:
    names = [f.name for f in dataclasses.fields(config)]
    if name not in names:
        raise FedPTError(f"{origin}: unknown config section [{name}]; valid sections: {', '.join(names)}")
    return getattr(config, name)


def _assign(section: Any, section_name: str, key: str, value: Any, origin: str) -> None:
    fields = {f.name: f for f in dataclasses.fields(section)}
    if key not in fields:
        raise FedPTError(
            f"{origin}: unknown key '{section_name}.{key}'; valid keys in [{section_name}]: "
            f"{', '.join(fields)}"
        )
    default = getattr(section, key)
    setattr(section, key, _coerce(f"{section_name}.{key}", value, default, origin))


def _coerce(name: str, value: Any, default: Any, origin: str) -> Any:
    """Check a value against the type of its default: config typos fail here, not mid-run."""
    expected = type(default)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is list:
        item_type = type(default[0]) if default else None
        if not isinstance(value, list) or (item_type and not all(isinstance(v, item_type) for v in value)):
            kind = f"list of {item_type.__name__}" if item_type else "list"
            raise FedPTError(f"{origin}: {name} must be a {kind}, got {value!r}")
        return value
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise FedPTError(f"{origin}: {name} must be {expected.__name__}, got {value!r}")
    return value


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise FedPTError(f"{name} = {value!r} is not one of: {', '.join(choices)}")


def _check_positive(name: str, value: float) -> None:
    if value <= 0:
        raise FedPTError(f"{name} must be > 0, got {value}")


def _check_range(name: str, value: float, lo: float, hi: float, hi_open: bool = False) -> None:
    if value < lo or value > hi or (hi_open and value == hi):
        bracket = ")" if hi_open else "]"
        raise FedPTError(f"{name} must be in [{lo}, {hi}{bracket}, got {value}")
