"""What a site keeps between rounds beyond one job run: its strategy's state, kept by job spec.

A job resumed after a crash runs under a new job id, so the per-job run folder would lose
what a site-side optimizer (FedOpt, SCAFFOLD), the personal layers (``site/personal.py``)
and the site's own AdamW moments carry from round to round. They live in a folder keyed by
the job spec, like the server's checkpoint; a job that starts afresh clears it. The moments
are kept per round (the last two), so that a resumed round starts from those of the round
before it, as it would have without the crash.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from zenfed.atomic import atomic_write_bytes
from zenfed.digest import sha256_hex
from zenfed.errors import PolicyError
from zenfed.site.personal import PERSONAL_FILE
from zenfed.spec import JobSpec
from zenfed.strategies import Strategy

STRATEGY_STATE_FILE = "strategy_state.safetensors"
OPTIMIZER_FILE = "optimizer-after-round-{:04d}.safetensors"
REFERENCE_FILE = "dpo-reference.safetensors"  # the adapter a job's DPO stage started from (site/alignment.py)


class SiteStateStore:
    """The state folder of one job spec at one site.

    Args:
        root: The site's kit folder.
        spec: The job spec (its name and hash key the folder).
    """

    def __init__(self, *, root: Path, spec: JobSpec) -> None:
        self.folder = root / "zenfed-state" / f"{spec.name}-{spec.spec_hash()[:16]}"
        self.path = self.folder / STRATEGY_STATE_FILE
        self._kept_sha: str | None = None  # of the state last written or read: an unchanged one is not rewritten

    def clear(self) -> None:
        """Forget everything an earlier run of this job left (a job that starts afresh)."""
        for name in (STRATEGY_STATE_FILE, PERSONAL_FILE, REFERENCE_FILE):
            (self.folder / name).unlink(missing_ok=True)
        for kept in self._optimizer_files():
            kept.unlink(missing_ok=True)
        self._kept_sha = None

    def keep_optimizer(self, round_index: int, state: Any) -> None:
        """Keep the site's optimizer state after ``round_index`` (0600), and the one before it; drop older ones."""
        if state is None:
            return
        tensors: dict[str, torch.Tensor] = {}
        for index, moments in state.get("state", {}).items():
            for name, value in moments.items():
                tensors[f"{index}.{name}"] = torch.as_tensor(value).detach().clone().contiguous()
        meta = {"param_groups": json.dumps(state.get("param_groups", []))}
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write_bytes(self.folder / OPTIMIZER_FILE.format(round_index), bytes(save_tensors(tensors, meta)))
        for kept in self._optimizer_files():
            if _round_of(kept) < round_index - 1:
                kept.unlink(missing_ok=True)

    def optimizer_before(self, round_index: int) -> Any:
        """The optimizer state kept after the latest round before ``round_index``, or None.

        Raises:
            PolicyError: If the file cannot be read (it names the file and what to do).
        """
        earlier = [kept for kept in self._optimizer_files() if _round_of(kept) < round_index]
        if not earlier:
            return None
        path = max(earlier, key=_round_of)
        try:
            with safe_open(str(path), framework="pt") as kept:
                groups = json.loads((kept.metadata() or {})["param_groups"])
                moments: dict[int, dict[str, torch.Tensor]] = {}
                for key in kept.keys():
                    index, name = key.split(".", 1)
                    moments.setdefault(int(index), {})[name] = kept.get_tensor(key)
        except (SafetensorError, OSError, KeyError, ValueError) as err:
            raise PolicyError(f"{path} cannot be read ({err}); delete it (the site's optimizer then restarts "
                              "its moments)") from None
        return {"state": moments, "param_groups": groups}

    def _optimizer_files(self) -> list[Path]:
        return sorted(self.folder.glob(OPTIMIZER_FILE.replace("{:04d}", "*"))) if self.folder.is_dir() else []

    def resume(self, strategy: Strategy) -> None:
        """Load the kept state into ``strategy``, if there is one.

        Raises:
            PolicyError: If the file cannot be read (it names the file and what to do).
        """
        if not self.path.is_file():
            return
        data = self.path.read_bytes()
        try:
            strategy.load_state_dict(load_tensors(data))
        except (SafetensorError, KeyError, ValueError, RuntimeError) as err:
            raise PolicyError(f"{self.path} cannot be read ({err}); delete it and restart the job from "
                              "round 1, or restore it from a backup") from None
        self._kept_sha = sha256_hex(data)

    def keep(self, strategy: Strategy) -> str | None:
        """Write the strategy's state (0600) if it changed; return its SHA-256, or None if nothing was written."""
        state = strategy.state_dict()
        if state is None:
            return None
        data = bytes(save_tensors(state))
        digest = sha256_hex(data)
        if digest == self._kept_sha:
            return None  # the same sum again (final evaluation, then release): nothing new
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write_bytes(self.path, data)
        self._kept_sha = digest
        return digest


def _round_of(path: Path) -> int:
    return int(path.stem.rsplit("-", 1)[-1])
