"""Prompts: data sources (the Alpaca hub set or shipped pool, instructions_mix, local files),
prompt text and identity (a hash of the text), shuffle/slices, splits by that identity."""

from lsdist_jax.data.alpaca import read_local, read_pool, read_shipped
from lsdist_jax.data.prompts import (SPLITS, Prompt, assign_split, key_hex, key_words,
                                     parse_slice, prompt_key, prompt_text, select)
from lsdist_jax.data.sources import (NAMES, Source, load_prompts, load_records, open_source,
                                     parse_datasets, read_source)

__all__ = ["NAMES", "SPLITS", "Prompt", "Source", "assign_split", "key_hex", "key_words",
           "load_prompts", "load_records", "open_source", "parse_datasets", "parse_slice",
           "prompt_key", "prompt_text", "read_local", "read_pool", "read_shipped", "read_source",
           "select"]
