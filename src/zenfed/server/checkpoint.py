"""Per-round server checkpoints, so a restarted server resumes a job where it stopped.

The global state is stored as the aggregation strategy serialises it: an
adapter in the clear, or a ciphertext sum under encryption (never decrypted).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zenfed.atomic import atomic_write_bytes
from zenfed.digest import sha256_hex

STATE_FILE = "state.json"
GLOBAL_FILE = "global.bin"


@dataclass
class RunState:
    """What the server session must remember between rounds."""

    completed_round: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    global_payload: bytes | None = None
    global_meta: dict[str, Any] = field(default_factory=dict)
    finished: bool = False
    audit_dirs: list[str] = field(default_factory=list)  # the audit folders of the runs that made its rounds


class CheckpointStore:
    """A folder holding the latest round's state and global payload."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def save(self, state: RunState) -> None:
        """Write the payload first, then the state naming its hash: a crash never mixes rounds."""
        self.folder.mkdir(parents=True, exist_ok=True)
        meta: dict[str, Any] = {
            "completed_round": state.completed_round, "history": state.history,
            "finished": state.finished, "global_meta": state.global_meta, "global_sha256": None,
            "audit_dirs": state.audit_dirs,
        }
        if state.global_payload is not None:
            atomic_write_bytes(self.folder / GLOBAL_FILE, state.global_payload)
            meta["global_sha256"] = sha256_hex(state.global_payload)
        atomic_write_bytes(self.folder / STATE_FILE, json.dumps(meta, indent=2).encode())

    def load(self) -> RunState | None:
        """Return the saved state, or None if there is none or it is inconsistent."""
        state_path = self.folder / STATE_FILE
        if not state_path.is_file():
            return None
        try:
            meta = json.loads(state_path.read_text())
            payload = None
            if meta.get("global_sha256"):
                payload = (self.folder / GLOBAL_FILE).read_bytes()
                if sha256_hex(payload) != meta["global_sha256"]:
                    return None
            return RunState(
                completed_round=int(meta["completed_round"]), history=list(meta["history"]),
                global_payload=payload, global_meta=dict(meta.get("global_meta") or {}),
                finished=bool(meta.get("finished", False)), audit_dirs=[str(d) for d in meta.get("audit_dirs", [])],
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None
