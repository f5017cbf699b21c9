"""Live progress for a run: one bar over all rounds of all systems (phase, devices, ETA)."""

from __future__ import annotations

import sys

from fedpt.metrics import RoundRecord


class Progress:
    """A tqdm bar on stderr; a one-line summary per finished round above it."""

    def __init__(self, systems: list[str], rounds: int, enabled: bool = True) -> None:
        from tqdm import tqdm

        self.rounds = rounds
        self.bar = tqdm(total=len(systems) * rounds, unit="round", file=sys.stderr, disable=not enabled,
                        dynamic_ncols=True, bar_format="{desc} |{bar}| {n_fmt}/{total_fmt} rounds "
                                                       "[{elapsed}<{remaining}]")

    def phase(self, system: str, server_round: int, phase: str) -> None:
        self._phase = f"{system} round {server_round}/{self.rounds}: {phase}"
        self.bar.set_description_str(self._phase)

    # ``ServerModels.evaluate`` reports its sets here (the interface of ``PromptProgress``):
    # the phase shows the model, set and prompts done with an ETA; a line per finished set.
    def start(self, model: str, set_name: str, prompts: int, seeds: int = 1) -> None:
        import time

        self._set = [f"{model} on {set_name}", prompts * seeds, 0, time.perf_counter()]
        self.advance(0)

    def advance(self, prompts: int) -> None:
        import time

        label, total, done, started = self._set
        self._set[2] = done = done + prompts
        elapsed = time.perf_counter() - started
        eta = f", ~{elapsed / done * (total - done):.0f} s left" if done and done < total else ""
        self.bar.set_description_str(f"{getattr(self, '_phase', '')}: {label} {done}/{total} prompts{eta}")

    def done(self, model: str, set_name: str, result) -> None:
        import time

        if self.bar.disable:  # --no-progress: the round lines only
            return
        seconds = time.perf_counter() - self._set[3]
        self.bar.write(f"  {model} on {set_name}: Rouge-L {result.rouge_l:.2f} ({result.num_prompts} prompts, "
                       f"{seconds:.0f} s)", file=sys.stderr)

    def skip(self, rounds: int) -> None:
        """Rounds finished by an earlier run (resume)."""
        self.bar.update(rounds)

    def round_done(self, record: RoundRecord) -> None:
        self.bar.write(describe_round(record), file=sys.stderr)
        if record.round > 0:
            self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def describe_round(r: RoundRecord) -> str:
    parts = [f"[{r.system}] round {r.round}"]
    if r.round > 0:
        parts.append(f"devices {r.clients}" + (f" ({r.failures} failed)" if r.failures else ""))
    if r.train_loss is not None:
        parts.append(f"train loss {r.train_loss:.3f}")
    if r.kd_kl_before is not None:
        parts.append(f"KD KL {r.kd_kl_before:.3f}->{r.kd_kl_after:.3f}")
    for name, value in (("small", r.rougeL_small), ("proxy", r.rougeL_proxy), ("large", r.rougeL_large)):
        if value is not None:
            parts.append(f"Rouge-L {name} {value:.2f}")
    parts.append(f"{r.seconds:.1f}s")
    return " | ".join(parts)


class PromptProgress:
    """Evaluation commands (``fedpt eval``, the experiment's alpha sweep): one bar over every prompt
    they decode (models x sets x seeds), showing the model, the set, its prompt count and an ETA;
    a line per finished model and set above it."""

    def __init__(self, command: str, total: int, protocol: str, enabled: bool = True) -> None:
        from tqdm import tqdm

        self.enabled = enabled
        if enabled:
            print(f"{command}: {total} prompt decodings ({protocol})", file=sys.stderr)
        self.bar = tqdm(total=total, unit="prompt", file=sys.stderr, disable=not enabled, dynamic_ncols=True,
                        mininterval=1.0, bar_format="{desc} |{bar}| {n_fmt}/{total_fmt} prompts "
                                                    "[{elapsed}<{remaining}, {rate_fmt}]")
        self.started = 0.0

    def start(self, model: str, set_name: str, prompts: int, seeds: int = 1) -> None:
        import time

        self.started = time.perf_counter()
        count = f"{prompts} prompts" + (f" x {seeds} seeds" if seeds > 1 else "")
        self.bar.set_description_str(f"{model} on {set_name} ({count})")

    def advance(self, prompts: int) -> None:
        self.bar.update(prompts)

    def done(self, model: str, set_name: str, result) -> None:
        """``result``: the set's ``EvalResult``."""
        import time

        if self.enabled:
            self.bar.write(f"{model} on {set_name}: Rouge-L {result.rouge_l:.2f} ({result.num_prompts} prompts, "
                           f"{time.perf_counter() - self.started:.0f} s)", file=sys.stderr)

    def note(self, text: str) -> None:
        """A line above the bar (printed with or without it)."""
        self.bar.write(text, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


def evaluate_sets(server, source, label: str, progress: PromptProgress | None, identity: str | None = None) -> dict:
    """``ServerModels.evaluate`` set by set, reporting each batch to ``progress``: {set: EvalResult}.

    ``identity`` (``ServerModels.identity``) lets finished sets come from, and go to, the run's eval cache.
    """
    return server.evaluate(source, identity=identity, progress=progress, label=label)
