"""Instruction data: records, splits, partitions, prompt templates. A tokenizer at most; no model."""
