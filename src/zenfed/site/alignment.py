"""A site's preference data and DPO reference for a job with ``objective: dpo``.

The job's DPO rounds train on the site's preference pairs (``dpo.dataset`` in its
policy) against a frozen reference: the adapter the DPO stage started from, that
is, the global adapter sites receive in round ``dpo.sft_rounds + 1`` (the result of
the SFT rounds), or the initial adapter for DPO from round 1. A site keeps the
former in its state folder (0600, with the SHA-256 of the global's payload) as the
stage's first task arrives; the server names that SHA-256 in every DPO round, so a
restarted site resumes with the same reference and another run's is refused.
Every round, every site also scores the adapter it received on its held-out pairs
(``engines/dpo.py``: preference accuracy and reward margin against the base model).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_tensors

from zenfed import protocol as P
from zenfed.atomic import atomic_write_bytes
from zenfed.data.preference import PreferencePair, load_preferences
from zenfed.engines.base import Engine
from zenfed.errors import PolicyError
from zenfed.site.state import REFERENCE_FILE
from zenfed.spec import JobSpec, SitePolicy
from zenfed.types import AdapterState, check_compatible

_PAYLOAD_KEY = "global_payload_sha256"  # in the kept file's metadata: which global the reference is


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
    _reference_sha: str | None = None

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
        self._reference = self._reference_sha = None
        self.path.unlink(missing_ok=True)

    def keep_reference(self, round_index: int, adapter: AdapterState, *, header: dict[str, Any]) -> None:
        """Keep ``adapter``, the global this site received, if ``round_index`` opens a DPO stage that follows SFT.

        Called as the task arrives, before evaluation and training, so that a site cancelled later in the
        round (a straggler) still holds the reference. The file records the SHA-256 of the global's payload,
        which the server names in every DPO round.

        Raises:
            PolicyError: If the server names another payload than the one this site received.
        """
        if round_index != self.start_round or self.start_round == 1:
            return
        received = header.get(P.H_PAYLOAD_SHA256)
        if header.get(P.H_DPO_REFERENCE) != received:
            raise PolicyError(f"round {round_index} opens the DPO stage, but the server names "
                              f"{header.get(P.H_DPO_REFERENCE)} as its reference, not the global it sent "
                              f"({received}); refusing it")
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        data = save_tensors({k: v.contiguous() for k, v in adapter.items()}, metadata={_PAYLOAD_KEY: str(received)})
        atomic_write_bytes(self.path, bytes(data))
        self._reference, self._reference_sha = dict(adapter), str(received)

    def reference(self, round_index: int, *, header: dict[str, Any], initial: AdapterState) -> AdapterState:
        """Return the DPO reference for DPO round ``round_index``.

        DPO from round 1 trains against ``initial`` (every site builds the same one). After SFT rounds it is
        the adapter kept in the stage's first round, which must be the one the server names.

        Raises:
            PolicyError: If this site holds no reference (it did not take part in the stage's first round),
                holds another run's, or the kept file cannot be read.
        """
        if self.start_round == 1:
            return initial
        expected = header.get(P.H_DPO_REFERENCE)
        if self._reference is None:
            if not self.path.is_file():
                raise PolicyError(
                    f"round {round_index} is a DPO round, but this site did not receive round {self.start_round}'s "
                    "global, where the DPO stage started, so it has no reference adapter; it cannot take part in "
                    "this job's DPO rounds (restart the job so that every site takes part in that round)")
            try:
                with safe_open(str(self.path), framework="pt") as handle:
                    sha = (handle.metadata() or {}).get(_PAYLOAD_KEY)
                    kept = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (not a dict)
            except (SafetensorError, ValueError, RuntimeError, OSError) as err:
                raise PolicyError(f"{self.path} cannot be read ({err}); restart the job from round 1") from None
            check_compatible(initial, kept, what=f"the DPO reference kept in {self.path}")
            self._reference, self._reference_sha = kept, sha
        if self._reference_sha != expected:
            raise PolicyError(f"the DPO reference this site kept (from the global {self._reference_sha}) is not the "
                              f"one the server names for this job ({expected}): it is another run's; restart the "
                              "job so that every site takes part in the stage's first round")
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
