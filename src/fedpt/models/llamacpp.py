"""The frozen large LM in llama.cpp: a ``LogitSource`` that runs the GGUF file itself.

The large LM is frozen and FedPT only asks it for next-token logits, so nothing requires it to
run in torch. llama.cpp runs the GGUF weights as they are stored (4-6-bit blocks), which makes
batch-1 decoding bandwidth-bound on a quarter of the bytes torch reads after dequantizing. With
``model.large_backend = "llamacpp"`` the server never loads the large LM into torch; the
small LM (which devices tune and the server distils into) stays in torch.

One llama.cpp context holds one KV cache stream per row (``seq_id`` = row). FedPT's batches are
left-padded; llama.cpp gets each row's real tokens only, at positions 0..n-1, which is what
``positions_from_mask`` gives the torch path, so the two compute the same function.

Needs the ``llama-cpp-python`` bindings (``pip install 'fedpt[llamacpp]'``; PyPI ships them as
source, compiled at install in about 15 minutes on 2 cores).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedpt.errors import FedPTError
from fedpt.proxy import TwoSourceDiff

SHARE_PREFIX_ENV = "FEDPT_LLAMACPP_SHARE_PREFIX"
PROMPT_STATES_ENV = "FEDPT_LLAMACPP_PROMPT_STATES"  # MiB kept; 0 turns it off
INSTALL_HINT = "install the bindings: pip install 'llama-cpp-python==0.3.36' (compiles llama.cpp, ~15 min)"


def _bindings() -> Any:
    try:
        import llama_cpp
    except ImportError:
        raise FedPTError(f"model.large_backend = 'llamacpp' needs llama.cpp's Python bindings; {INSTALL_HINT}") from None
    return llama_cpp


_init_lock = threading.Lock()
_initialised = False
_quiet_callback: Any = None  # llama.cpp keeps the pointer: the callback must outlive every call


def _init_backend(llama_cpp: Any) -> None:
    """Once per process: load the CPU backend and silence llama.cpp's per-load chatter on stderr."""
    global _initialised, _quiet_callback
    with _init_lock:
        if _initialised:
            return
        _quiet_callback = llama_cpp.llama_log_callback(lambda level, text, data: None)
        llama_cpp.llama_log_set(_quiet_callback, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
        _initialised = True


# -- llama.cpp on every CPU ------------------------------------------------------------------
#
# llama.cpp's "extra buffer types" hold weights repacked for the CPU at load: CPU_REPACK (the
# interleaved Q4_0/Q4_K/IQ4_NL layouts for AVX2/AVX-512, faster matmuls) and, on Intel CPUs with
# AMX, the AMX buffer type. The AMX one segfaults in ``ggml_backend_amx_mul_mat`` on
# Sapphire-Rapids-class CPUs with K-quants (our Qwen GGUFs are Q4_K/Q6_K): seen on this
# project's AMX machine, in the first prefill of the real large GGUF. llama.cpp has one switch
# for both (``use_extra_bufts``), so "auto" turns it off on AMX CPUs only and keeps repacking
# everywhere else. Cost and gain, measured: docs/performance.md.

EXTRA_BUFFERS_ENV = "FEDPT_LLAMACPP_EXTRA_BUFFERS"
# Fault injection for tests (as FEDPT_KILL_AT): the check's child dies by this signal after loading.
PROBE_FAULT_ENV = "FEDPT_FAULT_LLAMACPP_CHECK"
_PROBE_TIMEOUT = 600.0  # seconds: a 1.5B GGUF loads and decodes 4 tokens in a few seconds


def extra_buffers_enabled(setting: str | None = None, flags: frozenset[str] | None = None) -> bool:
    """Whether llama.cpp may repack weights into its extra buffer types (``FEDPT_LLAMACPP_EXTRA_BUFFERS``).

    ``on`` / ``off`` force it; ``auto`` (the default) is off on CPUs with AMX, on elsewhere.
    """
    from fedpt.cpu import has_amx

    value = (os.environ.get(EXTRA_BUFFERS_ENV, "auto") if setting is None else setting).strip().lower()
    if value not in ("auto", "on", "off"):
        raise FedPTError(f"{EXTRA_BUFFERS_ENV}={value!r}: expected auto, on or off")
    if value == "auto":
        return not has_amx(flags)
    return value == "on"


def share_prefixes_enabled() -> bool:
    """Whether prefill computes a prefix that several rows share once (``FEDPT_LLAMACPP_SHARE_PREFIX``,
    ``on`` by default). ``off`` reproduces evaluations made before it existed: the outputs agree
    within llama.cpp's own batch-shape rounding, not bit for bit (docs/performance.md)."""
    value = os.environ.get(SHARE_PREFIX_ENV, "on").strip().lower()
    if value not in ("on", "off"):
        raise FedPTError(f"{SHARE_PREFIX_ENV}={value!r}: expected on or off")
    return value == "on"


def prompt_states_budget() -> int:
    """Bytes of prompt states a llama.cpp model keeps for later sessions (``FEDPT_LLAMACPP_PROMPT_STATES``,
    in MiB: 512 by default, 0 turns it off)."""
    value = os.environ.get(PROMPT_STATES_ENV, "512").strip()
    if not value.isdigit():
        raise FedPTError(f"{PROMPT_STATES_ENV}={value!r}: expected MiB as a whole number (0 turns it off)")
    return int(value) * 2**20


class PromptStates:
    """Each prompt's KV stream and next-token logits after prefill, kept for later sessions.

    A run prefills the same prompts again and again: the evaluation sets in round 0 (large LM,
    pretrained small LM) and again in the last round's proxy (the large LM, the small LM's base
    view, and its tuned view, which the small LM's own evaluation has just prefilled), the KD pool
    in every round (large LM and base view). Prefill is most of a llama.cpp evaluation's time on a
    CPU. A prompt seen before, with the same adapter, gets its stream back
    (``llama_state_seq_set_data``) and its stored logits instead of being computed: the same
    numbers, since a row's stream holds only its own tokens. Keyed by (adapter digest or None,
    tokens); least recently used first out, within ``budget`` bytes.
    """

    def __init__(self, budget: int) -> None:
        from collections import OrderedDict

        self.budget, self.size = budget, 0
        # state: llama.cpp's serialised stream (a ctypes byte array; anything with len() in bytes)
        self.entries: OrderedDict[tuple[str | None, tuple[int, ...]], tuple[Any, torch.Tensor]] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, key: tuple[str | None, tuple[int, ...]]) -> tuple[Any, torch.Tensor] | None:
        entry = self.entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self.entries.move_to_end(key)
        self.hits += 1
        return entry

    def put(self, key: tuple[str | None, tuple[int, ...]], state: Any, logits: torch.Tensor) -> None:
        if key in self.entries or len(state) + logits.nbytes > self.budget:
            return
        self.entries[key] = (state, logits)
        self.size += len(state) + logits.nbytes
        while self.size > self.budget:
            old_state, old_logits = self.entries.popitem(last=False)[1]
            self.size -= len(old_state) + old_logits.nbytes


