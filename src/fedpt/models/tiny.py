"""A tiny small/large model pair built in code, offline, for tests and the ``tiny`` preset.

Both are Qwen2-shaped (the real pair's architecture) and share one byte-level BPE tokenizer
trained on a vendored text sample, so proxy-tuning can add their logits index by index. A
few quick language-modelling steps on that sample give them non-random behaviour; the
"large" one gets more layers, width and steps so that it is the better model, as in real
pairs. Everything is seeded: the same call builds the same weights.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

TINY_VERSION = 2  # bump when the recipe changes, so stale caches are rebuilt
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_end|>"]


@dataclass(frozen=True)
class TinyShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    pretrain_steps: int


TINY_SHAPES = {
    "tiny-small": TinyShape(hidden=64, layers=2, heads=4, kv_heads=2, pretrain_steps=100),
    "tiny-large": TinyShape(hidden=128, layers=4, heads=4, kv_heads=2, pretrain_steps=200),
}


def corpus_lines() -> list[str]:
    text = (resources.files("fedpt") / "data" / "vendored" / "tiny-corpus.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


def build_tokenizer(vocab_size: int = 2048):
    """Byte-level BPE (like Qwen's) trained on the vendored corpus; deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_lines(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token="<|endoftext|>"
    )


def build_model(shape: TinyShape, tokenizer, seed: int, pretrain_steps: int | None = None):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden,
        intermediate_size=shape.hidden * 2,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    steps = shape.pretrain_steps if pretrain_steps is None else pretrain_steps
    if steps:
        _pretrain(model, tokenizer, steps, seed)
    return model.eval()


def _pretrain(model, tokenizer, steps: int, seed: int, batch: int = 16, seq: int = 64) -> None:
    """A few next-token steps on the vendored corpus so the models emit English-like text."""
    import torch

    ids = tokenizer("\n".join(corpus_lines()), add_special_tokens=False)["input_ids"]
    data = torch.tensor(ids, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=gen)
        x = torch.stack([data[s: s + seq] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        optim.step()
        optim.zero_grad()
    model.eval()


def ensure_tiny_model(name: str, home: Path) -> Path:
    """Build (once) and return the directory of a built-in tiny model; atomic on disk."""
    target = home / "models" / f"{name}-v{TINY_VERSION}"
    if (target / "config.json").is_file():
        return target
    tokenizer = _shared_tokenizer(home)
    model = build_model(TINY_SHAPES[name], tokenizer, seed=1 if name == "tiny-small" else 2)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    _publish(tmp, target)
    return target


def _shared_tokenizer(home: Path):
    """Both tiny models must carry the very same tokenizer: build it once per cache."""
    from transformers import AutoTokenizer

    target = home / "models" / f"tiny-tokenizer-v{TINY_VERSION}"
    if not (target / "tokenizer.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tokenizer-", dir=target.parent))
        build_tokenizer().save_pretrained(tmp)
        _publish(tmp, target)
    return AutoTokenizer.from_pretrained(target)


def _publish(tmp: Path, target: Path) -> None:
    """Rename a finished temp dir into place: a half-written cache is never visible."""
    try:
        tmp.rename(target)
    except OSError:  # another process finished first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
