"""JSONL datasets: alpaca-style rows and chat rows, read into one ``Example`` type."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from zenfed.atomic import atomic_write_bytes
from zenfed.errors import DataError

_ROLES = ("system", "user", "assistant")
_Row = TypeVar("_Row")


@dataclass(frozen=True)
class Message:
    """One chat turn."""

    role: str
    content: str


@dataclass(frozen=True)
class Example:
    """A prompt (chat turns) and the response the model should learn to give."""

    prompt: tuple[Message, ...]
    response: str
    task: str | None = None

    def prompt_dicts(self) -> list[dict[str, str]]:
        """Return the prompt as chat-template dicts."""
        return [{"role": m.role, "content": m.content} for m in self.prompt]


def _bad(path: Path, line_no: int, what: str) -> DataError:
    return DataError(f"{path}, line {line_no}: {what}")


def _require_str(row: dict[str, object], key: str, path: Path, line_no: int, *, empty_ok: bool) -> str:
    value = row.get(key, "" if empty_ok else None)
    if not isinstance(value, str):
        raise _bad(path, line_no, f"field {key!r} must be a string, got {type(value).__name__}")
    if not empty_ok and not value.strip():
        raise _bad(path, line_no, f"field {key!r} is empty; give it text")
    return value


def parse_row(row: object, *, path: Path, line_no: int) -> Example:
    """Turn one decoded JSON row into an Example.

    Alpaca rows: ``{"instruction", "input" (optional), "output"}``. Chat rows:
    ``{"messages": [{"role", "content"}, ...]}`` ending with an assistant turn,
    which is the response.

    Raises:
        DataError: Naming the file, the line and what is wrong with the row.
    """
    if not isinstance(row, dict):
        raise _bad(path, line_no, f"expected a JSON object, got {type(row).__name__}")
    task = row.get("task") if isinstance(row.get("task"), str) else None
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or len(messages) < 2:
            raise _bad(path, line_no, "'messages' must be a list of at least two turns")
        turns = []
        for i, turn in enumerate(messages):
            if not isinstance(turn, dict) or set(turn) - {"role", "content"} or "role" not in turn:
                raise _bad(path, line_no, f"messages[{i}] must be {{'role': ..., 'content': ...}}")
            if turn["role"] not in _ROLES or not isinstance(turn.get("content"), str):
                raise _bad(
                    path, line_no,
                    f"messages[{i}] needs a role in {_ROLES} and string content",
                )
            turns.append(Message(turn["role"], turn["content"]))
        if turns[-1].role != "assistant":
            raise _bad(path, line_no, "the last message must be the assistant's response")
        if not turns[-1].content.strip():
            raise _bad(path, line_no, "the assistant's response is empty")
        return Example(prompt=tuple(turns[:-1]), response=turns[-1].content, task=task)
    if "instruction" in row or "output" in row:
        unknown = set(row) - {"instruction", "input", "output", "task"}
        if unknown:
            raise _bad(path, line_no, f"unknown fields {sorted(unknown)} in an alpaca row")
        instruction = _require_str(row, "instruction", path, line_no, empty_ok=False)
        extra = _require_str(row, "input", path, line_no, empty_ok=True)
        output = _require_str(row, "output", path, line_no, empty_ok=False)
        content = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return Example(prompt=(Message("user", content),), response=output, task=task)
    raise _bad(
        path, line_no,
        "row is neither alpaca-style ({'instruction','input','output'}) nor chat ({'messages'})",
    )


def read_rows(path: str | Path, parse: Callable[..., _Row], *, what: str, items: str) -> list[_Row]:
    """Read every row of a JSONL file with ``parse(row, path=, line_no=)``; blank lines are skipped.

    The whole file is checked before anything is returned: a bad line leaves nothing half-loaded.

    Raises:
        DataError: If the file (a ``what`` file) is missing or holds no ``items``, or a line is
            not UTF-8, not JSON or not a valid row (naming the line).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} file {path} does not exist; check the site policy's dataset path")
    rows: list[_Row] = []
    with path.open("rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise _bad(path, line_no, f"not valid UTF-8 (byte {err.start + 1} of the line); "
                                          "save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise _bad(path, line_no, f"not valid JSON ({err.msg} at column {err.colno})") from None
            rows.append(parse(row, path=path, line_no=line_no))
    if not rows:
        raise DataError(f"{what} file {path} holds no {items}; add one JSON object per line")
    return rows


def load_jsonl(path: str | Path) -> list[Example]:
    """Read a JSONL dataset file of SFT rows (see ``parse_row``).

    Raises:
        DataError: If the file is missing, empty, or a line is bad (naming the line).
    """
    return read_rows(path, parse_row, what="dataset", items="examples")


def example_to_row(example: Example, *, style: str = "alpaca") -> dict[str, object]:
    """Return the JSONL row for ``example`` (``style`` is 'alpaca' or 'chat')."""
    if style == "alpaca" and len(example.prompt) == 1 and example.prompt[0].role == "user":
        instruction, _, extra = example.prompt[0].content.partition("\n\n")
        row: dict[str, object] = {"instruction": instruction, "input": extra, "output": example.response}
    else:
        row = {"messages": [*example.prompt_dicts(), {"role": "assistant", "content": example.response}]}
    if example.task:
        row["task"] = example.task
    return row


def write_jsonl(path: str | Path, rows: Iterable[dict[str, object]]) -> None:
    """Write rows atomically: a crash never leaves a half-written dataset file."""
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    atomic_write_bytes(Path(path), text.encode("utf-8"))


def normalise_answer(text: str) -> str:
    """Return ``text`` as compared for exact match (trimmed, single spaces)."""
    return " ".join(text.strip().split())


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Return the fraction of predictions equal to their reference after normalising."""
    if not references:
        return 0.0
    hits = sum(normalise_answer(p) == normalise_answer(r) for p, r in zip(predictions, references, strict=True))
    return hits / len(references)