def check_runs_here(gguf: Path, extra_buffers: bool) -> None:
    """Load ``gguf`` and decode a few tokens in a child process before this process does.

    A llama.cpp kernel that does not run on this CPU (the AMX buffer type on Sapphire Rapids, a
    build compiled with ``-march=native`` for another CPU: SIGSEGV, SIGILL) kills the process
    that calls it; here it kills the child, and the caller gets one line. A success is cached
    per (file, bindings, CPU, setting) under ``$FEDPT_HOME/llamacpp-checks``, so it costs once.
    """
    import hashlib
    import signal
    import subprocess
    import sys

    from fedpt.cpu import cpu_summary
    from fedpt.models.loading import fedpt_home

    library = Path(_bindings().__file__).resolve().parent
    libs = sorted(library.glob("lib/*.so*")) or sorted(library.glob("*.so*"))
    stamp = [f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in libs]
    stat = gguf.stat() if gguf.is_file() else None
    if stat is None:
        return  # missing file: the in-process load says so in its own words
    key = hashlib.sha256(json.dumps([str(gguf.resolve()), stat.st_size, stat.st_mtime_ns, stamp, cpu_summary(),
                                     extra_buffers]).encode()).hexdigest()[:24]
    marker = fedpt_home() / "llamacpp-checks" / f"{key}.ok"
    injected = bool(os.environ.get(PROBE_FAULT_ENV))
    if marker.is_file() and not injected:
        return
    env = {**os.environ, EXTRA_BUFFERS_ENV: "on" if extra_buffers else "off", "OMP_NUM_THREADS": "1"}
    child = subprocess.run([sys.executable, "-m", "fedpt.models.llamacpp", str(gguf)], env=env,
                           capture_output=True, text=True, timeout=_PROBE_TIMEOUT)
    if child.returncode == 0 and not injected:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"{gguf}\n{cpu_summary()}\nextra buffers: {extra_buffers}\n")
        return
    if child.returncode < 0:  # killed by a signal: the crash this check exists for
        name = signal.Signals(-child.returncode).name
        switch = (f"; or keep llama.cpp without its repacked/AMX weight buffers: {EXTRA_BUFFERS_ENV}=off"
                  if extra_buffers else "")
        raise FedPTError(f"llama.cpp crashed ({name}) decoding {gguf.name} on this CPU ({cpu_summary()}): run the "
                         f"model in torch (model.large_backend = 'local', model.small_proxy_backend = 'torch'){switch}")
    # An ordinary error (a broken file, ...): the in-process load reports it in its own words.


