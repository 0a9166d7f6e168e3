"""The built-in non-IID benchmark: three regulated-domain classification skills.

Each task maps a free-text record to a short code by a rule the model must
learn from many examples (cue phrases mixed with distracting filler): triage
notes to priority codes (a hospital), support tickets to queues (a bank) and
contract clauses to clause types (a law firm). Codes are arbitrary, so the
base model cannot answer zero-shot. Each site gets mostly one task, so a site
training alone cannot learn the others; the union test set holds all three.

Next to the SFT files, ``make_builtin`` writes preference pairs for DPO on the
same prompts and mixtures (``site-K/pref-{train,valid}.jsonl`` and a union
``pref-test.jsonl``; see ``zenfed.data.builtin_preferences``), from random
streams of their own, so the SFT files are the same with or without them.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from zenfed.data.jsonl import Example, Message, example_to_row, write_jsonl
from zenfed.errors import DataError

TRIAGE_CUES = {
    "P1": ["crushing chest pain", "cannot breathe properly", "bleeding that will not stop",
           "sudden weakness on one side", "a seizure lasting five minutes", "collapsed at home",
           "severe allergic swelling of the throat", "confusion after a head injury"],
    "P2": ["a fever of 39 degrees for two days", "a deep cut that needs stitches",
           "vomiting since this morning", "a swollen ankle after a fall", "ear pain with fever",
           "a burn the size of a palm", "painful urination and fever", "a suspected broken wrist"],
    "P3": ["an itchy rash", "mild back pain for a week", "a sore throat without fever",
           "trouble sleeping", "a dry cough for three days", "dry eyes", "occasional headaches",
           "a mild sprain from last month"],
    "P4": ["a repeat prescription", "a sick note for work", "the annual check-up",
           "a travel vaccination", "a routine blood test", "a referral letter",
           "a copy of their records", "a follow-up on normal results"],
}
ROUTING_CUES = {
    "Q-BIL": ["was charged twice for", "wants a refund of the fee on", "disputes the monthly fee for",
              "asks for an invoice copy for", "sees a wrong amount on the statement for",
              "was billed after closing"],
    "Q-FRD": ["reports a payment they did not make with", "says a stranger used",
              "got a suspicious call about", "saw an unknown transfer from",
              "lost their wallet and worries about", "received a phishing text about"],
    "Q-ACC": ["cannot log in to", "is locked out of", "did not get the reset code for",
              "forgot the PIN for", "cannot pass the identity check for",
              "sees an error page when opening"],
    "Q-LN": ["asks about the interest rate on a loan for", "wants to extend the loan tied to",
             "wants to repay the loan early through", "asks if they qualify for a loan via",
             "wants to change the repayment date linked to", "asks for a loan offer through"],
}
CLAUSE_CUES = {
    "C-TRM": ["may end this agreement with {n} days' written notice",
              "may terminate this agreement after a material breach",
              "shall have the right to cancel the contract on insolvency of the other party",
              "may end the services if the fees remain unpaid for {n} days"],
    "C-CNF": ["shall not disclose the other party's information to any third party",
              "shall keep all trade secrets strictly private for {n} years",
              "must return or destroy all confidential material on request",
              "shall limit access to the data to staff who need to know it"],
    "C-PAY": ["shall pay each invoice within {n} days of receipt",
              "shall pay the fees monthly in advance",
              "owes interest at {n} percent on late payments",
              "shall reimburse reasonable travel costs against receipts"],
    "C-LIA": ["shall not be liable for any indirect or consequential loss",
              "has a total liability capped at {n} times the annual fees",
              "shall indemnify the other party against third-party claims",
              "accepts no liability for delays caused by force majeure"],
}

_NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivo", "Jun", "Kofi",
          "Lena", "Mateo", "Nia", "Omar", "Priya", "Ravi", "Sara", "Tomas", "Uma", "Yusuf", "Zoe"]
_CLINICS = ["north", "riverside", "central", "east", "harbour", "hillside"]
_HISTORY = ["asthma", "diabetes", "no known conditions", "high blood pressure", "a knee operation",
            "seasonal allergies"]
_PRODUCTS = ["the mobile app", "their current account", "the savings account", "a credit card",
             "the online banking portal", "a joint account", "the business account"]
_CHANNELS = ["by phone", "by e-mail", "in the branch", "through the chat", "by letter"]
_PARTIES = ["The Supplier", "The Customer", "Each party", "The Licensee", "The Contractor",
            "The Client"]
_PREAMBLE = ["Under clause {c},", "Subject to the schedule,", "Notwithstanding clause {c},",
             "For the avoidance of doubt,", "Save as agreed in writing,"]


def _triage_record(rng: random.Random) -> tuple[str, str, str, str]:
    code = rng.choice(sorted(TRIAGE_CUES))
    cue = rng.choice(TRIAGE_CUES[code])
    note = (f"{rng.choice(_NAMES)}, {rng.randint(18, 90)}, seen at the {rng.choice(_CLINICS)} clinic, "
            f"reports {cue}. History of {rng.choice(_HISTORY)}.")
    return "Give the triage code (P1, P2, P3 or P4) for this note.", note, code, cue


def _routing_record(rng: random.Random) -> tuple[str, str, str, str]:
    code = rng.choice(sorted(ROUTING_CUES))
    cue = rng.choice(ROUTING_CUES[code])
    name, ref, product = rng.choice(_NAMES), rng.randint(10000, 99999), rng.choice(_PRODUCTS)
    ticket = f"Customer {name} (ref {ref}) {cue} {product}, contacted us {rng.choice(_CHANNELS)}."
    return "Route this support ticket to a queue code.", ticket, code, f"{cue} {product}"


def _clause_record(rng: random.Random) -> tuple[str, str, str, str]:
    code = rng.choice(sorted(CLAUSE_CUES))
    cue = rng.choice(CLAUSE_CUES[code]).format(n=rng.choice([2, 3, 5, 10, 14, 30, 60, 90]))
    preamble, party = rng.choice(_PREAMBLE).format(c=rng.randint(2, 19)), rng.choice(_PARTIES).lower()
    return "Classify this contract clause with its clause code.", f"{preamble} {party} {cue}.", code, f"{party} {cue}"


def _triage(rng: random.Random) -> tuple[str, str, str]:
    return _triage_record(rng)[:3]


def _routing(rng: random.Random) -> tuple[str, str, str]:
    return _routing_record(rng)[:3]


def _clause(rng: random.Random) -> tuple[str, str, str]:
    return _clause_record(rng)[:3]


@dataclass(frozen=True)
class Task:
    """One skill of the benchmark."""

    name: str
    domain: str
    make: object  # Callable[[random.Random], tuple[str, str, str]]


TASKS: tuple[Task, ...] = (
    Task("triage", "hospital", _triage),
    Task("routing", "bank", _routing),
    Task("clause", "law firm", _clause),
)


def make_example(task: Task, rng: random.Random) -> Example:
    """Draw one example of ``task``."""
    instruction, text, code = task.make(rng)  # type: ignore[operator]
    return Example(prompt=(Message("user", f"{instruction}\n\n{text}"),), response=code, task=task.name)


_RECORD_MAKERS = {"triage": _triage_record, "routing": _routing_record, "clause": _clause_record}


def make_record(task: Task, rng: random.Random) -> tuple[str, str, str, str]:
    """Draw one record of ``task`` with the evidence that decides its code.

    Makes the same draws from ``rng`` as ``task.make``, so the instruction, text
    and code equal those of ``make_example`` for the same random state.

    Returns:
        ``(instruction, text, code, evidence)``, where ``evidence`` is the phrase
        of ``text`` that decides the code (its cue, with the product for a
        ticket and the party for a clause).

    Raises:
        DataError: If ``task`` is not one of ``TASKS``.
    """
    maker = _RECORD_MAKERS.get(task.name)
    if maker is None:
        raise DataError(f"task {task.name!r} is not a built-in task; use one of {sorted(_RECORD_MAKERS)}")
    return maker(rng)


def site_mixture(site_index: int, *, skew: float) -> dict[str, float]:
    """Return the task mixture of site ``site_index`` (0-based): mostly one task."""
    own = TASKS[site_index % len(TASKS)].name
    rest = (1.0 - skew) / (len(TASKS) - 1)
    return {t.name: (skew if t.name == own else rest) for t in TASKS}


def check_builtin_arguments(*, sites: int, skew: float) -> None:
    """Check the site count and skew of the built-in benchmark.

    Raises:
        DataError: If ``sites`` is below 1 or ``skew`` outside [1 / number of tasks, 1].
    """
    if sites < 1:
        raise DataError(f"--sites must be at least 1, got {sites}")
    if not 1 / len(TASKS) <= skew <= 1.0:
        raise DataError(f"skew must be between {1 / len(TASKS):.2f} and 1, got {skew}")


def _draw(rng: random.Random, mixture: dict[str, float], count: int) -> list[Example]:
    by_name = {t.name: t for t in TASKS}
    names = sorted(mixture)
    weights = [mixture[n] for n in names]
    return [make_example(by_name[rng.choices(names, weights)[0]], rng) for _ in range(count)]


def make_builtin(
    out_dir: str | Path,
    *,
    sites: int,
    train_per_site: int = 400,
    valid_per_site: int = 48,
    test_per_task: int = 40,
    skew: float = 0.9,
    seed: int = 0,
    preferences: bool = True,
) -> dict[str, object]:
    """Write the built-in benchmark: ``site-K/{train,valid}.jsonl`` and a union ``test.jsonl``.

    With ``preferences``, also the DPO pairs ``site-K/pref-{train,valid}.jsonl``
    and ``pref-test.jsonl`` (at ``write_builtin_preferences``' default sizes).

    Args:
        out_dir: Folder to write into.
        sites: Number of sites, at least 1.
        train_per_site: Training examples per site.
        valid_per_site: Validation examples per site (same mixture as its training data).
        test_per_task: Held-out test examples per task in the union test set.
        skew: Share of a site's data drawn from its own task (non-IID by task).
        seed: Everything is a deterministic function of the seed.
        preferences: Also write the preference pairs; the SFT files are the same either way.

    Returns:
        The manifest, also written as ``manifest.json``; the preference files are
        under its ``"preferences"`` key.

    Raises:
        DataError: If ``sites`` or ``skew`` is out of range.
    """
    check_builtin_arguments(sites=sites, skew=skew)
    out = Path(out_dir)
    rng = random.Random(seed)
    test: list[Example] = []
    for task in TASKS:
        test.extend(make_example(task, rng) for _ in range(test_per_task))
    manifest: dict[str, object] = {
        "seed": seed, "skew": skew, "tasks": {t.name: t.domain for t in TASKS},
        "test": {"file": "test.jsonl", "examples": len(test)}, "sites": {},
    }
    site_info: dict[str, object] = {}
    for index in range(sites):
        name = f"site-{index + 1}"
        mixture = site_mixture(index, skew=skew)
        site_rng = random.Random(f"{seed}:{name}")
        train = _draw(site_rng, mixture, train_per_site)
        valid = _draw(site_rng, mixture, valid_per_site)
        write_jsonl(out / name / "train.jsonl", (example_to_row(e) for e in train))
        write_jsonl(out / name / "valid.jsonl", (example_to_row(e) for e in valid))
        site_info[name] = {"mixture": mixture, "train": len(train), "valid": len(valid)}
    manifest["sites"] = site_info
    write_jsonl(out / "test.jsonl", (example_to_row(e) for e in test))
    if preferences:
        # Imported here: builtin_preferences builds on this module's tasks.
        from zenfed.data.builtin_preferences import write_builtin_preferences

        manifest["preferences"] = write_builtin_preferences(out, sites=sites, skew=skew, seed=seed)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def corpus_for_tokenizer(*, seed: int = 0, count: int = 3000) -> list[str]:
    """Return benchmark-like text, for training a tiny test tokenizer."""
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        ex = make_example(rng.choice(TASKS), rng)
        texts.append(ex.prompt[0].content + " " + ex.response)
    return texts
