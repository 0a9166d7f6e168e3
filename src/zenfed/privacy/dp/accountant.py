"""Privacy accounting for the Poisson-subsampled Gaussian mechanism, through ``dp-accounting``.

One accountant composes every noisy step a site takes, over all rounds of a
job: local DP-SGD steps for record-level DP, or one step per round for
client-level DP. Its history is plain JSON data, so it can be stored in the
site's ledger, restored after a restart, and written into the audit report.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import dp_accounting
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

from zenfed.privacy.dp.errors import PrivacyError

ACCOUNTANT_FORMAT = "zenfed-dp-accountant/1"
# PLD grid step: pessimistic estimates stay valid upper bounds; 1e-3 keeps solving fast.
_PLD_DISCRETIZATION = 1e-3
# Accounting methods by name (both are upper bounds on the true epsilon; PLD is tighter).
_METHODS: dict[str, Callable[[], dp_accounting.PrivacyAccountant]] = {
    "pld": lambda: PLDAccountant(value_discretization_interval=_PLD_DISCRETIZATION),
    "rdp": lambda: RdpAccountant(),
}
DEFAULT_CLIENT_DELTA = 1e-5


def _positive(name: str, value: float, *, allow_inf: bool = False) -> float:
    value = float(value)
    if not (value > 0) or (math.isinf(value) and not allow_inf) or math.isnan(value):
        raise PrivacyError(f"{name} must be a positive finite number, got {value!r}")
    return value


def _check_rate(sample_rate: float) -> float:
    sample_rate = float(sample_rate)
    if not 0 < sample_rate <= 1:
        raise PrivacyError(
            f"sample_rate must be in (0, 1], got {sample_rate!r}; it is batch_size / num_records "
            "for record-level DP, or sampled_sites / all_sites for client-level DP"
        )
    return sample_rate


def _check_delta(delta: float) -> float:
    delta = float(delta)
    if not 0 < delta < 1:
        raise PrivacyError(f"delta must be in (0, 1), got {delta!r}; a usual choice is 1/(10 n)")
    return delta


def default_delta(num_records: int) -> float:
    """Return the default delta, 1 / (10 n), for a dataset of ``num_records`` records."""
    if num_records < 1:
        raise PrivacyError(f"num_records must be at least 1, got {num_records}")
    return 1.0 / (10.0 * num_records)


def sample_rate_for(*, batch_size: int, num_records: int) -> float:
    """Return the Poisson sampling rate ``min(1, batch_size / num_records)``."""
    if batch_size < 1 or num_records < 1:
        raise PrivacyError(
            f"batch_size and num_records must be at least 1, got {batch_size} and {num_records}"
        )
    return min(1.0, batch_size / num_records)


def _event(noise_multiplier: float, sample_rate: float) -> dp_accounting.DpEvent:
    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
    if sample_rate >= 1.0:
        return gaussian
    return dp_accounting.PoissonSampledDpEvent(sample_rate, gaussian)


class PrivacyAccountant:
    """Accountant of Poisson-subsampled Gaussian steps (an Opacus-like interface).

    Args:
        method: "pld" (privacy loss distributions, tighter, the default) or "rdp"
            (Renyi DP). Both give upper bounds on epsilon through ``dp-accounting``.

    Example:
        >>> acct = PrivacyAccountant()
        >>> acct.step(noise_multiplier=1.1, sample_rate=0.01, num_steps=100)
        >>> eps = acct.get_epsilon(1e-5)

    """

    def __init__(self, *, method: str = "pld") -> None:
        if method not in _METHODS:
            raise PrivacyError(
                f"unknown accounting method {method!r}; use one of {sorted(_METHODS)}"
            )
        self.method = method
        self._history: list[dict[str, Any]] = []

    @property
    def history(self) -> list[dict[str, Any]]:
        """A copy of the history: ``[{"noise_multiplier", "sample_rate", "num_steps"}, ...]``."""
        return [dict(entry) for entry in self._history]

    @property
    def total_steps(self) -> int:
        """Return the number of noisy steps composed so far."""
        return sum(int(entry["num_steps"]) for entry in self._history)

    def step(self, *, noise_multiplier: float, sample_rate: float, num_steps: int = 1) -> None:
        """Compose ``num_steps`` steps of the Gaussian mechanism with Poisson sampling.

        Args:
            noise_multiplier: sigma, the noise std divided by the clip norm (> 0).
            sample_rate: probability that a record (or a site) is in a step, in (0, 1].
            num_steps: how many identical steps to compose (>= 0).

        Raises:
            PrivacyError: If a parameter is out of range.

        """
        noise_multiplier = _positive("noise_multiplier", noise_multiplier)
        sample_rate = _check_rate(sample_rate)
        if int(num_steps) != num_steps or num_steps < 0:
            raise PrivacyError(f"num_steps must be a non-negative integer, got {num_steps!r}")
        if num_steps == 0:
            return
        last = self._history[-1] if self._history else None
        if (
            last is not None
            and last["noise_multiplier"] == noise_multiplier
            and last["sample_rate"] == sample_rate
        ):
            last["num_steps"] += int(num_steps)
        else:
            self._history.append(
                {
                    "noise_multiplier": noise_multiplier,
                    "sample_rate": sample_rate,
                    "num_steps": int(num_steps),
                }
            )

    def dp_event(self) -> dp_accounting.DpEvent:
        """Return the composed ``dp_accounting`` event of the whole history."""
        events = [
            dp_accounting.SelfComposedDpEvent(
                _event(e["noise_multiplier"], e["sample_rate"]), int(e["num_steps"])
            )
            for e in self._history
        ]
        return dp_accounting.ComposedDpEvent(events)

    def get_epsilon(self, delta: float) -> float:
        """Return epsilon at ``delta`` of everything composed so far (0.0 for no steps)."""
        delta = _check_delta(delta)
        if not self._history:
            return 0.0
        accountant = _METHODS[self.method]()
        accountant.compose(self.dp_event())
        return float(accountant.get_epsilon(delta))

    def projected_epsilon(
        self, *, delta: float, noise_multiplier: float, sample_rate: float, num_steps: int
    ) -> float:
        """Return epsilon after ``num_steps`` more steps, without changing this accountant."""
        trial = PrivacyAccountant(method=self.method)
        trial.load_state_dict(self.state_dict())
        trial.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate, num_steps=num_steps)
        return trial.get_epsilon(delta)

    def state_dict(self) -> dict[str, Any]:
        """Return the state as plain JSON data (format tag, method and history)."""
        return {"format": ACCOUNTANT_FORMAT, "method": self.method, "history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace the history with one from :meth:`state_dict`.

        Raises:
            PrivacyError: If ``state`` is not an accountant state of this format.

        """
        if not isinstance(state, dict) or state.get("format") != ACCOUNTANT_FORMAT:
            raise PrivacyError(
                f"not a zenfed accountant state (expected format {ACCOUNTANT_FORMAT!r}); "
                "pass the dict returned by PrivacyAccountant.state_dict()"
            )
        fresh = PrivacyAccountant(method=state.get("method", "pld"))
        for entry in state.get("history", []):
            try:
                fresh.step(
                    noise_multiplier=entry["noise_multiplier"],
                    sample_rate=entry["sample_rate"],
                    num_steps=entry["num_steps"],
                )
            except (KeyError, TypeError) as err:
                raise PrivacyError(
                    f"accountant history entry {entry!r} is malformed: {err}"
                ) from None
        self.method = fresh.method
        self._history = fresh._history

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> PrivacyAccountant:
        """Return a new accountant restored from :meth:`state_dict` data."""
        accountant = cls()
        accountant.load_state_dict(state)
        return accountant