def _probe_main(path: str) -> None:
    """``python -m fedpt.models.llamacpp FILE``: the child of ``check_runs_here``."""
    model = LlamaCppModel(Path(path), threads=1, probe=False)
    if fault := os.environ.get(PROBE_FAULT_ENV):
        import signal

        os.kill(os.getpid(), signal.Signals[fault])  # as the AMX kernel's SIGSEGV would
    source = model.source()
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]]) % model.n_vocab
    logits = source.prefill(ids, torch.ones_like(ids))
    logits = source.step(logits.argmax(-1).view(1, 1))
    if not torch.isfinite(logits).all():
        raise SystemExit(f"llama.cpp gave non-finite logits for {path}")
    source.close()
    model.close()


class _ClosedWhenCollected:
    """Frees llama.cpp memory when the object goes away, if ``close()`` was not called."""

    def close(self) -> None:
        raise NotImplementedError

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # at interpreter exit the bindings may already be torn down
            pass


class LlamaCppModel(_ClosedWhenCollected):
    """A GGUF model loaded once (weights memory-mapped); contexts are made per session."""

    def __init__(self, gguf: Path, threads: int | None = None, probe: bool = True) -> None:
        llama_cpp = _bindings()
        self.lib, self.path = llama_cpp, Path(gguf)
        self.extra_buffers = extra_buffers_enabled()
        if probe:  # a kernel that crashes on this CPU must cost one line, not the process
            check_runs_here(self.path, self.extra_buffers)
        _init_backend(llama_cpp)
        self.threads = threads or torch.get_num_threads()
        params = llama_cpp.llama_model_default_params()
        params.use_extra_bufts = self.extra_buffers
        self.model = llama_cpp.llama_model_load_from_file(str(self.path).encode(), params)
        if not self.model:
            raise FedPTError(f"llama.cpp could not load {self.path}: not a GGUF model it supports "
                             "(check the file, or use model.large_backend = 'local')")
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model)))
        self.n_ctx_train = int(llama_cpp.llama_model_n_ctx_train(self.model))
        self.n_params = int(llama_cpp.llama_model_n_params(self.model))
        budget = prompt_states_budget()
        self.prompt_states = PromptStates(budget) if budget else None

    def source(self, adapter: LlamaCppAdapter | None = None) -> LlamaCppLogitSource:
        return LlamaCppLogitSource(self, adapter)

    def load_adapter(self, path: Path) -> LlamaCppAdapter:
        return LlamaCppAdapter(self, path)

    def load_peft_adapter(self, peft_model: Any) -> LlamaCppAdapter:
        """A peft model's active LoRA adapter, exported to GGUF (``export_lora_gguf``) and loaded here."""
        import tempfile

        with tempfile.TemporaryDirectory(prefix="fedpt-adapter-") as tmp:  # llama.cpp copies it at load
            return self.load_adapter(export_lora_gguf(peft_model, Path(tmp) / "adapter.gguf"))

    def close(self) -> None:
        if getattr(self, "model", None):
            self.lib.llama_model_free(self.model)
            self.model = None



