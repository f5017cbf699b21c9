"""Prompt templates and tokenization: response-only labels for SFT, left-padded prompt batches."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedpt.data.records import Example

if TYPE_CHECKING:
    import torch

IGNORE_INDEX = -100  # label value that cross-entropy skips: prompt and padding tokens

ALPACA = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


def format_prompt(example: Example, template: str, tokenizer: Any = None) -> str:
    """The prompt text the models see: Alpaca style (MiniLLM's protocol) or the chat template."""
    if template == "chat":
        user = example.instruction if not example.context else f"{example.instruction}\n\n{example.context}"
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )
    if example.context.strip():
        return ALPACA_WITH_INPUT.format(instruction=example.instruction, input=example.context)
    return ALPACA.format(instruction=example.instruction)


def encode_prompt(tokenizer: Any, prompt: str, max_prompt_tokens: int) -> list[int]:
    """Prompt token ids; long prompts keep their *end* (where the instruction meets the response)."""
    return tokenizer(prompt, add_special_tokens=False)["input_ids"][-max_prompt_tokens:]


def encode_sft(
    tokenizer: Any, prompt: str, response: str, max_prompt_tokens: int, max_seq_len: int
) -> tuple[list[int], list[int]]:
    """Token ids of prompt+response+EOS and labels that mask the prompt (loss on the response only).

    """
    prompt_ids = encode_prompt(tokenizer, prompt, max_prompt_tokens)
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    response_ids = response_ids[: max_seq_len - len(prompt_ids)]
    input_ids = prompt_ids + response_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + response_ids
    return input_ids, labels


def collate(rows: list[tuple[list[int], list[int]]], pad_id: int, left: bool = False) -> dict[str, "torch.Tensor"]:
    """Padded batch (B, T) of input_ids, attention_mask, labels.

    Right padding for training; left padding (``left=True``) ends every row in the last
    column, so that responses line up at the end (distillation scores only those columns).
    """
    import torch

    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, labs) in enumerate(rows):
        span = slice(width - len(ids), width) if left else slice(0, len(ids))
        input_ids[i, span] = torch.tensor(ids, dtype=torch.long)
        labels[i, span] = torch.tensor(labs, dtype=torch.long)
        mask[i, span] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def pack(rows: list[tuple[list[int], list[int]]]) -> dict[str, "torch.Tensor"]:
    """One (1, N) sequence of the rows' tokens end to end, with ``position_ids`` restarting at 0 for
    each row and no attention mask: transformers then builds a block-diagonal causal mask
    (``masking_utils.find_packed_sequence_indices``), so no row sees another and no padding is
    computed. Each row's first label is ignored, so no row's last token learns to predict the next
    row's first."""
    import torch

    input_ids, labels, positions = [], [], []
    for ids, labs in rows:
        input_ids += ids
        labels += [IGNORE_INDEX] + list(labs[1:])
        positions += range(len(ids))
    as_row = lambda values: torch.tensor([values], dtype=torch.long)  # noqa: E731
    return {"input_ids": as_row(input_ids), "position_ids": as_row(positions), "labels": as_row(labels)}


def encode_prompts_left(
    tokenizer: Any, prompts: list[str], max_prompt_tokens: int
) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Left-padded prompt batch (B, T) so that every row's next token sits in the last column."""
    encoded = [encode_prompt(tokenizer, p, max_prompt_tokens) for p in prompts]
    batch = collate([(ids, ids) for ids in encoded], tokenizer.pad_token_id, left=True)
    return batch["input_ids"], batch["attention_mask"]
