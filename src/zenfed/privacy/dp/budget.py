"""Privacy budget decisions: may a job, or its next round, spend this much epsilon.

Pure logic over what a dataset's jobs have spent; :class:`PrivacyLedger` feeds it
the signed spend records. A job's spend is its largest cumulative epsilon; a
dataset's lifetime spend is the sum over its jobs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from zenfed.privacy.dp.errors import PrivacyBudgetError, PrivacyError

TOLERANCE = 1e-9


@dataclass(frozen=True)
class BudgetDecision:
    """Whether a site's budget allows a job or a round, with the reason in words."""

    allowed: bool
    code: str  # "ok", "max_epsilon_per_job" or "lifetime_budget"
    reason: str
    dataset: str
    job: str | None
    requested_epsilon: float
    spent_epsilon: float
    max_epsilon_per_job: float | None
    lifetime_budget: float | None

    def to_dict(self) -> dict[str, Any]:
        """Return the decision as JSON data (for the audit log and the job result)."""
        return asdict(self)

    def raise_if_refused(self) -> None:
        """Raise :class:`PrivacyBudgetError` with the reason if the budget refuses."""
        if not self.allowed:
            raise PrivacyBudgetError(self.reason, decision=self.to_dict())


def _check_limit(name: str, value: float | None) -> float | None:
    if value is not None and (math.isnan(value) or value < 0):
        raise PrivacyError(f"{name} must be a number >= 0 or None (no limit), got {value!r}")
    return value


def decide_budget(
    *,
    job_totals: dict[str, float],
    dataset: str,
    job: str | None,
    job_epsilon: float,
    max_epsilon_per_job: float | None,
    lifetime_budget: float | None,
    what: str,
) -> BudgetDecision:
    """Decide whether a job may reach ``job_epsilon`` on ``dataset``.

    Args:
        job_totals: epsilon spent so far on ``dataset``, per job.
        dataset: the dataset name.
        job: the job asking (its own earlier spend counts once), or None.
        job_epsilon: the job's cumulative epsilon if it goes ahead.
        max_epsilon_per_job: the site's limit per job, or None for no limit.
        lifetime_budget: the site's lifetime limit for the dataset, or None.
        what: how the reason names the request, e.g. "job 'x'".

    Returns:
        The decision, with a reason in words either way.

    """
    max_epsilon_per_job = _check_limit("max_epsilon_per_job", max_epsilon_per_job)
    lifetime_budget = _check_limit("lifetime_budget", lifetime_budget)
    if not job_epsilon >= 0:
        raise PrivacyError(f"the requested epsilon must be >= 0, got {job_epsilon!r}")
    totals = dict(job_totals)
    already = totals.pop(job, 0.0) if job is not None else 0.0
    others = sum(totals.values())
    # A restarted job keeps what it already spent: count the larger of the two.
    job_total = max(job_epsilon, already)
    spent = others + already

    def decision(allowed: bool, code: str, reason: str) -> BudgetDecision:
        return BudgetDecision(
            allowed=allowed,
            code=code,
            reason=reason,
            dataset=dataset,
            job=job,
            requested_epsilon=job_epsilon,
            spent_epsilon=spent,
            max_epsilon_per_job=max_epsilon_per_job,
            lifetime_budget=lifetime_budget,
        )

    need = f"{what} needs epsilon={job_total:.4f} on dataset {dataset!r}"
    if max_epsilon_per_job is not None and job_total > max_epsilon_per_job + TOLERANCE:
        reason = (
            f"{need}, above this site's maximum per job of {max_epsilon_per_job:g}; ask for "
            "more noise (a larger noise_multiplier or a smaller target_epsilon) or fewer "
            "rounds or steps"
        )
        return decision(False, "max_epsilon_per_job", reason)
    if lifetime_budget is not None and others + job_total > lifetime_budget + TOLERANCE:
        remaining = max(0.0, lifetime_budget - others)
        reason = (
            f"{need}, but only {remaining:.4f} of its lifetime budget {lifetime_budget:g} "
            f"remains (other jobs spent {others:.4f}); the site's IT must raise the budget "
            "or the job must spend less"
        )
        return decision(False, "lifetime_budget", reason)
    reason = (
        f"{need}: within the maximum per job ({max_epsilon_per_job}) and the lifetime "
        f"budget ({lifetime_budget}; other jobs spent {others:.4f})"
    )
    return decision(True, "ok", reason)