@dataclass
class _Context:
    handle: Any
    rows: int  # KV streams (llama.cpp n_seq_max)
    per_row: int  # tokens each stream can hold


class LlamaCppLogitSource(_ClosedWhenCollected):
    """``LogitSource`` over one llama.cpp context: ``prefill``/``step`` decode, ``score`` scores."""

    CHUNK = 512  # tokens per llama_decode call (n_batch): bounds the compute buffer
    holds_cores = True  # its thread pool spins on every core between steps: compute nothing beside it
    SHARED_MIN = 16  # tokens a shared branch must save (rows - 1) x length to be worth its copies

    def __init__(self, model: LlamaCppModel, adapter: LlamaCppAdapter | None = None) -> None:
        self.model, self.lib, self.adapter = model, model.lib, adapter
        self.share_prefixes = share_prefixes_enabled()
        self._ctx: _Context | None = None
        self._next_pos: list[int] = []
        self._retired: set[int] = set()  # rows the session no longer reads: left out of steps
        self._room: int | None = None  # new tokens the next session decodes (``reserve_new_tokens``)

    # -- contexts and batches --------------------------------------------------------------

    def _context(self, rows: int, length: int, room: int | None = None) -> Any:
        """A context with ``rows`` KV streams of at least ``length`` tokens, its memory cleared.

        ``room``: the new tokens the session will decode (``reserve_new_tokens``); unknown, a new
        context gets 512. Reused while it fits; the per-row capacity is rounded up, so a run makes
        a handful of contexts, not one per batch.
        """
        ctx = self._ctx
        if ctx is None or ctx.rows < rows or ctx.per_row < length + (room or 0):
            self._free_context()
            if length > self.model.n_ctx_train:
                raise FedPTError(f"a sequence of {length} tokens exceeds {self.model.path.name}'s context "
                                 f"({self.model.n_ctx_train}); shorten data.max_prompt_tokens or eval.max_new_tokens")
            per_row = min(self.model.n_ctx_train, _round_up(length + (512 if room is None else room), 256))
            params = self.lib.llama_context_default_params()
            params.n_ctx = per_row * rows
            params.n_batch = params.n_ubatch = self.CHUNK
            params.n_seq_max = rows
            params.n_threads = params.n_threads_batch = self.model.threads
            handle = self.lib.llama_init_from_model(self.model.model, params)
            if not handle:
                raise FedPTError(f"llama.cpp could not make a context of {rows} x {per_row} tokens "
                                 "(out of memory?); lower eval.batch_size")
            if self.adapter is not None:
                adapters = (self.lib.llama_adapter_lora_p_ctypes * 1)(self.adapter.handle)
                if self.lib.llama_set_adapters_lora(handle, adapters, 1, (ctypes.c_float * 1)(1.0)) != 0:
                    self.lib.llama_free(handle)
                    raise FedPTError(f"llama.cpp refused the LoRA adapter {self.adapter.path} for {self.model.path.name}")
            ctx = self._ctx = _Context(handle, rows, per_row)
        self.lib.llama_memory_clear(self.lib.llama_get_memory(ctx.handle), True)
        return ctx.handle

    def _decode(self, handle: Any, tokens: list[tuple[int, int, int, bool]]) -> torch.Tensor:
        """Run (token, position, row, want_logits) entries in chunks; fp32 logits of the wanted
        entries, in order (n_wanted, V)."""
        lib, vocab = self.lib, self.model.n_vocab
        outputs = []
        for start in range(0, len(tokens), self.CHUNK):
            chunk = tokens[start: start + self.CHUNK]
            batch = lib.llama_batch_init(len(chunk), 0, 1)
            try:
                for i, (token, pos, row, wanted) in enumerate(chunk):
                    batch.token[i], batch.pos[i] = token, pos
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = row
                    batch.logits[i] = wanted
                batch.n_tokens = len(chunk)
                status = lib.llama_decode(handle, batch)
                if status != 0:
                    raise FedPTError(f"llama.cpp failed to decode a batch (status {status}); "
                                     "lower eval.batch_size or the sequence lengths")
                wanted = sum(1 for entry in chunk if entry[3])
                if wanted:
                    pointer = lib.llama_get_logits(handle)
                    logits = np.ctypeslib.as_array(pointer, shape=(wanted * vocab,))
                    outputs.append(torch.from_numpy(logits.copy()).view(wanted, vocab))
            finally:
                lib.llama_batch_free(batch)
        return torch.cat(outputs) if outputs else torch.empty(0, vocab)

    def _free_context(self) -> None:
        if self._ctx is not None:
            self.lib.llama_free(self._ctx.handle)
            self._ctx = None

    # -- LogitSource -------------------------------------------------------------------------

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        rows = _real_tokens(input_ids, attention_mask)
        handle = self._context(len(rows), max(len(r) for r in rows) + 1, self._room)
        states = self.model.prompt_states
        adapter = self.adapter.digest if self.adapter is not None else None
        logits = torch.empty(len(rows), self.model.n_vocab)
        todo = []
        for row, seq in enumerate(rows):
            found = states.get((adapter, tuple(seq))) if states is not None else None
            if found is not None and self.lib.llama_state_seq_set_data(handle, found[0], len(found[0]), row):
                logits[row] = found[1]
                continue
            if found is not None:  # not taken back (llama.cpp said why on stderr): compute it from an empty stream
                self.lib.llama_memory_seq_rm(self.lib.llama_get_memory(handle), row, -1, -1)
            todo.append(row)
        starts = self._share_prefixes(handle, rows, todo)
        entries = [(tok, pos, row, pos == len(rows[row]) - 1)
                   for row in todo for pos, tok in enumerate(rows[row]) if pos >= starts[row]]
        if todo:
            logits[todo] = self._decode(handle, entries)
        if len(todo) < len(rows):  # the phase table's prefill bound counts only what was computed
            from fedpt import profile

            restored = sum(len(seq) for row, seq in enumerate(rows) if row not in todo)
            profile.count(prompt_flops_restored=2 * self.model.n_params * restored)
        if states is not None:
            for row in todo:  # before any step: the stream holds the prompt alone
                states.put((adapter, tuple(rows[row])), self._stream_state(handle, row), logits[row].clone())
        self._next_pos = [len(seq) for seq in rows]
        self._retired = set()
        return logits

    def _stream_state(self, handle: Any, row: int) -> Any:
        """Row ``row``'s KV stream, serialised by llama.cpp (a ctypes byte array, as it reads it back)."""
        size = self.lib.llama_state_seq_get_size(handle, row)
        buffer = (ctypes.c_uint8 * size)()
        written = self.lib.llama_state_seq_get_data(handle, buffer, size, row)
        return buffer if written == size else (ctypes.c_uint8 * written).from_buffer_copy(buffer)

    def _share_prefixes(self, handle: Any, rows: list[list[int]], members: list[int]) -> list[int]:
        """Compute what several rows open with once: in one row's KV stream, then copied to the
        others' streams. Returns, per row, the first position still to compute; only ``members``
        (the rows to compute) take part.

        Prefill is most of an evaluation prompt's time, and instruction prompts share a template
        header (Alpaca's two variants part after ~8 tokens and run to ~35; S-NI's task definitions
        to ~90). The rows form a prefix tree: each branch that saves at least ``SHARED_MIN`` tokens
        is computed in its first row and that stream copied to the branch's other rows, then the
        branch splits again, level by level. A branch stops one token short of its
        shortest row, whose last token must still be computed for its own logits. The copied cells
        hold the keys and values of the same tokens at the same positions: later tokens see what
        they would have computed themselves, within llama.cpp's batch-shape rounding
        (``tests/test_llamacpp.py`` compares against unshared rows).
        """
        starts = [0] * len(rows)
        if len(members) < 2 or not self.share_prefixes:
            return starts
        memory = self.lib.llama_get_memory(handle)
        frontier = [(list(members), 0)]  # (rows whose streams hold their first `done` tokens, done)
        while frontier:  # one tree level per llama_decode call: each call reads all the weights once
            entries, copies, deeper = [], [], []
            for members, done in frontier:
                by_next: dict[int, list[int]] = {}
                for row in members:
                    if len(rows[row]) - 1 > done:
                        by_next.setdefault(rows[row][done], []).append(row)
                for group in by_next.values():
                    shared = min(len(os.path.commonprefix([rows[row] for row in group])),
                                 min(len(rows[row]) for row in group) - 1)
                    if (len(group) - 1) * (shared - done) < self.SHARED_MIN:
                        continue
                    entries += [(rows[group[0]][pos], pos, group[0], False) for pos in range(done, shared)]
                    copies += [(group[0], row) for row in group[1:]]
                    for row in group:
                        starts[row] = shared
                    deeper.append((group, shared))
            if entries:
                self._decode(handle, entries)
            # whole-stream copies (llama.cpp copies across streams only whole), made at the next decode
            for source, row in copies:
                self.lib.llama_memory_seq_cp(memory, source, row, -1, -1)
            frontier = deeper
        return starts

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        if self._ctx is None or not self._next_pos:
            raise RuntimeError("step() before prefill()")
        if max(self._next_pos) >= self._ctx.per_row:
            raise FedPTError(f"decoding went past the {self._ctx.per_row}-token context made at prefill; "
                             "lower eval.max_new_tokens")
        active = [row for row in range(len(self._next_pos)) if row not in self._retired]
        entries = [(int(tokens[row]), self._next_pos[row], row, True) for row in active]
        self._next_pos = [pos + 1 for pos in self._next_pos]
        if len(active) == len(self._next_pos):
            return self._decode(self._ctx.handle, entries)
        out = torch.zeros(len(self._next_pos), self.model.n_vocab)
        if active:
            out[active] = self._decode(self._ctx.handle, entries)
        return out

    def retire_rows(self, rows: torch.Tensor) -> None:
        """Rows (B,) bool that later steps leave out (see ``fedpt.proxy.retire_rows``)."""
        self._retired = set(torch.nonzero(rows).flatten().tolist())

    def reserve_new_tokens(self, count: int) -> None:
        """The next session decodes at most ``count`` tokens per row (``fedpt.proxy.reserve_new_tokens``)."""
        self._room = count

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep_last: int = 0) -> torch.Tensor:
        """(B, K, V) logits at the last K positions (all T when ``keep_last`` is 0). Positions
        that are left padding get zeros: no model output exists for them."""
        rows = _real_tokens(input_ids, attention_mask)
        keep = keep_last or input_ids.shape[1]
        handle = self._context(len(rows), max(len(r) for r in rows))
        firsts = [max(0, len(seq) - keep) for seq in rows]  # first real position inside the kept window
        entries = [(tok, pos, row, pos >= first)
                   for row, (seq, first) in enumerate(zip(rows, firsts)) for pos, tok in enumerate(seq)]
        logits = self._decode(handle, entries)  # row by row, in order
        out = torch.zeros(len(rows), keep, self.model.n_vocab)
        offset = 0
        for row, (seq, first) in enumerate(zip(rows, firsts)):
            count = len(seq) - first
            out[row, keep - count:] = logits[offset: offset + count]
            offset += count
        self._next_pos = []
        return out

    def close(self) -> None:
        self._free_context()
        self._next_pos = []
        self._room = None



