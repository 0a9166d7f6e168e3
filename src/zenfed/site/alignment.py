"""A site's preference data and DPO reference for a job with ``objective: dpo``.

The job's DPO rounds train on the site's preference pairs (``dpo.dataset`` in its
policy) against a frozen reference: the adapter the DPO stage started from, that
is, the global adapter of round ``dpo.sft_rounds + 1`` (the SFT result of a
two-stage job, the initial adapter of a DPO-only one). A site keeps that adapter
in its state folder (0600) when it first trains the stage, so a restarted site
resumes with the same reference. Every round, every site also scores the adapter
it received on its held-out pairs (``engines/dpo.py``: preference accuracy and
reward margin against the base model).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from zenfed import protocol as P
from zenfed.atomic import atomic_write_bytes
from zenfed.data.preference import PreferencePair, load_preferences
from zenfed.engines.base import Engine
from zenfed.errors import PolicyError
from zenfed.site.state import REFERENCE_FILE
from zenfed.spec import JobSpec, SitePolicy
from zenfed.types import AdapterState, check_compatible


@dataclass
class SitePreferences:
    """One site's preference pairs for a job, and the stage's reference adapter.

    Attributes:
        train: The training pairs.
        valid: A fixed, seeded subset of the held-out pairs, scored every round.
        beta: The job's DPO beta.
        start_round: The first DPO round; its starting adapter is the reference.
        folder: The site's state folder for this job spec.
    """

    train: list[PreferencePair]
    valid: list[PreferencePair]
    beta: float
    start_round: int
    folder: Path
    _reference: AdapterState | None = None

    @classmethod
    def load(cls, spec: JobSpec, policy: SitePolicy, *, folder: Path) -> SitePreferences | None:
        """Read the job's preference dataset from the site policy; None for a supervised job.

        Raises:
            PolicyError: If the site's policy does not map ``dpo.dataset``.
            DataError: If a file is missing or a row is malformed (naming file, line and field).
        """
        start = spec.dpo_start_round
        if start is None:
            return None
        location = policy.dataset(spec.dpo.dataset)
        train = load_preferences(location.path / location.train)
        valid = load_preferences(location.path / location.valid)
        random.Random(spec.training.seed).shuffle(valid)
        return cls(train=train, valid=valid[: spec.evaluation.max_examples], beta=spec.dpo.beta,
                   start_round=start, folder=folder)

    @property
    def path(self) -> Path:
        """Where the stage's reference adapter is kept."""
        return self.folder / REFERENCE_FILE

    def forget(self) -> None:
        """Drop a kept reference (a job that starts afresh)."""
        self._reference = None
        self.path.unlink(missing_ok=True)

    def reference(self, round_index: int, start: AdapterState) -> AdapterState:
        """Return the DPO reference for ``round_index``, keeping ``start`` if this round opens the stage.

        Raises:
            PolicyError: If the site did not train the stage's first round, so it never held the
                adapter the stage started from, or the kept file cannot be read.
        """
        if round_index == self.start_round:
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            atomic_write_bytes(self.path, bytes(save_tensors({k: v.contiguous() for k, v in start.items()})))
            self._reference = dict(start)
        if self._reference is None:
            if not self.path.is_file():
                raise PolicyError(
                    f"round {round_index} is a DPO round, but this site did not train round {self.start_round}, "
                    "where the DPO stage started, so it has no reference adapter; it cannot take part in this "
                    "job's DPO rounds (restart the job so that every site trains the stage's first round)")
            try:
                kept = load_tensors(self.path.read_bytes())
            except (SafetensorError, ValueError, RuntimeError) as err:
                raise PolicyError(f"{self.path} cannot be read ({err}); restart the job from round 1") from None
            check_compatible(start, kept, what=f"the DPO reference kept in {self.path}")
            self._reference = kept
        return self._reference

    def evaluate(self, engine: Engine, adapter: AdapterState, *, report: bool) -> tuple[dict[str, Any], dict[str, Any]]:
        """Score ``adapter`` on the held-out pairs; return the header fields and the audit metrics.

        A site whose policy withholds metrics (``report``) still says how many pairs it scored.
        """
        scored = engine.evaluate_preferences(adapter=adapter, pairs=self.valid, beta=self.beta)
        header = {P.H_EVAL_PREFERENCE_ACCURACY: scored.accuracy if report else None,
                  P.H_EVAL_REWARD_MARGIN: scored.reward_margin if report else None,
                  P.H_EVAL_PAIRS: scored.num_pairs}
        metrics = {"preference_accuracy": scored.accuracy, "reward_margin": scored.reward_margin,
                   "pairs": scored.num_pairs}
        return header, metrics
