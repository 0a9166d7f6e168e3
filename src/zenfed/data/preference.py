"""Preference pairs for DPO: a prompt, the response to prefer and the one to avoid.

Rows are JSONL, either ``{"prompt", "chosen", "rejected", "task"?}`` with the
prompt as one user turn, or ``{"messages", "chosen", "rejected", "task"?}`` with
the prompt as chat turns ending with the user's. Both read into one
``PreferencePair`` type; ``write_jsonl`` writes them back.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from zenfed.data.jsonl import _ROLES, Example, Message, _bad, normalise_answer, read_rows

_FIELDS = ("prompt", "messages", "chosen", "rejected", "task")


@dataclass(frozen=True)
class PreferencePair:
    """A prompt (chat turns) with a preferred and a dispreferred response."""

    prompt: tuple[Message, ...]
    chosen: str
    rejected: str
    task: str | None = None

    def chosen_example(self) -> Example:
        """Return the prompt and the preferred response as an ``Example``."""
        return Example(prompt=self.prompt, response=self.chosen, task=self.task)

    def rejected_example(self) -> Example:
        """Return the prompt and the dispreferred response as an ``Example``."""
        return Example(prompt=self.prompt, response=self.rejected, task=self.task)


def _require_text(row: dict[str, object], key: str, what: str, path: Path, line_no: int) -> str:
    if key not in row:
        raise _bad(path, line_no, f"field {key!r} is missing; give it {what}")
    value = row[key]
    if not isinstance(value, str):
        raise _bad(path, line_no, f"field {key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise _bad(path, line_no, f"field {key!r} is empty; give it {what}")
    return value


def _parse_turns(messages: object, path: Path, line_no: int) -> tuple[Message, ...]:
    if not isinstance(messages, list) or not messages:
        raise _bad(path, line_no, "'messages' must be a list of at least one turn, ending with the user's")
    turns = []
    for index, turn in enumerate(messages):
        if not isinstance(turn, dict):
            raise _bad(path, line_no, f"messages[{index}] must be {{'role': ..., 'content': ...}}, "
                                      f"got {type(turn).__name__}")
        unknown = set(turn) - {"role", "content"}
        if unknown:
            raise _bad(path, line_no, f"messages[{index}] has unknown keys {sorted(unknown)}; "
                                      "a turn holds only 'role' and 'content'")
        if turn.get("role") not in _ROLES:
            raise _bad(path, line_no, f"messages[{index}] has role {turn.get('role')!r}; use one of {_ROLES}")
        if not isinstance(turn.get("content"), str):
            raise _bad(path, line_no, f"messages[{index}] content must be a string, "
                                      f"got {type(turn.get('content')).__name__}")
        turns.append(Message(turn["role"], turn["content"]))
    last = len(turns) - 1
    if turns[last].role != "user":
        raise _bad(path, line_no, f"messages[{last}] has role {turns[last].role!r}; the last turn must be the "
                                  "user's, since 'chosen' and 'rejected' answer it")
    if not turns[last].content.strip():
        raise _bad(path, line_no, f"messages[{last}] is empty; give the user's turn text")
    return tuple(turns)


def parse_preference_row(row: object, *, path: Path, line_no: int) -> PreferencePair:
    """Turn one decoded JSON row into a PreferencePair.

    Args:
        row: The decoded JSON value of one line.
        path: The file the row came from, for error messages.
        line_no: The 1-based line number of the row, for error messages.

    Returns:
        The pair, with a ``"prompt"`` row's text as a single user turn.

    Raises:
        DataError: Naming the file, the line, the field and what is wrong with the row.
    """
    if not isinstance(row, dict):
        raise _bad(path, line_no, f"expected a JSON object, got {type(row).__name__}")
    unknown = set(row) - set(_FIELDS)
    if unknown:
        raise _bad(path, line_no, f"unknown fields {sorted(unknown)} in a preference row; "
                                  "use 'prompt' or 'messages', 'chosen', 'rejected' and optionally 'task'")
    if ("prompt" in row) == ("messages" in row):
        which = "both" if "prompt" in row else "neither"
        raise _bad(path, line_no, f"the row has {which} of 'prompt' and 'messages'; give exactly one of them")
    if "prompt" in row:
        text = _require_text(row, "prompt", "the user's text", path, line_no)
        prompt: tuple[Message, ...] = (Message("user", text),)
    else:
        prompt = _parse_turns(row["messages"], path, line_no)
    chosen = _require_text(row, "chosen", "the preferred response", path, line_no)
    rejected = _require_text(row, "rejected", "the dispreferred response", path, line_no)
    if normalise_answer(chosen) == normalise_answer(rejected):
        raise _bad(path, line_no, "fields 'chosen' and 'rejected' hold the same answer; "
                                  "a pair needs two different answers")
    task = row.get("task")
    if task is not None and not isinstance(task, str):
        raise _bad(path, line_no, f"field 'task' must be a string, got {type(task).__name__}")
    return PreferencePair(prompt=prompt, chosen=chosen, rejected=rejected, task=task or None)


def load_preferences(path: str | Path) -> list[PreferencePair]:
    """Read a JSONL file of preference pairs.

    Blank lines are skipped. Every other line must be a valid row; the whole
    file is checked before any pair is returned.

    Args:
        path: The JSONL file.

    Returns:
        The pairs, in file order.

    Raises:
        DataError: If the file is missing, holds no pairs, or a line is bad (naming the line).
    """
    return read_rows(path, parse_preference_row, what="preference", items="preference pairs")


def preference_to_row(pair: PreferencePair) -> dict[str, object]:
    """Return the JSONL row for ``pair``, for ``write_jsonl``.

    A prompt of a single user turn is written as ``"prompt"``, any other as ``"messages"``.
    """
    row: dict[str, object]
    if len(pair.prompt) == 1 and pair.prompt[0].role == "user":
        row = {"prompt": pair.prompt[0].content}
    else:
        row = {"messages": [{"role": m.role, "content": m.content} for m in pair.prompt]}
    row["chosen"] = pair.chosen
    row["rejected"] = pair.rejected
    if pair.task:
        row["task"] = pair.task
    return row