class LlamaCppAdapter(_ClosedWhenCollected):
    """A LoRA adapter (GGUF, ``export_lora_gguf``) loaded onto a llama.cpp model; contexts made
    with it compute ``W x + (alpha / r) B A x`` for every adapted layer, as peft does."""

    def __init__(self, model: LlamaCppModel, path: Path) -> None:
        self.model, self.path = model, Path(path)
        self.handle = model.lib.llama_adapter_lora_init(model.model, str(self.path).encode())
        # what the adapter computes, for PromptStates: two exports of one adapter are one file
        self.digest = hashlib.sha256(self.path.read_bytes()).hexdigest() if self.handle else ""
        if not self.handle:
            raise FedPTError(f"llama.cpp could not load the LoRA adapter {self.path} onto {model.path.name}")

    def close(self) -> None:
        if getattr(self, "handle", None) and self.model.model:
            self.model.lib.llama_adapter_lora_free(self.handle)
            self.handle = None



class LlamaCppAdapterDiff(TwoSourceDiff):
    """``z_tuned - z_base`` of the small LM in llama.cpp: two contexts over one set of weights,
    one with the round's LoRA adapter. The small LM's own weights are the GGUF's, as in torch."""

    def __init__(self, model: LlamaCppModel, adapter: LlamaCppAdapter) -> None:
        super().__init__(model.source(adapter), model.source())
        self.adapter = adapter  # the tuned context uses it: it must outlive the contexts


