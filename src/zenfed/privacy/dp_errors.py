"""Typed errors of the differential privacy modules."""

from zenfed.errors import PolicyError, ZenfedError


class PrivacyError(ZenfedError):
    """A differential privacy parameter is invalid (e.g. a negative clip norm)."""


class PrivacyBudgetError(PolicyError):
    """A site's privacy budget refuses a job or a round; the message gives the numbers."""


class LedgerError(ZenfedError):
    """A privacy ledger cannot be read, written or matched to the site's key."""


class LedgerTamperedError(LedgerError):
    """A privacy ledger's signature does not match its content: it was edited or corrupted."""
