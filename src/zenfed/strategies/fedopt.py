"""FedOpt (Reddi et al., ICLR 2021): a server optimizer on the mean update, run identically at every site.

The sites' mean adapter minus the global they trained from is a pseudo-gradient
``delta``; FedAvgM, FedAdam and FedYogi step the global with momentum or
adaptive moments of it. Under encryption no server can take that step: it
cannot read the mean. So every site decrypts the same sum and takes the same
deterministic step (float64, on the CPU) from the same state, and keeps that
state (the global and the moments) for the next round. The server only sums,
in the clear as under encryption, so both modes give the same adapter; the
final adapter is released by a site. Each site records the SHA-256 of its
state every round (``strategy_state``): sites that drifted apart show different
hashes for the same round in the audit logs.

FedAvgM: ``m = beta * m + delta``; ``x += lr * m``.
FedAdam: ``m = b1 m + (1 - b1) delta``; ``v = b2 v + (1 - b2) delta^2``; ``x += lr * m / (sqrt(v) + tau)``.
FedYogi: as FedAdam, with ``v -= (1 - b2) delta^2 sign(v - delta^2)``.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from zenfed.errors import PolicyError
from zenfed.spec import JobSpec
from zenfed.strategies.fedavg import FedAvg
from zenfed.types import AdapterState

_STEP_KEY = "__steps__"  # how many sums the state has absorbed, kept beside the tensors


class FedOpt(FedAvg):
    """Base of the server optimizers: the state, the round bookkeeping and the step, at the sites."""

    name: ClassVar[str] = "fedopt"
    global_at_sites: ClassVar[bool] = True
    # Adaptive steps are about eta per coordinate, and LoRA tensors are small: Adam wants a small eta.
    default_learning_rate: ClassVar[float] = 1e-2

    def __init__(self, spec: JobSpec) -> None:
        super().__init__(spec)
        self.global_: dict[str, torch.Tensor] | None = None  # x_t, float64
        self.moments: dict[str, dict[str, torch.Tensor]] = {}
        self.steps = 0

    def begin(self, initial_adapter: AdapterState) -> None:
        """Round 1 starts from the shared initial adapter: it is x_1 (unless a restarted site resumed)."""
        if self.global_ is None:
            self.global_ = {k: v.double().clone() for k, v in initial_adapter.items()}

    def after_decrypt(self, mean: AdapterState, *, global_round: int) -> AdapterState:
        """Step the global with the mean's pseudo-gradient, once per aggregated round.

        Raises:
            PolicyError: If this site missed a round (its state is of another round than the sum).
        """
        if self.global_ is None:
            raise PolicyError(f"{self.name}: this site holds no global to step from (it has not taken the "
                              "job's initial adapter); the site session calls begin() first")
        if global_round == self.steps:  # the same sum again (final evaluation, then release)
            return self._global_f32()
        if global_round != self.steps + 1:
            raise PolicyError(f"{self.name}: the sum is of round {global_round} but this site's state is of "
                              f"round {self.steps}; a site that missed a round cannot follow the optimizer")
        if not set(mean) <= set(self.global_):
            raise PolicyError(f"{self.name}: the mean adapter holds tensors the global does not")
        for name, value in mean.items():
            delta = value.double() - self.global_[name]
            self.global_[name] = self.global_[name] + self._step(name, delta)
        self.steps = global_round
        return self._global_f32()

    def _step(self, name: str, delta: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def learning_rate(self) -> float:
        """The server learning rate: the job's, else this optimizer's default."""
        rate = self.spec.federation.server_optimizer.learning_rate
        return self.default_learning_rate if rate is None else rate

    def _moment(self, kind: str, name: str, like: torch.Tensor) -> torch.Tensor:
        return self.moments.setdefault(kind, {}).setdefault(name, torch.zeros_like(like))

    def _global_f32(self) -> AdapterState:
        if self.global_ is None:
            raise PolicyError(f"{self.name}: no global yet")
        return {k: v.to(torch.float32).contiguous() for k, v in sorted(self.global_.items())}

    def state_dict(self) -> AdapterState | None:
        """The global, the moments and the step count: what the next round's step needs."""
        if self.global_ is None:
            return None
        state = {f"global.{k}": v.clone() for k, v in self.global_.items()}
        for kind, tensors in self.moments.items():
            state.update({f"{kind}.{k}": v.clone() for k, v in tensors.items()})
        state[_STEP_KEY] = torch.tensor([self.steps], dtype=torch.float64)
        return state

    def load_state_dict(self, state: AdapterState) -> None:
        """Resume a restarted site."""
        self.steps = int(state[_STEP_KEY].item())
        self.global_, self.moments = {}, {}
        for key, value in state.items():
            if key == _STEP_KEY:
                continue
            kind, name = key.split(".", 1)
            if kind == "global":
                self.global_[name] = value.double().clone()
            else:
                self.moments.setdefault(kind, {})[name] = value.double().clone()


class FedAvgM(FedOpt):
    """Server momentum: ``m = beta * m + delta``, ``x += lr * m``."""

    name: ClassVar[str] = "fedavgm"
    default_learning_rate: ClassVar[float] = 1.0  # with momentum 0, FedAvg itself

    def _step(self, name: str, delta: torch.Tensor) -> torch.Tensor:
        opt = self.spec.federation.server_optimizer
        momentum = self._moment("m", name, delta)
        momentum.mul_(opt.momentum).add_(delta)
        return self.learning_rate * momentum


class FedAdam(FedOpt):
    """Adam on the server: first and second moments of the pseudo-gradient."""

    name: ClassVar[str] = "fedadam"

    def _step(self, name: str, delta: torch.Tensor) -> torch.Tensor:
        opt = self.spec.federation.server_optimizer
        first = self._moment("m", name, delta)
        second = self._moment("v", name, delta)
        first.mul_(opt.beta1).add_(delta, alpha=1 - opt.beta1)
        self._second_moment(second, delta)
        return self.learning_rate * first / (second.sqrt() + opt.tau)

    def _second_moment(self, second: torch.Tensor, delta: torch.Tensor) -> None:
        beta2 = self.spec.federation.server_optimizer.beta2
        second.mul_(beta2).add_(delta.pow(2), alpha=1 - beta2)


class FedYogi(FedAdam):
    """Yogi's second moment: it grows or shrinks by (1 - b2) delta^2, by the sign of v - delta^2."""

    name: ClassVar[str] = "fedyogi"

    def _second_moment(self, second: torch.Tensor, delta: torch.Tensor) -> None:
        beta2 = self.spec.federation.server_optimizer.beta2
        squared = delta.pow(2)
        second.sub_((1 - beta2) * squared * torch.sign(second - squared))