def export_lora_gguf(peft_model: Any, out: Path) -> Path:
    """The active LoRA adapter of a peft model over a Qwen2 base as a GGUF adapter llama.cpp loads.

    Tensors ``blk.N.<layer>.weight.lora_a`` (r x in) and ``.lora_b`` (out x r), as llama.cpp's
    own converter names them; ``adapter.lora.alpha`` carries peft's ``lora_alpha``, so llama.cpp's
    scale alpha / r equals peft's. Plain LoRA only (no rsLoRA, DoRA or per-layer ranks).
    """
    import gguf
    from peft import get_peft_model_state_dict

    config = peft_model.peft_config[peft_model.active_adapter]
    if getattr(config, "use_rslora", False) or getattr(config, "use_dora", False) or config.rank_pattern:
        raise FedPTError("only plain LoRA adapters can run in llama.cpp (no rsLoRA, DoRA or rank_pattern)")
    base_config = peft_model.get_base_model().config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, base_config.num_hidden_layers)
    writer = gguf.GGUFWriter(str(out) + ".tmp", "qwen2")
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(config.lora_alpha))
    for key, tensor in get_peft_model_state_dict(peft_model).items():
        module, part = key.rsplit(".lora_", 1)  # "...q_proj", "A.weight"
        module = module.removeprefix("base_model.model.")
        target = names.get_name(module)
        if target is None:
            raise FedPTError(f"LoRA on {module}: llama.cpp has no such tensor; adapt attention/MLP projections only")
        writer.add_tensor(f"{target}.weight.lora_{part[0].lower()}", tensor.float().numpy())
    return _finish(writer, out)


