"""Heterogeneous ranks: a site whose policy caps its LoRA rank trains the leading r_k of the job's r_max ranks.

The site's engine holds a rank-r_k adapter with alpha scaled to ``alpha * r_k / r_max``, so
its scaling ``alpha'/r_k`` equals the job's ``alpha/r_max``: the leading ranks mean the
same at every site (scaling by ``alpha/r_k`` would inflate a capped site's update by
``r_max/r_k``). Everything outside the engine stays at r_max: the initial adapter is the
job's rank-r_max initialisation, the global is cut to r_k for training and evaluation, and
the trained ranks are put back into the r_max global. The ranks a site did not train keep
the global's values, so its update there is exactly zero.

What the sum means: with FFA-LoRA (A shared and frozen) every site's update is linear in
B, and the weighted mean of the padded B matrices is exactly the mean of the sites'
updates. With A trainable the mean of A and the mean of B are each exact, but their
product is not the mean of the products (as in plain FedAvg of LoRA); a rank that only
some sites train is averaged with the unchanged global at the others, so it does not
shrink towards zero round after round, which zero padding would do.
"""

from __future__ import annotations

from zenfed.engines.lora_init import deterministic_init
from zenfed.errors import PolicyError
from zenfed.spec import JobSpec
from zenfed.types import AdapterState

_A, _B = ".lora_A.", ".lora_B."


class RankCap:
    """Moves adapters between a site's rank r_k and the job's rank r_max.

    Args:
        rank: The site's rank r_k.
        max_rank: The job's rank r_max.
    """

    def __init__(self, *, rank: int, max_rank: int) -> None:
        if not 1 <= rank < max_rank:
            raise PolicyError(f"a rank cap must be below the job's rank {max_rank}; got {rank}")
        self.rank = rank
        self.max_rank = max_rank

    @classmethod
    def for_site(cls, spec: JobSpec, max_lora_rank: int | None) -> RankCap | None:
        """The cap a site's policy sets for a job, or None where the site trains the job's full rank."""
        if max_lora_rank is None or max_lora_rank >= spec.lora.rank:
            return None
        return cls(rank=max_lora_rank, max_rank=spec.lora.rank)

    def engine_spec(self, spec: JobSpec) -> JobSpec:
        """The job spec the site's engine is built from: rank r_k, alpha scaled to keep alpha/r_max."""
        lora = spec.lora.model_copy(update={"rank": self.rank, "alpha": spec.lora.alpha * self.rank / self.max_rank})
        return spec.model_copy(update={"lora": lora})

    def full_initial(self, site_initial: AdapterState, *, seed: int) -> AdapterState:
        """The job's rank-r_max initial adapter, which every site, capped or not, builds the same."""
        template = {name: tensor.new_zeros(self._full_shape(name, tuple(tensor.shape)))
                    for name, tensor in site_initial.items()}
        return deterministic_init(template, seed=seed)

    def cut(self, adapter: AdapterState) -> AdapterState:
        """The leading r_k ranks of an r_max adapter: A's first rows, B's first columns."""
        out = {}
        for name, tensor in adapter.items():
            if _A in name:
                out[name] = tensor[: self.rank].contiguous()
            elif _B in name:
                out[name] = tensor[:, : self.rank].contiguous()
            else:
                raise PolicyError(f"{name!r} is not a LoRA A or B tensor; cannot cut it to rank {self.rank}")
        return out

    def embed(self, trained: AdapterState, *, into: AdapterState) -> AdapterState:
        """Put the trained leading ranks back into a copy of the r_max adapter ``into``."""
        out = {name: tensor.clone() for name, tensor in into.items()}
        for name, tensor in trained.items():
            if _A in name:
                out[name][: self.rank] = tensor
            else:
                out[name][:, : self.rank] = tensor
        return out

    def _full_shape(self, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        if _A in name and shape[0] == self.rank:
            return (self.max_rank, *shape[1:])
        if _B in name and shape[-1] == self.rank:
            return (*shape[:-1], self.max_rank)
        raise PolicyError(f"{name!r} has shape {shape}, not a rank-{self.rank} LoRA tensor")
