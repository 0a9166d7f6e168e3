"""FlexLoRA-style product-space aggregation (Bai et al., 2024; HLoRA is its kin): for jobs in the clear.

Averaging LoRA's A and B separately is not averaging the update: mean(B)·mean(A) is not
mean(B·A), and with heterogeneous ranks (a site's ``max_lora_rank``) zero-padded factors
make it worse. Here each site sends its full update ``scale·B·A`` for every adapted
module (``scale = alpha / rank``, the job's rank: a capped site trains the leading ranks
under the same scale). The server's weighted mean of those products is then exactly the
mean update, and each site factorises it by SVD, keeping the ``rank`` largest singular
directions: the best rank-``rank`` approximation of the mean (Eckart-Young). A site with
a smaller rank trains the leading ones, which now carry the largest singular values.

The products are d_out x d_in per module, tens of times the bytes of the factors, so the
job spec refuses this strategy with encryption on; FFA-LoRA is the heterogeneous-rank
method that stays exact under encryption. The factorisation is post-processing of the
decoded mean, so record-level DP covers it unchanged.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from zenfed.errors import PolicyError
from zenfed.spec import JobSpec
from zenfed.strategies.fedavg import FedAvg
from zenfed.types import AdapterState

_A, _B, _PRODUCT = ".lora_A.", ".lora_B.", ".lora_BA."


def product_name(a_name: str) -> str:
    """Return the wire name of a module's product, from its ``lora_A`` name."""
    return a_name.replace(_A, _PRODUCT)


class FlexLoRA(FedAvg):
    """FedAvg of each site's ``scale·B·A``; every site truncates the mean to the job's rank by SVD."""

    name: ClassVar[str] = "flexlora"
    global_at_sites: ClassVar[bool] = True  # the server holds the mean products; a site factorises them
    keeps_optimizer_moments: ClassVar[bool] = False  # each round's factors are in a new basis

    def __init__(self, spec: JobSpec) -> None:
        super().__init__(spec)
        self.rank = spec.lora.rank
        self.scale = spec.lora.alpha / spec.lora.rank

    def _pairs(self, adapter: AdapterState) -> dict[str, tuple[str, str]]:
        """Product name -> (A name, B name), for every module of ``adapter``."""
        pairs = {product_name(a): (a, a.replace(_A, _B)) for a in sorted(adapter) if _A in a}
        missing = [b for _, b in pairs.values() if b not in adapter]
        if not pairs or missing:
            raise PolicyError(f"flexlora needs LoRA A and B for every module; missing {missing[:2] or 'all'}")
        return pairs

    def wire_template(self, initial_adapter: AdapterState) -> AdapterState:
        """One d_out x d_in product per adapted module travels, nothing else."""
        return {name: torch.zeros(initial_adapter[b].shape[0], initial_adapter[a].shape[1])
                for name, (a, b) in self._pairs(initial_adapter).items()}

    def update_to_send(self, *, global_adapter: AdapterState, local_adapter: AdapterState) -> AdapterState:
        """The site's full update per module: ``scale·B·A`` of its trained adapter."""
        return {name: (self.scale * local_adapter[b].double() @ local_adapter[a].double()).float()
                for name, (a, b) in self._pairs(local_adapter).items()}

    def after_decrypt(self, mean: AdapterState, *, global_round: int) -> AdapterState:
        """Factorise each mean product into rank-``rank`` A and B (``scale·B·A`` = its best approximation).

        The singular values are split evenly between B and A (``sqrt`` each), so neither factor
        dominates the next round's gradients.
        """
        adapter: AdapterState = {}
        root_scale = math.sqrt(self.scale)
        for name in sorted(mean):
            if _PRODUCT not in name:
                raise PolicyError(f"flexlora: the global carries {name!r}, not a LoRA product; refusing it")
            u, s, vh = torch.linalg.svd(mean[name].double(), full_matrices=False)
            root = s[: self.rank].sqrt()
            adapter[name.replace(_PRODUCT, _B)] = (u[:, : self.rank] * root / root_scale).float().contiguous()
            adapter[name.replace(_PRODUCT, _A)] = (root[:, None] * vh[: self.rank] / root_scale).float().contiguous()
        return adapter
