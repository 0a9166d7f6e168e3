"""Federated algorithms, one class per file behind :class:`~zenfed.strategies.base.Strategy`.

A job names its algorithm in ``federation.strategy``; :data:`STRATEGIES` maps
that name to its class, so adding an algorithm is one file and one line here.
"""

from __future__ import annotations

from zenfed.errors import SpecError
from zenfed.spec import JobSpec
from zenfed.strategies.base import LossTerm, Strategy
from zenfed.strategies.fedavg import FedAvg
from zenfed.strategies.fedopt import FedAdam, FedAvgM, FedYogi
from zenfed.strategies.fedprox import FedProx
from zenfed.strategies.ffa_lora import FFALoRA
from zenfed.strategies.flexlora import FlexLoRA
from zenfed.strategies.scaffold import Scaffold

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (FedAvg, FedProx, FedAvgM, FedAdam, FedYogi, FFALoRA, Scaffold, FlexLoRA)
}


def make_strategy(spec: JobSpec) -> Strategy:
    """Return the strategy the job spec names.

    Raises:
        SpecError: If the name is not a known strategy.
    """
    name = spec.federation.strategy
    if name not in STRATEGIES:
        raise SpecError(f"federation.strategy {name!r} is unknown; use one of {sorted(STRATEGIES)}")
    return STRATEGIES[name](spec)


__all__ = [
    "STRATEGIES", "FFALoRA", "FedAdam", "FlexLoRA", "FedAvg", "FedAvgM", "FedProx", "FedYogi", "LossTerm", "Strategy",
    "Scaffold", "make_strategy",
]
