"""SCAFFOLD (Karimireddy et al., ICML 2020): control variates that correct each site's drift.

Each site keeps its own control variate c_i and the global one c. Every local
step adds ``c - c_i`` to the gradient (a loss term with that gradient). After K
local steps at learning rate lr from the global x to y_i, the site's new
control variate is ``c_i+ = c_i - c + (x - y_i) / (K lr)`` (the paper's option II).

The server only sums, so the change of control variate travels in the same
vector as the adapter, under encryption in the same packed ciphertexts: each
site sends ``K lr (c_i+ - c_i)``, which has the scale of ``x - y_i`` and so fits
the packing's clip, and every site adds the decrypted mean, divided by K lr, to
c. With every site in every round (as zenfed's rounds have it), that is the
paper's ``c += mean(c_i+ - c_i)``. The theory is for SGD; with the sites'
AdamW the correction is the same term, a heuristic there. Under record-level DP
the control variates are functions of the DP-trained adapters and of c, so
they are covered by the same epsilon (post-processing).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from zenfed.errors import PolicyError
from zenfed.spec import JobSpec
from zenfed.strategies.fedavg import FedAvg
from zenfed.types import AdapterState, LossTerm

CONTROL = "scaffold_control."  # prefix of the control-variate tensors in the sent vector
_STEP_KEY = "__steps__"


class _Correction:
    """The loss term whose gradient is ``c - c_i`` on each trainable tensor."""

    def __init__(self, correction: dict[str, torch.Tensor]) -> None:
        self.correction = correction

    def add_gradient(self, params: dict[str, torch.nn.Parameter]) -> None:
        for name, param in params.items():
            term = self.correction.get(name)
            if term is None:
                continue
            term = term.to(device=param.device, dtype=param.dtype)
            if param.grad is None:
                param.grad = term.clone()
            else:
                param.grad.add_(term)


class Scaffold(FedAvg):
    """FedAvg with control variates summed beside the adapter."""

    name: ClassVar[str] = "scaffold"
    global_at_sites: ClassVar[bool] = True  # the server's mean holds control variates: a site releases

    def __init__(self, spec: JobSpec) -> None:
        super().__init__(spec)
        self.global_control: dict[str, torch.Tensor] = {}  # c
        self.site_control: dict[str, torch.Tensor] = {}  # c_i
        self.steps = 0

    @property
    def _scale(self) -> float:
        """K * lr: the local steps times the local learning rate."""
        return self.spec.training.local_steps * self.spec.training.learning_rate

    def begin(self, initial_adapter: AdapterState) -> None:
        """Both control variates start at zero (unless a restarted site resumed them)."""
        if not self.global_control:
            zeros = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in initial_adapter.items()}
            self.global_control = {k: v.clone() for k, v in zeros.items()}
            self.site_control = {k: v.clone() for k, v in zeros.items()}

    def wire_template(self, initial_adapter: AdapterState) -> AdapterState:
        """The adapter's tensors and, beside them, one control-variate change per tensor."""
        template = super().wire_template(initial_adapter)
        return {**template, **{CONTROL + k: torch.zeros_like(v) for k, v in template.items()}}

    def loss_term(self, *, global_adapter: AdapterState) -> LossTerm | None:
        """Add ``c - c_i`` to every gradient of the round."""
        return _Correction({k: self.global_control[k] - self.site_control[k] for k in global_adapter
                            if k in self.global_control})

    def update_to_send(self, *, global_adapter: AdapterState, local_adapter: AdapterState) -> AdapterState:
        """The trained adapter, and ``K lr (c_i+ - c_i)`` for each tensor; c_i becomes c_i+."""
        sent = super().update_to_send(global_adapter=global_adapter, local_adapter=local_adapter)
        changes = {}
        for name in list(sent):
            drift = global_adapter[name].double() - local_adapter[name].double()  # x - y_i
            new_site = self.site_control[name] - self.global_control[name] + drift / self._scale
            changes[CONTROL + name] = ((new_site - self.site_control[name]) * self._scale).to(torch.float32)
            self.site_control[name] = new_site
        return {**sent, **changes}

    def after_decrypt(self, mean: AdapterState, *, global_round: int) -> AdapterState:
        """Take the mean adapter; add the mean control change to c, once per aggregated round.

        Raises:
            PolicyError: If this site missed a round (its c would be of another round).
        """
        adapter = {k: v for k, v in mean.items() if not k.startswith(CONTROL)}
        if global_round == self.steps:
            return adapter
        if global_round != self.steps + 1:
            raise PolicyError(f"scaffold: the sum is of round {global_round} but this site's control variates "
                              f"are of round {self.steps}; a site that missed a round cannot follow SCAFFOLD")
        for key, value in mean.items():
            if key.startswith(CONTROL):
                name = key[len(CONTROL):]
                self.global_control[name] = self.global_control[name] + value.double() / self._scale
        self.steps = global_round
        return adapter

    def state_dict(self) -> AdapterState | None:
        """c, c_i and the round they are of."""
        if not self.global_control:
            return None
        state = {f"c.{k}": v.clone() for k, v in self.global_control.items()}
        state.update({f"ci.{k}": v.clone() for k, v in self.site_control.items()})
        state[_STEP_KEY] = torch.tensor([self.steps], dtype=torch.float64)
        return state

    def load_state_dict(self, state: AdapterState) -> None:
        """Resume a restarted site."""
        self.steps = int(state[_STEP_KEY].item())
        self.global_control = {k[2:]: v.double().clone() for k, v in state.items() if k.startswith("c.")}
        self.site_control = {k[3:]: v.double().clone() for k, v in state.items() if k.startswith("ci.")}
