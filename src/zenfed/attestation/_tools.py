"""Running vendor tools for hardware TEE kinds; every failure becomes a stated reason."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence

from zenfed.attestation.records import EvidenceRejected


def run_tool(cmd: Sequence[str], *, what: str, timeout_s: float) -> bytes:
    """Run ``cmd`` and return its stdout.

    Raises:
        EvidenceRejected: If it cannot start, times out or exits non-zero; the
            message holds the command's last error line.

    """
    try:
        done = subprocess.run(list(cmd), capture_output=True, timeout=timeout_s, check=False)
    except FileNotFoundError:
        raise EvidenceRejected(f"{what}: {cmd[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise EvidenceRejected(
            f"{what}: {cmd[0]} did not finish within {timeout_s:.0f} s"
        ) from None
    if done.returncode != 0:
        lines = done.stderr.decode(errors="replace").strip().splitlines() or ["(no message)"]
        raise EvidenceRejected(f"{what}: {cmd[0]} exited with {done.returncode}: {lines[-1]}")
    return done.stdout
