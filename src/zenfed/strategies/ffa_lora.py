"""FFA-LoRA (Sun et al., ICLR 2024): LoRA's A frozen at the shared initialisation, only B trained and sent.

Averaging A and B separately is not averaging the update B·A: mean(B)·mean(A)
is not mean(B·A). With A frozen and the same at every site, the update is
linear in B, so the mean of the B matrices is exactly the mean update, under
encryption too. It also halves what a site sends, and DP-SGD clips and noises
B alone (the noise is spread over half the parameters).

A is the job's deterministic initial adapter (``engines/lora_init.py``), a
function of the job spec alone, so every site builds the same A without
exchanging it. The server sums B; each site puts the mean B beside its A.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

from zenfed.errors import PolicyError
from zenfed.spec import JobSpec
from zenfed.strategies.fedavg import FedAvg
from zenfed.types import AdapterState

_A, _B = ".lora_A.", ".lora_B."


class FFALoRA(FedAvg):
    """FedAvg of B with A frozen at the shared initialisation."""

    name: ClassVar[str] = "ffa_lora"
    global_at_sites: ClassVar[bool] = True  # the server holds only B; a site rebuilds the adapter

    def __init__(self, spec: JobSpec) -> None:
        super().__init__(spec)
        self.frozen_a: AdapterState = {}

    def begin(self, initial_adapter: AdapterState) -> None:
        """Keep the shared A."""
        self.frozen_a = {k: v.clone() for k, v in initial_adapter.items() if _A in k}
        if not self.frozen_a or not any(_B in k for k in initial_adapter):
            raise PolicyError("FFA-LoRA needs LoRA A and B tensors in the adapter")

    def sent_names(self, names: Iterable[str]) -> set[str]:
        """Only B travels."""
        return {name for name in names if _B in name}

    def frozen_names(self, names: Iterable[str]) -> set[str]:
        """A keeps its initial values."""
        return {name for name in names if _A in name}

    def after_decrypt(self, mean: AdapterState, *, global_round: int) -> AdapterState:
        """The global: the shared A beside the mean B."""
        if not self.frozen_a:
            raise PolicyError("FFA-LoRA: this site has not taken the job's initial adapter")
        return {**self.frozen_a, **mean}