def _finish(writer: Any, out: Path) -> Path:
    """Write a GGUF built under ``out.tmp`` and rename it into place: a killed export leaves no half file."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    Path(str(out) + ".tmp").rename(out)
    return out


def _real_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[list[int]]:
    rows = [ids[mask.bool()].tolist() for ids, mask in zip(input_ids, attention_mask)]
    if any(not row for row in rows):
        raise FedPTError("a prompt in the batch has no tokens (all padding)")
    return rows


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# -- GGUF files ------------------------------------------------------------------------------


def gguf_path(spec: str) -> Path:
    """The GGUF file of a model spec, for llama.cpp.

    A ``.gguf`` file is used as is; a registered real model uses the very GGUF file it was
    converted from (kept in its cache); a built-in tiny model or a local Qwen2 directory is
    exported once to an unquantized GGUF beside its weights.
    """
    from fedpt.models.assets import ASSETS, ensure_gguf
    from fedpt.models.loading import fedpt_home, resolve_spec

    if spec in ASSETS:
        return ensure_gguf(spec, fedpt_home())
    resolved = resolve_spec(spec)
    if resolved.gguf_file:
        return Path(resolved.path) / resolved.gguf_file
    directory = Path(resolved.path)
    if not directory.is_dir():
        raise FedPTError(f"model.large_backend = 'llamacpp' needs a local model for '{spec}': a .gguf file, "
                         "a registered model (fedpt models list) or a model directory")
    target = directory / "model.gguf"
    if not target.is_file():
        export_gguf(directory, target)
    return target


def export_gguf(model_dir: Path, out: Path) -> Path:
    """Write a Hugging Face Qwen2 model directory as an unquantized (f32) GGUF llama.cpp can run.

    Only what llama.cpp's ``qwen2`` architecture reads: hyperparameters, the byte-level BPE
    vocabulary and merges (token ids are what FedPT sends; llama.cpp never tokenizes here), and
    the tensors under llama.cpp's names (``gguf``'s own name map). Written to a temporary file
    and renamed, so a killed export leaves no half file.
    """
    import gguf
    from safetensors.torch import load_file

    config = json.loads((model_dir / "config.json").read_text())
    if config.get("model_type") != "qwen2":
        raise FedPTError(f"{model_dir} is a {config.get('model_type')!r} model; exporting to GGUF supports qwen2 "
                         "only: give model.large a .gguf file instead")
    layers = config["num_hidden_layers"]
    writer = gguf.GGUFWriter(str(out) + ".tmp", "qwen2")
    writer.add_name(model_dir.name)
    writer.add_context_length(config.get("max_position_embeddings", 32768))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(layers)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config.get("num_key_value_heads", config["num_attention_heads"]))
    rope = config.get("rope_parameters") or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    _add_vocabulary(writer, model_dir, config["vocab_size"])

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, layers)
    tensors = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        tensors |= load_file(file)
    if config.get("tie_word_embeddings") and "lm_head.weight" not in tensors:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    for name, tensor in tensors.items():
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise FedPTError(f"{model_dir}: tensor {name} has no llama.cpp name; cannot export it to GGUF")
        writer.add_tensor(target, tensor.float().numpy())
    return _finish(writer, out)


def _add_vocabulary(writer: Any, model_dir: Path, vocab_size: int) -> None:
    import gguf

    spec = json.loads((model_dir / "tokenizer.json").read_text())
    if spec["model"]["type"] != "BPE":
        raise FedPTError(f"{model_dir}: a {spec['model']['type']} tokenizer; exporting to GGUF supports BPE only")
    by_id = {idx: tok for tok, idx in spec["model"]["vocab"].items()}
    special = {added["id"]: added["content"] for added in spec.get("added_tokens", [])}
    by_id |= special
    tokens, types = [], []
    for idx in range(vocab_size):  # a head padded past the tokenizer gets unused placeholders
        if idx in by_id:
            tokens.append(by_id[idx])
            types.append(gguf.TokenType.CONTROL if idx in special else gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{idx}]")
            types.append(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    config = json.loads((model_dir / "config.json").read_text())
    for key, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                     ("pad_token_id", writer.add_pad_token_id)):
        value = config.get(key)
        if isinstance(value, int):
            add(value)


if __name__ == "__main__":
    import sys

    _probe_main(sys.argv[1])
