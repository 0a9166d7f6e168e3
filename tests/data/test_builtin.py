"""The built-in benchmark: deterministic, non-IID by task, written as ordinary JSONL."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from zenfed.data import TASKS, load_jsonl, make_builtin
from zenfed.errors import DataError


def files_of(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_same_seed_writes_identical_files_and_another_seed_differs(tmp_path):
    # Execute
    make_builtin(tmp_path / "a", sites=3, train_per_site=50, valid_per_site=10, test_per_task=5, seed=7)
    make_builtin(tmp_path / "b", sites=3, train_per_site=50, valid_per_site=10, test_per_task=5, seed=7)
    make_builtin(tmp_path / "c", sites=3, train_per_site=50, valid_per_site=10, test_per_task=5, seed=8)

    # Assert
    first = files_of(tmp_path / "a")
    assert first == files_of(tmp_path / "b")
    assert first["site-1/train.jsonl"] != files_of(tmp_path / "c")["site-1/train.jsonl"]
    assert set(first) == {
        "manifest.json",
        "test.jsonl",
        "pref-test.jsonl",
        *(f"site-{k}/{f}.jsonl" for k in (1, 2, 3) for f in ("train", "valid", "pref-train", "pref-valid")),
    }


def test_each_site_is_dominated_by_its_own_task(tmp_path):
    # Prepare
    skew = 0.8

    # Execute
    manifest = make_builtin(
        tmp_path, sites=3, train_per_site=400, valid_per_site=10, test_per_task=5, skew=skew, seed=1
    )

    # Assert: site k's most common task is task k, with about `skew` of its rows.
    dominant = []
    for k in range(3):
        examples = load_jsonl(tmp_path / f"site-{k + 1}" / "train.jsonl")
        counts = Counter(e.task for e in examples)
        task, count = counts.most_common(1)[0]
        dominant.append(task)
        assert task == TASKS[k].name
        assert abs(count / len(examples) - skew) < 0.07
        assert manifest["sites"][f"site-{k + 1}"]["mixture"][task] == pytest.approx(skew)
    assert len(set(dominant)) == 3  # non-IID: every site leads with a different skill


def test_the_test_split_holds_every_task_equally_and_is_held_out(tmp_path):
    # Execute
    make_builtin(tmp_path, sites=2, train_per_site=100, valid_per_site=10, test_per_task=12, seed=0)

    # Assert
    test = load_jsonl(tmp_path / "test.jsonl")
    assert Counter(e.task for e in test) == {t.name: 12 for t in TASKS}
    train_prompts = {e.prompt for k in (1, 2) for e in load_jsonl(tmp_path / f"site-{k}" / "train.jsonl")}
    overlap = sum(e.prompt in train_prompts for e in test)
    assert overlap <= len(test) // 10  # drawn independently; near-duplicates are rare


def test_rows_are_plain_alpaca_jsonl_with_short_codes(tmp_path):
    # Execute
    make_builtin(tmp_path, sites=1, train_per_site=20, valid_per_site=5, test_per_task=2, seed=0)

    # Assert: a user's own data would look the same; answers are short codes.
    rows = [json.loads(line) for line in (tmp_path / "site-1" / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 20
    for row in rows:
        assert set(row) == {"instruction", "input", "output", "task"}
        assert row["instruction"] and row["input"]
        assert len(row["output"].split()) == 1 and len(row["output"]) <= 6
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["test"]["examples"] == 2 * len(TASKS)


def test_codes_are_balanced_within_a_task(tmp_path):
    # Execute
    make_builtin(tmp_path, sites=1, train_per_site=10, valid_per_site=5, test_per_task=200, seed=0)

    # Assert: no single code dominates a task (a constant answer cannot score well).
    test = load_jsonl(tmp_path / "test.jsonl")
    for task in TASKS:
        codes = Counter(e.response for e in test if e.task == task.name)
        assert len(codes) == 4
        assert max(codes.values()) / sum(codes.values()) < 0.4


@pytest.mark.parametrize(("kwargs", "what"), [({"sites": 0}, "at least 1"), ({"sites": 2, "skew": 0.1}, "skew")])
def test_bad_arguments_are_data_errors(tmp_path, kwargs, what):
    # Execute / Assert
    with pytest.raises(DataError, match=what):
        make_builtin(tmp_path, **kwargs)
