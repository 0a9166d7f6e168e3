"""JSONL loading: alpaca and chat rows parse; a bad line is named by file and line number."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from zenfed.data import Example, Message, exact_match, load_jsonl, normalise_answer, write_jsonl
from zenfed.data.jsonl import example_to_row
from zenfed.errors import DataError


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


ALPACA = json.dumps({"instruction": "Route this ticket.", "input": "I cannot log in.", "output": "Q-ACC"})
ALPACA_NO_INPUT = json.dumps({"instruction": "Say hi.", "output": "hi"})
CHAT = json.dumps(
    {
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Code for chest pain?"},
            {"role": "assistant", "content": "P1"},
        ]
    }
)


def test_alpaca_and_chat_rows_parse_into_prompt_and_response(tmp_path):
    # Prepare
    path = write_lines(tmp_path / "train.jsonl", [ALPACA, "", ALPACA_NO_INPUT, CHAT])

    # Execute
    examples = load_jsonl(path)

    # Assert: blank lines are skipped; input is appended to the instruction; the last chat turn
    # is the response and earlier turns are the prompt.
    assert len(examples) == 3
    assert examples[0] == Example(prompt=(Message("user", "Route this ticket.\n\nI cannot log in."),), response="Q-ACC")
    assert examples[1].prompt == (Message("user", "Say hi."),) and examples[1].response == "hi"
    assert examples[2].prompt == (
        Message("system", "You are terse."),
        Message("user", "Code for chest pain?"),
    )
    assert examples[2].response == "P1"


def test_rows_round_trip_through_write_jsonl(tmp_path):
    # Prepare
    examples = [
        Example(prompt=(Message("user", "A\n\nB"),), response="x", task="t1"),
        Example(prompt=(Message("system", "s"), Message("user", "u")), response="y"),
    ]

    # Execute
    write_jsonl(tmp_path / "out.jsonl", (example_to_row(e) for e in examples))
    loaded = load_jsonl(tmp_path / "out.jsonl")

    # Assert
    assert loaded == examples
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left


@pytest.mark.parametrize(
    ("bad_line", "what"),
    [
        ('{"instruction": "x", "output": ', "not valid JSON"),
        ('["a", "b"]', "expected a JSON object, got list"),
        ('{"instruction": 5, "output": "x"}', "field 'instruction' must be a string, got int"),
        ('{"instruction": "x", "output": ["P1"]}', "field 'output' must be a string, got list"),
        ('{"instruction": "x", "output": "   "}', "field 'output' is empty"),
        ('{"instruction": "x", "output": "y", "extra": 1}', "unknown fields ['extra']"),
        ('{"prompt": "x", "completion": "y"}', "neither alpaca-style"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "at least two turns"),
        (
            '{"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "x"}]}',
            "the last message must be the assistant's response",
        ),
        (
            '{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]}',
            "messages[1] needs a role",
        ),
        (
            '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": 3}]}',
            "string content",
        ),
        (
            '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]}',
            "response is empty",
        ),
    ],
)
def test_a_bad_line_is_named_by_file_and_line_number(tmp_path, bad_line, what):
    # Prepare: two good lines, a blank line, then the bad one on line 4.
    path = write_lines(tmp_path / "data.jsonl", [ALPACA, CHAT, "", bad_line, ALPACA])

    # Execute
    with pytest.raises(DataError) as caught:
        load_jsonl(path)

    # Assert
    message = str(caught.value)
    assert message.startswith(f"{path}, line 4: ")
    assert what in message


def test_an_empty_file_is_an_error(tmp_path):
    # Prepare
    path = write_lines(tmp_path / "empty.jsonl", ["", "  "])

    # Execute / Assert
    with pytest.raises(DataError, match="holds no examples"):
        load_jsonl(path)


def test_a_missing_file_points_at_the_site_policy(tmp_path):
    # Execute / Assert
    with pytest.raises(DataError, match="does not exist; check the site policy"):
        load_jsonl(tmp_path / "missing.jsonl")


@pytest.mark.parametrize(
    ("prediction", "reference", "equal"),
    [
        ("P1", "P1", True),
        ("  P1\n", "P1", True),
        ("Q-ACC  now", "Q-ACC now", True),
        ("p1", "P1", False),
        ("P1.", "P1", False),
        ("", "P1", False),
    ],
)
def test_exact_match_normalises_only_whitespace(prediction, reference, equal):
    # Execute
    score = exact_match([prediction], [reference])

    # Assert
    assert score == (1.0 if equal else 0.0)
    assert (normalise_answer(prediction) == normalise_answer(reference)) is equal


def test_exact_match_is_the_fraction_of_hits():
    # Execute / Assert
    assert exact_match(["a", "b", "c", "d"], ["a", "x", "c", "y"]) == 0.5
    assert exact_match([], []) == 0.0
    with pytest.raises(ValueError):
        exact_match(["a"], ["a", "b"])


def test_invalid_utf8_names_the_file_and_line(tmp_path):
    # Prepare
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"instruction": "a", "output": "b"}\n{"instruction": "\xff\xfe", "output": "b"}\n')

    # Execute / Assert
    with pytest.raises(DataError, match=r"line 2.*not valid UTF-8"):
        load_jsonl(path)
