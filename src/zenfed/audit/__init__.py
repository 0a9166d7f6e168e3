"""Tamper-evident audit: a hash-chained, signed log per participant, its verifier, and reports.

    log = AuditLog.for_kit(kit / "startup", log_path=ws / "audit" / "site-1.jsonl")
    log.append(events.UPDATE_SENT, round=1, sha256=digest, size=len(payload))

``zenfed.audit.verify`` checks logs and whole job results; ``zenfed.audit.report``
builds the compliance report. This package never imports nvflare.
"""

from zenfed.audit import events
from zenfed.audit.errors import AuditError
from zenfed.audit.log import AuditLog, read_records

__all__ = ["AuditError", "AuditLog", "events", "read_records"]
