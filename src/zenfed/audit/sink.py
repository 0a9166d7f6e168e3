"""An audit sink that participants write through, whether or not they have a kit.

A provisioned participant signs records with its kit key. The FLARE simulator
has no kits, so there the sink records nothing and says so once; everything
else about a job runs the same.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from zenfed.audit.log import AuditLog

_log = logging.getLogger(__name__)


class AuditSink:
    """Write-through to an AuditLog, or nothing when the participant has no kit keys."""

    def __init__(self, log: AuditLog | None):
        self._log = log

    @classmethod
    def for_participant(cls, *, startup_dir: str | Path | None, log_path: Path, participant: str) -> AuditSink:
        """Open the participant's log if its kit holds a key and certificate."""
        startup = Path(startup_dir) if startup_dir else None
        has_keys = startup is not None and any(
            (startup / f"{stem}.key").is_file() and (startup / f"{stem}.crt").is_file()
            for stem in ("server", "client")
        )
        if not has_keys or startup is None:
            _log.warning("no kit key for %s (simulator?): this run is not audited", participant)
            return cls(None)
        log = AuditLog.for_kit(startup, log_path=log_path, participant=participant)
        root_ca = startup / "rootCA.pem"
        if root_ca.is_file():
            shutil.copyfile(root_ca, log_path.parent / "rootCA.pem")
        return cls(log)

    @property
    def enabled(self) -> bool:
        """Whether records are written."""
        return self._log is not None

    @property
    def path(self) -> Path | None:
        """The log file, if any."""
        return self._log.path if self._log else None

    def head(self) -> tuple[int, str] | None:
        """``(seq, sha256)`` of the last record, if any."""
        return self._log.head if self._log else None

    def record(self, event: str, **fields: Any) -> None:
        """Append one record; an audit failure is raised, never swallowed."""
        if self._log is not None:
            self._log.append(event, **fields)

    def close(self) -> None:
        """Close the log."""
        if self._log is not None:
            self._log.close()
