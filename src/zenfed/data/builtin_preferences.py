"""Preference pairs (for DPO) on the built-in benchmark's prompts.

Each pair has the prompt of an SFT example of the same task. The chosen answer
is the right code with a short, careful justification that quotes the record's
evidence. The rejected answer is, with equal chance, either a wrong code of the
same task justified in the same careful style, or the right code stated
over-confidently with no justification from the record. Sites get the same
non-IID task mixture as their SFT data; pairs come from random streams of their
own, so writing them leaves the SFT files unchanged.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from zenfed.data.builtin import (
    CLAUSE_CUES,
    ROUTING_CUES,
    TASKS,
    TRIAGE_CUES,
    Task,
    check_builtin_arguments,
    make_record,
    site_mixture,
)
from zenfed.data.jsonl import Message, write_jsonl
from zenfed.data.preference import PreferencePair, preference_to_row
from zenfed.errors import DataError

BUILTIN_PREFERENCES = "builtin-preferences"  # the preference set's dataset name in site policies
PREFERENCE_TRAIN_FILE = "pref-train.jsonl"
PREFERENCE_VALID_FILE = "pref-valid.jsonl"
PREFERENCE_TEST_FILE = "pref-test.jsonl"
WRONG_CODE_SHARE = 0.5  # share of rejected answers that give a wrong code; the rest are over-confident


@dataclass(frozen=True)
class _Voice:
    """How answers of one task talk about their record."""

    record: str  # what the record is called: "note", "ticket", "clause"
    careful: tuple[str, ...]  # templates with {code}, {evidence} and {meaning}
    meanings: dict[str, str]  # code -> what the evidence means for that code


_VOICES = {
    "triage": _Voice(
        record="note",
        careful=("{code}: the note reports {evidence}, which {meaning}.",
                 "{code}, because the note mentions {evidence}; this {meaning}."),
        meanings={"P1": "needs immediate care", "P2": "is urgent but not life-threatening",
                  "P3": "can wait for a routine appointment", "P4": "is an administrative request"},
    ),
    "routing": _Voice(
        record="ticket",
        careful=("{code}: the customer {evidence}, which is {meaning}.",
                 "{code}, because the ticket says the customer {evidence}; that is {meaning}."),
        meanings={"Q-BIL": "a billing matter", "Q-FRD": "a possible fraud case",
                  "Q-ACC": "an account access problem", "Q-LN": "a loan question"},
    ),
    "clause": _Voice(
        record="clause",
        careful=("{code}: the clause says {evidence}, which is {meaning}.",
                 "{code}, because under this clause {evidence}; that is {meaning}."),
        meanings={"C-TRM": "a termination right", "C-CNF": "a confidentiality duty",
                  "C-PAY": "a payment term", "C-LIA": "a liability term"},
    ),
}
CUES_BY_TASK = {"triage": TRIAGE_CUES, "routing": ROUTING_CUES, "clause": CLAUSE_CUES}  # the codes _VOICES covers
OVERCONFIDENT_TEMPLATES = (
    "{code}. Certain - no need to read the {record}.",
    "{code}, obviously. The {record} does not matter here.",
    "{code} - I am sure without checking the {record}.",
)


def _voice_of(task: Task) -> _Voice:
    voice = _VOICES.get(task.name)
    if voice is None:
        raise DataError(f"task {task.name!r} has no preference templates; "
                        "add them to _VOICES in zenfed.data.builtin_preferences")
    return voice


def make_preference_pair(task: Task, rng: random.Random) -> PreferencePair:
    """Draw one preference pair of ``task``.

    The prompt, and the code the chosen answer starts with, are those of
    ``make_example(task, rng)`` for the same random state.

    Args:
        task: One of ``TASKS``.
        rng: The random stream to draw from.

    Returns:
        The pair, with ``task`` set to the task's name.

    Raises:
        DataError: If ``task`` is not a built-in task.
    """
    instruction, text, code, evidence = make_record(task, rng)
    voice = _voice_of(task)
    chosen = rng.choice(voice.careful).format(code=code, evidence=evidence, meaning=voice.meanings[code])
    if rng.random() < WRONG_CODE_SHARE:
        wrong = rng.choice([other for other in sorted(voice.meanings) if other != code])
        rejected = rng.choice(voice.careful).format(code=wrong, evidence=evidence, meaning=voice.meanings[wrong])
    else:
        rejected = rng.choice(OVERCONFIDENT_TEMPLATES).format(code=code, record=voice.record)
    prompt = (Message("user", f"{instruction}\n\n{text}"),)
    return PreferencePair(prompt=prompt, chosen=chosen, rejected=rejected, task=task.name)


def _draw_pairs(rng: random.Random, mixture: dict[str, float], count: int) -> list[PreferencePair]:
    by_name = {t.name: t for t in TASKS}
    names = sorted(mixture)
    weights = [mixture[n] for n in names]
    return [make_preference_pair(by_name[rng.choices(names, weights)[0]], rng) for _ in range(count)]


def _write(path: Path, pairs: list[PreferencePair]) -> None:
    write_jsonl(path, (preference_to_row(p) for p in pairs))


def write_builtin_preferences(
    out_dir: str | Path,
    *,
    sites: int,
    train_per_site: int = 200,
    valid_per_site: int = 32,
    test_per_task: int = 24,
    skew: float = 0.9,
    seed: int = 0,
) -> dict[str, object]:
    """Write ``site-K/pref-{train,valid}.jsonl`` and a union ``pref-test.jsonl``.

    Args:
        out_dir: Folder to write into (the built-in benchmark's folder).
        sites: Number of sites, at least 1.
        train_per_site: Training pairs per site.
        valid_per_site: Validation pairs per site (same mixture as its training pairs).
        test_per_task: Held-out pairs per task in the union test set.
        skew: Share of a site's pairs drawn from its own task, as in ``site_mixture``.
        seed: Everything is a deterministic function of the seed; the random
            streams differ from those of the SFT files.

    Returns:
        The manifest part: ``{"train": {site: {"file", "pairs"}}, "valid": {...},
        "test": {"file", "pairs"}}``, with files relative to ``out_dir``.

    Raises:
        DataError: If ``sites`` or ``skew`` is out of range.
    """
    check_builtin_arguments(sites=sites, skew=skew)
    out = Path(out_dir)
    train_info: dict[str, object] = {}
    valid_info: dict[str, object] = {}
    for index in range(sites):
        name = f"site-{index + 1}"
        mixture = site_mixture(index, skew=skew)
        site_rng = random.Random(f"{seed}:{name}:preferences")
        train = _draw_pairs(site_rng, mixture, train_per_site)
        valid = _draw_pairs(site_rng, mixture, valid_per_site)
        _write(out / name / PREFERENCE_TRAIN_FILE, train)
        _write(out / name / PREFERENCE_VALID_FILE, valid)
        train_info[name] = {"file": f"{name}/{PREFERENCE_TRAIN_FILE}", "pairs": len(train)}
        valid_info[name] = {"file": f"{name}/{PREFERENCE_VALID_FILE}", "pairs": len(valid)}
    test_rng = random.Random(f"{seed}:test:preferences")
    test = [make_preference_pair(task, test_rng) for task in TASKS for _ in range(test_per_task)]
    _write(out / PREFERENCE_TEST_FILE, test)
    return {"train": train_info, "valid": valid_info, "test": {"file": PREFERENCE_TEST_FILE, "pairs": len(test)}}
