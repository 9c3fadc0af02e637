"""Prompts: Alpaca loading (hub, local file or shipped copy), prompt text, shuffle/slices, splits."""

from lsdist_jax.data.alpaca import load_records, read_local, read_shipped
from lsdist_jax.data.prompts import (SPLITS, Prompt, assign_split, load_prompts, parse_slice,
                                     prompt_text, select)

__all__ = ["SPLITS", "Prompt", "assign_split", "load_prompts", "load_records", "parse_slice",
           "prompt_text", "read_local", "read_shipped", "select"]
