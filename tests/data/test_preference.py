"""Preference pairs: rows parse or are named by file, line and field; the built-in pairs are DPO-ready."""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter
from pathlib import Path

import pytest

from zenfed.data import TASKS, Message, PreferencePair, load_preferences, make_builtin, write_jsonl
from zenfed.data.builtin import Task, make_example
from zenfed.data.builtin_preferences import CUES_BY_TASK, make_preference_pair, write_builtin_preferences
from zenfed.data.jsonl import Example
from zenfed.data.preference import preference_to_row
from zenfed.errors import DataError


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def row(**fields: object) -> str:
    return json.dumps(fields)


GOOD = row(prompt="Code for chest pain?", chosen="P1: chest pain needs care now.", rejected="P4", task="triage")
USER = {"role": "user", "content": "Code for a rash?"}
CHAT = row(messages=[{"role": "system", "content": "Be careful."}, USER], chosen="P3", rejected="P1")


@pytest.mark.parametrize(
    ("bad_line", "what"),
    [
        ('{"prompt": "x", "chosen": ', "not valid JSON"),
        ('["x", "P1", "P2"]', "expected a JSON object, got list"),
        (row(chosen="P1", rejected="P2"), "neither of 'prompt' and 'messages'"),
        (row(prompt="x", messages=[USER], chosen="P1", rejected="P2"), "both of 'prompt' and 'messages'"),
        (row(prompt="x", rejected="P2"), "field 'chosen' is missing"),
        (row(prompt="x", chosen="P1"), "field 'rejected' is missing"),
        (row(prompt="x", chosen="P1", rejected=2), "field 'rejected' must be a string, got int"),
        (row(prompt="x", chosen=" \n", rejected="P2"), "field 'chosen' is empty"),
        (row(prompt="", chosen="P1", rejected="P2"), "field 'prompt' is empty"),
        (row(prompt="x", chosen="P1  is right", rejected=" P1 is right\n"), "a pair needs two different answers"),
        (row(prompt="x", chosen="P1", rejected="P2", score=0.5), "unknown fields ['score']"),
        (row(prompt="x", chosen="P1", rejected="P2", task=3), "field 'task' must be a string, got int"),
        (row(messages=[], chosen="P1", rejected="P2"), "'messages' must be a list of at least one turn"),
        (row(messages=["hi"], chosen="P1", rejected="P2"), "messages[0] must be {'role': ..., 'content': ...}"),
        (row(messages=[{**USER, "name": "a"}], chosen="P1", rejected="P2"), "messages[0] has unknown keys ['name']"),
        (row(messages=[{"role": "bot", "content": "x"}], chosen="P1", rejected="P2"), "messages[0] has role 'bot'"),
        (row(messages=[{"role": "user", "content": 3}], chosen="P1", rejected="P2"), "messages[0] content must be"),
        (
            row(messages=[USER, {"role": "assistant", "content": "P3"}], chosen="P1", rejected="P2"),
            "messages[1] has role 'assistant'; the last turn must be the user's",
        ),
    ],
)
def test_a_bad_row_is_named_by_file_line_and_field(tmp_path, bad_line, what):
    # Prepare: two good lines, a blank line, then the bad one on line 4.
    path = write_lines(tmp_path / "pref.jsonl", [GOOD, CHAT, "", bad_line, GOOD])

    # Execute
    with pytest.raises(DataError) as caught:
        load_preferences(path)

    # Assert
    message = str(caught.value)
    assert message.startswith(f"{path}, line 4: ")
    assert what in message


def test_prompt_and_messages_rows_parse_into_pairs(tmp_path):
    # Prepare
    path = write_lines(tmp_path / "pref.jsonl", [GOOD, "", CHAT])

    # Execute
    pairs = load_preferences(path)

    # Assert: a prompt row is one user turn; a messages row keeps its turns; blank lines are skipped.
    assert pairs == [
        PreferencePair(prompt=(Message("user", "Code for chest pain?"),), chosen="P1: chest pain needs care now.",
                       rejected="P4", task="triage"),
        PreferencePair(prompt=(Message("system", "Be careful."), Message("user", "Code for a rash?")),
                       chosen="P3", rejected="P1"),
    ]
    assert pairs[1].chosen_example() == Example(prompt=pairs[1].prompt, response="P3")
    assert pairs[0].rejected_example() == Example(prompt=pairs[0].prompt, response="P4", task="triage")


