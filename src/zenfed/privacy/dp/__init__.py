"""Differential privacy for zenfed: the public API in one place.

- Accounting (``accountant``): :class:`PrivacyAccountant`, :func:`planned_epsilon`,
  :func:`solve_noise_multiplier`, :func:`plan_record_dp`, :func:`default_delta`.
- Record-level DP-SGD (``sgd``): :class:`DPSGD`, :class:`PoissonSampler`.
- Client-level DP (``client``): :func:`clip_update`, :func:`add_gaussian_noise`,
  :class:`LocalClientDP`, :class:`DistributedClientDP`, :func:`client_level_dp`.
- Budgets (``ledger``, ``budget``): :class:`PrivacyLedger`, :class:`BudgetDecision`, :func:`decide_budget`.
- Errors (``errors``): every DP failure is a :class:`PrivacyError` or a policy refusal.

See docs/privacy.md for how to use them from a training loop and for the threat models.
"""

from zenfed.privacy.dp.accountant import (
    DEFAULT_CLIENT_DELTA,
    PrivacyAccountant,
    RecordDPPlan,
    default_delta,
    plan_record_dp,
    planned_epsilon,
    sample_rate_for,
    solve_noise_multiplier,
)
from zenfed.privacy.dp.budget import decide_budget
from zenfed.privacy.dp.client import (
    ClientDPResult,
    ClientLevelDP,
    DistributedClientDP,
    LocalClientDP,
    add_gaussian_noise,
    client_level_dp,
    clip_update,
    update_norm,
)
from zenfed.privacy.dp.errors import (
    BudgetExhausted,
    DPRequiredError,
    LedgerError,
    LedgerTamperedError,
    PrivacyBudgetError,
    PrivacyError,
)
from zenfed.privacy.dp.ledger import BudgetDecision, PrivacyLedger, SpendRecord
from zenfed.privacy.dp.sgd import DPSGD, DPStepStats, PoissonSampler, UnitLoss, secure_generator

__all__ = [
    "DEFAULT_CLIENT_DELTA",
    "DPSGD",
    "BudgetDecision",
    "BudgetExhausted",
    "DPRequiredError",
    "ClientDPResult",
    "ClientLevelDP",
    "DPStepStats",
    "DistributedClientDP",
    "LedgerError",
    "LedgerTamperedError",
    "LocalClientDP",
    "PoissonSampler",
    "PrivacyAccountant",
    "PrivacyBudgetError",
    "PrivacyError",
    "PrivacyLedger",
    "RecordDPPlan",
    "SpendRecord",
    "UnitLoss",
    "add_gaussian_noise",
    "client_level_dp",
    "clip_update",
    "decide_budget",
    "default_delta",
    "plan_record_dp",
    "planned_epsilon",
    "sample_rate_for",
    "secure_generator",
    "solve_noise_multiplier",
    "update_norm",
]