def planned_epsilon(
    *, noise_multiplier: float, sample_rate: float = 1.0, steps: int = 0, delta: float, method: str = "pld",
    schedule: Sequence[tuple[float, int]] | None = None,
) -> float:
    """Return epsilon of ``steps`` Poisson-subsampled Gaussian steps, at ``delta``.

    ``schedule`` replaces ``sample_rate`` and ``steps`` with several ``(sample_rate, steps)``
    stages composed in order (a job whose stages sample different data sets).
    """
    accountant = PrivacyAccountant(method=method)
    for rate, count in schedule if schedule is not None else [(sample_rate, steps)]:
        if count:
            accountant.step(noise_multiplier=noise_multiplier, sample_rate=rate, num_steps=count)
    return accountant.get_epsilon(delta)


def solve_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float = 1.0,
    steps: int = 0,
    method: str = "pld",
    rel_tol: float = 1e-3,
    schedule: Sequence[tuple[float, int]] | None = None,
) -> float:
    """Return the smallest sigma (within ``rel_tol``) whose epsilon is at most ``target_epsilon``.

    Bisection on the accountant: epsilon decreases as sigma grows. The value
    returned is on the safe side: ``planned_epsilon(sigma) <= target_epsilon``.

    Raises:
        PrivacyError: If a parameter is out of range or no sigma up to 10^4 reaches the target.

    """
    target_epsilon = _positive("target_epsilon", target_epsilon)
    stages = list(schedule) if schedule is not None else [(sample_rate, steps)]
    if sum(count for _, count in stages) < 1:
        raise PrivacyError(f"steps must be at least 1 to solve for sigma, got {stages}")

    def eps(sigma: float) -> float:
        return planned_epsilon(noise_multiplier=sigma, delta=delta, method=method, schedule=stages)

    low, high = 0.25, 1.0
    while eps(high) > target_epsilon:
        low, high = high, high * 2.0
        if high > 1e4:
            raise PrivacyError(
                f"no noise multiplier up to 1e4 reaches epsilon={target_epsilon} with "
                f"{steps} steps at sample rate {sample_rate}; raise the target or take fewer steps"
            )
    while low > 1e-3 and eps(low) <= target_epsilon:
        low, high = low / 2.0, low
    while (high - low) / high > rel_tol:
        mid = math.sqrt(low * high)
        if eps(mid) <= target_epsilon:
            high = mid
        else:
            low = mid
    return high