def test_pairs_round_trip_through_write_jsonl(tmp_path):
    # Prepare
    pairs = [
        PreferencePair(prompt=(Message("user", "A\n\nB"),), chosen="x", rejected="y", task="t1"),
        PreferencePair(prompt=(Message("system", "s"), Message("user", "u")), chosen="x", rejected="z"),
        PreferencePair(prompt=(Message("user", "u1"), Message("assistant", "a"), Message("user", "u2")),
                       chosen="yes", rejected="no", task="t2"),
    ]

    # Execute
    write_jsonl(tmp_path / "pref.jsonl", (preference_to_row(p) for p in pairs))
    loaded = load_preferences(tmp_path / "pref.jsonl")

    # Assert: a single user turn is written as "prompt", anything else as "messages".
    assert loaded == pairs
    rows = [json.loads(line) for line in (tmp_path / "pref.jsonl").read_text().splitlines()]
    assert [sorted(r) for r in rows] == [
        ["chosen", "prompt", "rejected", "task"], ["chosen", "messages", "rejected"],
        ["chosen", "messages", "rejected", "task"],
    ]


def test_one_bad_line_in_the_middle_fails_the_whole_file(tmp_path):
    # Prepare
    path = write_lines(tmp_path / "pref.jsonl", [GOOD] * 5 + [row(prompt="x", chosen="P1")] + [GOOD] * 5)

    # Execute / Assert: nothing is returned, and the error names line 6.
    with pytest.raises(DataError, match=r"line 6: field 'rejected' is missing"):
        load_preferences(path)


def test_empty_missing_and_non_utf8_files_are_data_errors(tmp_path):
    # Prepare
    empty = write_lines(tmp_path / "empty.jsonl", ["", "  "])
    non_utf8 = tmp_path / "bytes.jsonl"
    non_utf8.write_bytes(GOOD.encode() + b'\n{"prompt": "\xff", "chosen": "a", "rejected": "b"}\n')

    # Execute / Assert
    with pytest.raises(DataError, match="holds no preference pairs"):
        load_preferences(empty)
    with pytest.raises(DataError, match="does not exist; check the site policy's dataset path"):
        load_preferences(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match=r"line 2: not valid UTF-8"):
        load_preferences(non_utf8)


# ---------------------------------------------------------------- the built-in preference set

SMALL_SFT = {"train_per_site": 30, "valid_per_site": 6, "test_per_task": 4}
SFT_FILES = ["test.jsonl", *(f"site-{k}/{split}.jsonl" for k in (1, 2, 3) for split in ("train", "valid"))]


def files_of(folder: Path, pattern: str) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob(pattern))}


def code_and_cue(task_name: str, text: str) -> tuple[str, str]:
    """Return the code whose cue phrase is in ``text``, and the phrase as written there."""
    found = []
    for code, cues in CUES_BY_TASK[task_name].items():
        for cue in cues:
            match = re.search(re.escape(cue.replace("{n}", "NUMBER")).replace("NUMBER", r"\d+"), text)
            if match:
                found.append((code, match.group(0)))
    assert len(found) == 1, (text, found)
    return found[0]


def first_code(answer: str) -> str:
    return answer.split()[0].rstrip(":,.")


def test_the_sft_files_are_those_written_before_preferences_existed(tmp_path):
    # Prepare: digests recorded at a fixed seed before the preference set was added.
    before = {
        "files": "96c75048ca57bb746da67021190a5fe94fb3ec17e5d0366af874d9d0572973f1",
        "triage": "04a77457d3d0c8539152a6c02642081eabb787d6893dfc005008b6a194fd932e",
        "routing": "c5f2dbdacd7e83dac0638f37d385c1218ad2464a2ad2daeeb48687668be24259",
        "clause": "bd2487142fd2b8b06156345a288b99da1daa8b24a85554d3c59290cc2ca7ef41",
        "examples": "8de7134d85c8ceb1d74ffb59002bc0390a06d2546bd0ad3335ba20a935b26376",
    }

    # Execute
    make_builtin(tmp_path, sites=3, seed=11, **SMALL_SFT)
    files = hashlib.sha256()
    for name in SFT_FILES:
        files.update(name.encode() + (tmp_path / name).read_bytes())
    after = {"files": files.hexdigest()}
    for task in TASKS:
        rng = random.Random(5)
        draws = [task.make(rng) for _ in range(200)]  # type: ignore[operator]
        after[task.name] = hashlib.sha256(repr(draws).encode()).hexdigest()
    rng = random.Random(5)
    examples = [make_example(task, rng) for task in TASKS for _ in range(50)]
    after["examples"] = hashlib.sha256(repr(examples).encode()).hexdigest()

    # Assert
    assert after == before


