"""A site's differential privacy for one job: plan the epsilon, enforce the budget, clip and noise, record.

One :class:`SiteDP` per job at a site. It reads the job's ``privacy``
section and the site's own ``privacy`` policy, keeps the job's accountant,
and writes every round's spend to the site's signed ledger before the update
leaves the site. It needs no FLARE. The session calls :meth:`SiteDP.admit`
before round 1 and :meth:`SiteDP.for_round` before training; the update
chain's DP stages (``zenfed.site.stages``) call :meth:`SiteDP.clip`,
:meth:`SiteDP.add_noise` and :meth:`SiteDP.after_round`, in the order the
chain fixes.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch

from zenfed.privacy.dp import (
    DEFAULT_CLIENT_DELTA,
    BudgetDecision,
    BudgetExhausted,
    ClientLevelDP,
    DPRequiredError,
    PrivacyAccountant,
    PrivacyBudgetError,
    PrivacyError,
    PrivacyLedger,
    add_gaussian_noise,
    client_level_dp,
    clip_update,
    decide_budget,
    default_delta,
    plan_record_dp,
    planned_epsilon,
    sample_rate_for,
    solve_noise_multiplier,
)
from zenfed.site.run_state import SiteRunState
from zenfed.spec import JobSpec, SitePolicy, SitePrivacyPolicy
from zenfed.types import AdapterState, RecordDP

_log = logging.getLogger(__name__)

SIGNING_KEY = "client.key"
CERTIFICATE = "client.crt"


class SiteDP:
    """A job's differential privacy at one site: plan, budget checks, noise and the ledger.

    Args:
        spec: the job spec (its ``privacy``, ``training`` and ``federation`` sections).
        policy: the site's policy (or just its ``privacy`` section).
        ledger_path: the site's ledger file; None only where the kit has no key (simulator).
        signing_key_path: the kit's ``startup/client.key``; None together with ``ledger_path``.
        certificate_path: the kit's ``startup/client.crt``, checked against the key.
        dataset: the dataset's name at this site (budgets are per dataset).
        job_id: the job's id (spend is recorded per job).
        num_records: training records at this site (n).
        num_sites: sites in the job; client-level distributed noise assumes
            ``k = min(min_sites, num_sites)`` honest sites in every sum.
        num_pairs: preference pairs at this site, for a job with DPO rounds (a pair is their unit).
        other_datasets: further datasets the job trains on (a two-stage job's preference set):
            the job's spend counts against each one's budget as well.
        run_state: where a kit without a ledger keeps the job's accountant between tasks, so a
            later process of the same job run goes on counting (the ledger does this where there is one).

    Raises:
        PrivacyError: If a parameter is invalid.
        LedgerError: If the ledger cannot be opened or is signed by another key.

    """

    def __init__(
        self,
        *,
        spec: JobSpec,
        policy: SitePolicy | SitePrivacyPolicy,
        ledger_path: str | Path | None,
        signing_key_path: str | Path | None,
        certificate_path: str | Path | None = None,
        dataset: str,
        job_id: str,
        num_records: int,
        num_sites: int,
        num_pairs: int | None = None,
        other_datasets: tuple[str, ...] = (),
        run_state: SiteRunState | None = None,
    ) -> None:
        if num_records < 1 or num_sites < 1 or (num_pairs is not None and num_pairs < 1):
            raise PrivacyError(
                f"num_records and num_sites must be >= 1, got {num_records} and {num_sites}"
            )
        if (ledger_path is None) != (signing_key_path is None):
            raise PrivacyError("give both ledger_path and signing_key_path, or neither")
        self.spec = spec
        self.privacy = spec.privacy
        self.policy = policy.privacy if isinstance(policy, SitePolicy) else policy
        self.dataset = dataset
        self.datasets = (dataset, *other_datasets)
        self.job_id = job_id
        self.num_records = num_records
        self.num_pairs = num_pairs
        self.num_sites = num_sites
        self.level = self.privacy.level
        self.ledger = (
            PrivacyLedger(
                ledger_path, signing_key_path=signing_key_path, certificate_path=certificate_path
            )
            if ledger_path is not None and signing_key_path is not None
            else None
        )
        if self.level == "record":
            self.delta = self.policy.delta or default_delta(max(num_records, num_pairs or 0))
        else:
            self.delta = self.policy.delta or DEFAULT_CLIENT_DELTA
        self._run_state = run_state
        if self.ledger is not None:
            saved = self.ledger.accountant_state(dataset=dataset, job=job_id)
        else:
            saved = run_state.get("accountant") if run_state is not None else None
        # Resume after a restart: the ledger holds the accountant of every round already sent.
        self.accountant = (
            PrivacyAccountant.from_state_dict(saved)
            if saved
            else PrivacyAccountant(method=self.privacy.accounting)
        )
        self._recorded_epsilon = self.accountant.get_epsilon(self.delta) if saved else 0.0
        self.noise_multiplier: float | None = None
        self.sample_rate = 1.0
        self._stage_rates: dict[str, float] = {}
        self.steps_per_round = 1
        self.planned_epsilon: float | None = None
        self._client: ClientLevelDP | None = None

    @classmethod
    def from_kit(
        cls,
        *,
        spec: JobSpec,
        policy: SitePolicy,
        startup_dir: str | Path | None,
        local_dir: str | Path | None,
        job_id: str,
        num_records: int,
        num_sites: int,
        num_pairs: int | None = None,
        run_state: SiteRunState | None = None,
    ) -> SiteDP:
        """Build the stage from a FLARE kit: ledger in ``local/``, key and cert in ``startup/``.

        A kit without ``client.key`` (the simulator) gets no ledger: epsilon is still
        accounted and the per-job limit enforced, but a lifetime budget is refused.
        """
        startup = Path(startup_dir) if startup_dir else None
        key = startup / SIGNING_KEY if startup else None
        if key is None or not key.is_file() or not local_dir:
            _log.warning("no %s in the kit (simulator?): privacy spend is not kept in a ledger",
                         SIGNING_KEY)
            ledger, key, cert = None, None, None
        else:
            ledger = Path(local_dir) / policy.privacy.ledger
            cert_path = key.with_name(CERTIFICATE)
            cert = cert_path if cert_path.is_file() else None
        # The budgets charged are those of the datasets the job trains on: SFT rounds, DPO rounds or both.
        trained = [spec.data.dataset] if spec.objective == "sft" or spec.dpo.sft_rounds else []
        trained += [spec.dpo.dataset] if spec.objective == "dpo" else []
        return cls(
            spec=spec, policy=policy, ledger_path=ledger, signing_key_path=key,
            certificate_path=cert, dataset=trained[0], job_id=job_id,
            num_records=num_records, num_sites=num_sites, num_pairs=num_pairs,
            other_datasets=tuple(trained[1:]), run_state=run_state,
        )

    # -- before training -----------------------------------------------------------------

    def admit(self) -> dict[str, Any]:
        """Plan the job's epsilon and check it against the site's limits, before round 1.

        Returns:
            The plan and the budget decision as JSON data, for the audit log.

        Raises:
            DPRequiredError: If the site requires DP (or limits epsilon) and the job has
                none, or the job's client-level setup would not give the privacy it claims.
            PrivacyBudgetError: If the planned epsilon exceeds the per-job maximum or the
                dataset's remaining lifetime budget.

        """
        if self.level == "none":
            return self._admit_without_dp()
        self._check_setup()
        rounds = self.spec.federation.rounds
        method = self.accountant.method
        if self.level == "record" and self.spec.objective == "dpo":
            self.planned_epsilon = self._plan_stages(method)
        elif self.level == "record":
            plan = plan_record_dp(
                rounds=rounds, local_steps=self.spec.training.local_steps,
                batch_size=self.spec.training.batch_size, num_records=self.num_records,
                noise_multiplier=self.privacy.noise_multiplier,
                target_epsilon=self.privacy.target_epsilon, delta=self.delta, method=method,
            )
            self.noise_multiplier, self.sample_rate = plan.noise_multiplier, plan.sample_rate
            self.steps_per_round = self.spec.training.local_steps
            self.planned_epsilon = plan.epsilon
        else:
            sigma = self.privacy.noise_multiplier
            if sigma is None:
                sigma = solve_noise_multiplier(
                    target_epsilon=float(self.privacy.target_epsilon or 0), delta=self.delta,
                    sample_rate=1.0, steps=rounds, method=method,
                )
            k = min(self.spec.federation.min_sites, self.num_sites)
            self._client = client_level_dp(
                mode=self.privacy.client_mode, clip_norm=self.privacy.clip_norm,
                noise_multiplier=sigma, num_sites=k,
            )
            self.noise_multiplier = self._accounted_sigma()
            self.planned_epsilon = planned_epsilon(
                noise_multiplier=self.noise_multiplier, sample_rate=1.0, steps=rounds,
                delta=self.delta, method=method,
            )
        decision = self._decide(self.planned_epsilon, what="job")
        self._refuse_if(decision, PrivacyBudgetError)
        return {
            "level": self.level, "unit": self.spec.privacy_unit(), "planned_epsilon": self.planned_epsilon,
            "delta": self.delta, "noise_multiplier": self.noise_multiplier, "clip_norm": self.privacy.clip_norm,
            "sample_rate": self.sample_rate, "stage_sample_rates": self._stage_rates or None, "rounds": rounds,
            "steps_per_round": self.steps_per_round, "accounting": method,
            "client_mode": self.privacy.client_mode if self.level == "client" else None,
            "decision": decision.to_dict(),
        }

    def _plan_stages(self, method: str) -> float:
        """Record-level DP for a job with DPO rounds: each stage samples its own data set at its own rate.

        One sigma for the whole job, solved so that the SFT stage's steps (records) and the DPO
        stage's steps (pairs) composed stay within the target: a conservative bound that also holds
        for a person whose record and preference pair are both at this site.
        """
        if self.num_pairs is None:
            raise PrivacyError("a job with DPO rounds needs the site's number of preference pairs")
        spec, steps = self.spec, self.spec.training.local_steps
        dpo_rounds = spec.federation.rounds - spec.dpo.sft_rounds
        self._stage_rates = {
            "sft": sample_rate_for(batch_size=spec.training.batch_size, num_records=self.num_records),
            "dpo": sample_rate_for(batch_size=spec.training.batch_size, num_records=self.num_pairs),
        }
        schedule = [(self._stage_rates["sft"], spec.dpo.sft_rounds * steps),
                    (self._stage_rates["dpo"], dpo_rounds * steps)]
        sigma = self.privacy.noise_multiplier or solve_noise_multiplier(
            target_epsilon=float(self.privacy.target_epsilon or 0), delta=self.delta, method=method,
            schedule=schedule)
        self.noise_multiplier, self.steps_per_round = sigma, steps
        self.sample_rate = self._stage_rates["dpo"]
        return planned_epsilon(noise_multiplier=sigma, delta=self.delta, method=method, schedule=schedule)

    def _admit_without_dp(self) -> dict[str, Any]:
        limits = self.policy.max_epsilon_per_job, self.policy.lifetime_epsilon
        if self.policy.require_dp or any(limit is not None for limit in limits):
            raise DPRequiredError(
                f"this site requires differential privacy (require_dp={self.policy.require_dp}, "
                f"max_epsilon_per_job={limits[0]}, lifetime_epsilon={limits[1]}), but the job "
                "has privacy.level 'none', whose epsilon is unbounded; set privacy.level to "
                "'record' with a target_epsilon within the site's limits"
            )
        return {"level": "none", "planned_epsilon": None, "decision": None}

    def _check_setup(self) -> None:
        if self.ledger is None and self.policy.lifetime_epsilon is not None:
            raise DPRequiredError(
                "this site sets a lifetime_epsilon but its kit has no signing key, so it "
                f"cannot keep a ledger; provision the site (startup/{SIGNING_KEY}) or remove "
                "the lifetime budget"
            )
        if self.level == "client" and self.privacy.client_mode == "distributed":
            if not self.spec.encryption.enabled:
                raise DPRequiredError(
                    "client_mode 'distributed' adds only sigma*C/sqrt(k) per site, which is "
                    "private only if the server sees nothing but the encrypted sum; set "
                    "encryption.enabled: true or use client_mode 'local'"
                )
            if self.spec.federation.weighting != "uniform":
                raise DPRequiredError(
                    "client_mode 'distributed' needs federation.weighting 'uniform': a weighted "
                    "sum has a sensitivity of the largest weight times C, which the noise "
                    "does not cover"
                )

    def _accounted_sigma(self) -> float:
        if self._client is None:
            raise PrivacyError("call admit() before training")
        k = min(self.spec.federation.min_sites, self.num_sites)
        return self._client.accounted_noise_multiplier(honest_contributors=k)

    # -- every round ---------------------------------------------------------------------

    def update_limits(self, policy: SitePrivacyPolicy) -> bool:
        """Apply budget limits site IT changed during the job; return whether they changed.

        Only the limits move (``max_epsilon_per_job``, ``lifetime_epsilon``): delta and the
        ledger are fixed for the job, so the accounting stays consistent.
        """
        changed = (policy.max_epsilon_per_job, policy.lifetime_epsilon) != (
            self.policy.max_epsilon_per_job, self.policy.lifetime_epsilon)
        if changed:
            self.policy = self.policy.model_copy(update={
                "max_epsilon_per_job": policy.max_epsilon_per_job, "lifetime_epsilon": policy.lifetime_epsilon,
            })
        return changed

    def for_round(self, round: int) -> RecordDP | None:
        """Check that this round fits the budget; return the DP-SGD setting to train with.

        Returns:
            ``RecordDP`` for record-level DP, else None (train without DP-SGD).

        Raises:
            BudgetExhausted: If this round would take the job past the site's per-job
                maximum or the dataset's lifetime budget: the site stops contributing.

        """
        if self.level == "none":
            return None
        if self.noise_multiplier is None:
            raise PrivacyError("call admit() before the first round")
        rate = self._stage_rates.get(self.spec.objective_for_round(round), self.sample_rate)
        after = self.accountant.projected_epsilon(
            delta=self.delta, noise_multiplier=self.noise_multiplier,
            sample_rate=rate, num_steps=self.steps_per_round,
        )
        decision = self._decide(after, what=f"round {round}")
        self._refuse_if(decision, BudgetExhausted, prefix=f"round {round}: this site stops "
                        "contributing to the job: ")
        if self.level != "record":
            return None
        return RecordDP(
            noise_multiplier=self.noise_multiplier, clip_norm=self.privacy.clip_norm,
            sample_rate=rate, accountant=self.accountant,
        )

    def clip(self, delta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Client level: return ``delta`` (local - global) scaled to an L2 norm of at most C."""
        mechanism = self._require_client()
        clipped, _ = clip_update(delta, clip_norm=mechanism.clip_norm)
        return clipped

    def add_noise(self, delta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Client level: add Gaussian noise to a clipped ``delta`` and compose one accountant step.

        The noise std is sigma*C (local mode) or sigma*C/sqrt(k) (distributed mode).
        """
        mechanism = self._require_client()
        noised = add_gaussian_noise(delta, std=mechanism.noise_std())
        self.accountant.step(noise_multiplier=self._accounted_sigma(), sample_rate=1.0)
        return noised

    def privatize_update(
        self, *, global_adapter: AdapterState, local_adapter: AdapterState
    ) -> AdapterState:
        """Client level: return ``global + noise(clip(local - global))``; else ``local``.

        The update chain runs the same two steps as stages; this is the one-call form.
        """
        if self.level != "client":
            return local_adapter
        if set(global_adapter) != set(local_adapter):
            raise PrivacyError("the local and global adapters do not have the same tensors")
        delta = {k: local_adapter[k].double() - global_adapter[k].double() for k in local_adapter}
        noised = self.add_noise(self.clip(delta))
        return {
            k: (global_adapter[k].double() + noised[k]).to(torch.float32).contiguous()
            for k in sorted(local_adapter)
        }

    def _require_client(self) -> ClientLevelDP:
        if self._client is None:
            raise PrivacyError("call admit() before the first round (client-level DP only)")
        return self._client

    def after_round(self, round: int) -> dict[str, float]:
        """Record the job's spend in the signed ledger; call it before the update leaves.

        Returns:
            ``{"epsilon", "delta", "noise_multiplier", "clip_norm", "epsilon_round"}``
            (epsilon is the job's total so far at this site), or ``{}`` without DP.

        """
        if self.level == "none":
            return {}
        if self.noise_multiplier is None:
            raise PrivacyError("call admit() before the first round")
        epsilon = self.accountant.get_epsilon(self.delta)
        if self.ledger is not None:
            for dataset in self.datasets:
                self.ledger.record_spend(
                    dataset=dataset, job=self.job_id, round=round, epsilon=epsilon,
                    delta=self.delta, level=self.level, accountant_state=self.accountant.state_dict(),
                )
        elif self._run_state is not None:
            self._run_state.set(accountant=self.accountant.state_dict())
        spent_round = max(0.0, epsilon - self._recorded_epsilon)
        self._recorded_epsilon = epsilon
        return {
            "epsilon": epsilon, "delta": self.delta, "noise_multiplier": self.noise_multiplier,
            "clip_norm": self.privacy.clip_norm, "epsilon_round": spent_round,
        }

    def ledger_head(self) -> str | None:
        """Return the ledger's SHA-256 head, for the audit log to anchor (None without one)."""
        return self.ledger.head_hash() if self.ledger is not None else None

    # -- helpers -------------------------------------------------------------------------

    def _decide(self, epsilon: float, *, what: str) -> BudgetDecision:
        """The budget decision for the job's ``epsilon``: the first dataset it would overspend, else allowed."""
        decisions = [self._decide_for(dataset, epsilon, what=what) for dataset in self.datasets]
        return next((d for d in decisions if not d.allowed), decisions[0])

    def _decide_for(self, dataset: str, epsilon: float, *, what: str) -> BudgetDecision:
        limits = {
            "max_epsilon_per_job": self.policy.max_epsilon_per_job,
            "lifetime_budget": self.policy.lifetime_epsilon,
        }
        if not math.isfinite(epsilon):
            raise PrivacyError(f"the {what}'s epsilon is not finite; add noise")
        if self.ledger is None:
            return decide_budget(
                job_totals={self.job_id: self._recorded_epsilon}, dataset=dataset,
                job=self.job_id, job_epsilon=epsilon, what=f"the {what} of job {self.job_id!r}",
                **limits,
            )
        if what == "job":
            return self.ledger.check_job(
                planned_epsilon=epsilon, dataset=dataset, job=self.job_id, **limits
            )
        return self.ledger.can_spend(
            dataset=dataset, job=self.job_id, epsilon_after=epsilon, **limits
        )

    @staticmethod
    def _refuse_if(
        decision: BudgetDecision, error: type[PrivacyBudgetError], *, prefix: str = ""
    ) -> None:
        if not decision.allowed:
            raise error(prefix + decision.reason, decision=decision.to_dict())