@dataclass(frozen=True)
class RecordDPPlan:
    """The record-level DP parameters of a whole job at one site."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    epsilon: float

    def to_dict(self) -> dict[str, float | int]:
        """Return the plan as JSON data (for metrics, the audit log and the report)."""
        return {
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "steps": self.steps,
            "delta": self.delta,
            "epsilon": self.epsilon,
        }


def plan_record_dp(
    *,
    rounds: int,
    local_steps: int,
    batch_size: int,
    num_records: int,
    noise_multiplier: float | None = None,
    target_epsilon: float | None = None,
    delta: float | None = None,
    method: str = "pld",
) -> RecordDPPlan:
    """Plan DP-SGD for a job: solve sigma from a target epsilon, or compute epsilon from sigma.

    Args:
        rounds: federated rounds.
        local_steps: DP-SGD steps per round at this site.
        batch_size: expected batch size; the Poisson rate is ``batch_size / num_records``.
        num_records: training records at this site.
        noise_multiplier: sigma; give exactly one of this and ``target_epsilon``.
        target_epsilon: the epsilon the whole job must not exceed.
        delta: the site's delta; default ``1 / (10 num_records)``.
        method: accounting method, "pld" or "rdp".

    Raises:
        PrivacyError: If both or neither of sigma and the target are given, or a value is bad.

    """
    if (noise_multiplier is None) == (target_epsilon is None):
        raise PrivacyError("give exactly one of noise_multiplier and target_epsilon")
    if rounds < 1 or local_steps < 1:
        raise PrivacyError(f"rounds and local_steps must be >= 1, got {rounds}, {local_steps}")
    delta = default_delta(num_records) if delta is None else _check_delta(delta)
    rate = sample_rate_for(batch_size=batch_size, num_records=num_records)
    steps = rounds * local_steps
    if noise_multiplier is None:
        noise_multiplier = solve_noise_multiplier(
            target_epsilon=cast(float, target_epsilon),
            delta=delta,
            sample_rate=rate,
            steps=steps,
            method=method,
        )
    epsilon = planned_epsilon(
        noise_multiplier=noise_multiplier, sample_rate=rate, steps=steps, delta=delta, method=method
    )
    return RecordDPPlan(float(noise_multiplier), rate, steps, delta, epsilon)
