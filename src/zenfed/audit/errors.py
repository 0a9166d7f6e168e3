"""The audit package's typed error."""

from zenfed.errors import ZenfedError


class AuditError(ZenfedError):
    """An audit log cannot be opened, written, read or verified as asked."""
