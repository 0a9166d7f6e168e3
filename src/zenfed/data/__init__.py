"""Datasets: JSONL loading, chat templating, and the built-in non-IID benchmark."""

from zenfed.data.builtin import TASKS, make_builtin
from zenfed.data.jsonl import Example, Message, exact_match, load_jsonl, normalise_answer, write_jsonl
from zenfed.data.tokenize import TokenizedExample, collate, tokenize_all, tokenize_example

__all__ = [
    "TASKS", "Example", "Message", "TokenizedExample", "collate", "exact_match", "load_jsonl",
    "make_builtin", "normalise_answer", "tokenize_all", "tokenize_example", "write_jsonl",
]
