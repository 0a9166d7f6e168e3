"""Datasets: JSONL loading, preference pairs, chat templating, and the built-in non-IID benchmark."""

from zenfed.data.builtin import TASKS, make_builtin
from zenfed.data.jsonl import Example, Message, exact_match, load_jsonl, normalise_answer, write_jsonl
from zenfed.data.preference import PreferencePair, load_preferences
from zenfed.data.tokenize import TokenizedExample, collate, tokenize_all, tokenize_example

__all__ = [
    "TASKS", "Example", "Message", "PreferencePair", "TokenizedExample", "collate", "exact_match",
    "load_jsonl", "load_preferences", "make_builtin", "normalise_answer", "tokenize_all", "tokenize_example",
    "write_jsonl",
]