def test_sft_files_are_byte_identical_with_and_without_preferences(tmp_path):
    # Execute
    with_pairs = make_builtin(tmp_path / "a", sites=3, seed=4, **SMALL_SFT)
    without = make_builtin(tmp_path / "b", sites=3, seed=4, preferences=False, **SMALL_SFT)

    # Assert
    assert files_of(tmp_path / "a", "[!p]*.jsonl") == files_of(tmp_path / "b", "*.jsonl")
    assert set(files_of(tmp_path / "a", "pref-*.jsonl")) == {
        "pref-test.jsonl", *(f"site-{k}/pref-{split}.jsonl" for k in (1, 2, 3) for split in ("train", "valid"))
    }
    assert "preferences" not in without and "preferences" not in json.loads((tmp_path / "b/manifest.json").read_text())
    on_disk = json.loads((tmp_path / "a" / "manifest.json").read_text())["preferences"]
    assert on_disk == with_pairs["preferences"]
    assert on_disk["train"]["site-2"] == {"file": "site-2/pref-train.jsonl", "pairs": 200}
    assert on_disk["test"] == {"file": "pref-test.jsonl", "pairs": 24 * len(TASKS)}


def test_the_same_seed_writes_identical_pairs_and_another_seed_differs(tmp_path):
    # Execute
    for folder, seed in (("a", 7), ("b", 7), ("c", 8)):
        write_builtin_preferences(tmp_path / folder, sites=2, train_per_site=40, valid_per_site=8,
                                  test_per_task=5, seed=seed)

    # Assert
    first = files_of(tmp_path / "a", "*.jsonl")
    assert first == files_of(tmp_path / "b", "*.jsonl")
    assert first["site-1/pref-train.jsonl"] != files_of(tmp_path / "c", "*.jsonl")["site-1/pref-train.jsonl"]


def test_a_pair_has_the_prompt_and_code_of_the_sft_example_for_the_same_draws():
    for task in TASKS:
        for seed in range(20):
            # Execute
            pair = make_preference_pair(task, random.Random(seed))
            example = make_example(task, random.Random(seed))

            # Assert
            assert pair.prompt == example.prompt and pair.task == task.name
            assert first_code(pair.chosen) == example.response


def test_chosen_justifies_the_right_code_and_rejected_is_wrong_or_overconfident(tmp_path):
    # Prepare
    write_builtin_preferences(tmp_path, sites=3, seed=2)
    pairs = [pair for path in sorted(tmp_path.rglob("pref-*.jsonl")) for pair in load_preferences(path)]

    # Execute: the right code and its cue, read from each prompt's record.
    truths = [code_and_cue(pair.task or "", pair.prompt[0].content) for pair in pairs]

    # Assert: the chosen answer starts with the right code and quotes the record's evidence; the rejected
    # one is either a wrong code of the task argued the same careful way, or the right code with nothing
    # from the record.
    kinds: Counter[str] = Counter()
    for pair, (code, cue) in zip(pairs, truths, strict=True):
        assert first_code(pair.chosen) == code and cue in pair.chosen
        if first_code(pair.rejected) != code:
            assert first_code(pair.rejected) in CUES_BY_TASK[pair.task or ""] and cue in pair.rejected
            kinds["wrong code"] += 1
        else:
            assert cue not in pair.rejected
            kinds["over-confident"] += 1
        assert len(pair.chosen.split()) <= 30 and len(pair.rejected.split()) <= 30
    assert 0.4 < kinds["wrong code"] / len(pairs) < 0.6  # both kinds, about half each
    chosen_codes = {(pair.task, first_code(pair.chosen)) for pair in pairs}
    assert chosen_codes == {(name, code) for name, cues in CUES_BY_TASK.items() for code in cues}


def test_site_pairs_are_skewed_to_their_own_task_and_the_union_test_holds_all(tmp_path):
    # Execute
    write_builtin_preferences(tmp_path, sites=3, skew=0.9, test_per_task=10, seed=3)

    # Assert
    for index, task in enumerate(TASKS):
        counts = Counter(p.task for p in load_preferences(tmp_path / f"site-{index + 1}" / "pref-train.jsonl"))
        leading, count = counts.most_common(1)[0]
        assert leading == task.name and abs(count / 200 - 0.9) < 0.07
    assert Counter(p.task for p in load_preferences(tmp_path / "pref-test.jsonl")) == {t.name: 10 for t in TASKS}


def test_unknown_tasks_and_bad_arguments_are_data_errors(tmp_path):
    # Prepare
    poetry = Task("poetry", "publisher", TASKS[0].make)

    # Execute / Assert
    with pytest.raises(DataError, match="'poetry' is not a built-in task"):
        make_preference_pair(poetry, random.Random(0))
    with pytest.raises(DataError, match="at least 1"):
        write_builtin_preferences(tmp_path, sites=0)
    with pytest.raises(DataError, match="skew"):
        write_builtin_preferences(tmp_path, sites=2, skew=0.1)
