"""Typed errors of the differential privacy modules."""

from typing import Any

from zenfed.errors import PolicyError, ZenfedError


class PrivacyError(ZenfedError):
    """A differential privacy parameter is invalid (e.g. a negative clip norm)."""


class PrivacyBudgetError(PolicyError):
    """A site's privacy budget refuses a job or a round; the message gives the numbers.

    ``decision`` holds the budget decision as JSON data (for the audit log), if known.
    """

    def __init__(self, message: str, *, decision: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.decision = decision


class LedgerError(ZenfedError):
    """A privacy ledger cannot be read, written or matched to the site's key."""


class LedgerTamperedError(LedgerError):
    """A privacy ledger's signature does not match its content: it was edited or corrupted."""


class BudgetExhausted(PrivacyBudgetError):
    """A job's next round would exceed the site's budget: the site stops contributing to it."""


class DPRequiredError(PolicyError):
    """The job's differential privacy does not meet what the site's policy requires."""
