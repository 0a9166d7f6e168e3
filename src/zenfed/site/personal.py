"""Personal layers: the LoRA of the layers a job marks personal stays at each site, never sent.

Each site keeps its own trained tensors of those layers from round to round
(in its run folder too, so a restarted site resumes them) and trains and
evaluates with them; federated evaluation therefore reports each site's
accuracy with its personal layers. What travels, is summed and is released is
the shared part only: the released adapter carries the personal layers at
their shared initial values.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from zenfed.atomic import atomic_write_bytes
from zenfed.errors import PolicyError
from zenfed.types import AdapterState

PERSONAL_FILE = "personal_layers.safetensors"
_LAYER = re.compile(r"\.layers\.(\d+)\.")


class PersonalLayers:
    """One site's personal LoRA tensors for a job.

    Args:
        layers: The job's ``lora.personal_layers``.
        initial_adapter: The job's shared initial adapter.
        folder: The site's run folder for the job (where the tensors are kept).

    Raises:
        PolicyError: If the personal layers match no adapted tensor, or leave nothing shared.
    """

    def __init__(self, *, layers: Iterable[int], initial_adapter: AdapterState, folder: Path) -> None:
        wanted = set(layers)
        self.initial = initial_adapter
        self.names = {name for name in initial_adapter if _layer_of(name) in wanted}
        self.path = folder / PERSONAL_FILE
        if wanted and not self.names:
            raise PolicyError(f"lora.personal_layers {sorted(wanted)} match no adapted tensor; list adapted layers")
        if wanted and self.names == set(initial_adapter):
            raise PolicyError("every adapted tensor is personal: nothing would be federated; keep a layer shared")
        self.kept: AdapterState = {name: initial_adapter[name] for name in self.names}
        if self.names and self.path.is_file():  # a restarted site resumes its personal layers
            try:
                kept = load_tensors(self.path.read_bytes())
            except (SafetensorError, ValueError, RuntimeError) as err:
                raise PolicyError(f"{self.path} cannot be read ({err}); delete it to train the personal layers "
                                  "afresh from their initial values") from None
            if set(kept) != self.names:
                raise PolicyError(f"{self.path} holds other tensors than this job's personal layers; delete it")
            self.kept = kept

    def shared(self, names: Iterable[str]) -> set[str]:
        """The names that are not personal."""
        return set(names) - self.names

    def for_training(self, global_adapter: AdapterState) -> AdapterState:
        """The site's adapter: the shared global with this site's own personal tensors."""
        return {**self.initial, **global_adapter, **self.kept}

    def for_release(self, global_adapter: AdapterState) -> AdapterState:
        """The shared part: the personal tensors at their shared initial values."""
        return {**self.initial, **{k: v for k, v in global_adapter.items() if k not in self.names}}

    def keep(self, trained: AdapterState) -> None:
        """Keep the site's newly trained personal tensors (persisted, 0600)."""
        if not self.names:
            return
        self.kept = {name: trained[name].clone() for name in self.names}
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write_bytes(self.path, bytes(save_tensors(self.kept)))


def _layer_of(name: str) -> int | None:
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None
