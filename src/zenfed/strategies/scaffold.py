"""SCAFFOLD (Karimireddy et al., ICML 2020): control variates that correct each site's drift.

Each site keeps its own control variate c_i and the global one c. Every local
step adds ``c - c_i`` to the gradient (a loss term with that gradient). After K
local steps the site's new control variate is the mean of its own raw
gradients over those steps: under SGD that is exactly the paper's option II,
``c_i+ = c_i - c + (x - y_i) / (K lr)``, and unlike that formula it stays a
gradient under the sites' AdamW, whose steps are normalised.

The server only sums, so the change of control variate travels in the same
vector as the adapter, under encryption in the same packed ciphertexts: each
site sends ``K lr (c_i+ - c_i)``, a gradient times the round's step budget, which
fits the packing's clip, and every site adds the decrypted mean, divided by K lr, to
c. With every site in every round (as zenfed's rounds have it), that is the
paper's ``c += mean(c_i+ - c_i)``. The theory is for SGD; with AdamW the
correction is a heuristic. Under record-level DP the gradients averaged are the
clipped, noised ones (the term runs after the noise), so the control variates
are covered by the same epsilon (post-processing).
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
    """The loss term whose gradient is ``c - c_i`` on each trainable tensor; it also averages the raw gradients.

    The mean of the site's own gradients over the round is what option II's
    ``(x - y_i) / (K lr)`` stands for under SGD; with AdamW that difference is a mean
    normalised step (about 1 per coordinate), not a gradient, so the mean is taken here.
    """

    def __init__(self, correction: dict[str, torch.Tensor]) -> None:
        self.correction = correction
        self.gradient_sum: dict[str, torch.Tensor] = {}
        self.steps = 0

    def add_gradient(self, params: dict[str, torch.nn.Parameter]) -> None:
        self.steps += 1
        for name, param in params.items():
            term = self.correction.get(name)
            if term is None:
                continue
            raw = param.grad.detach().double().cpu() if param.grad is not None else torch.zeros_like(term)
            self.gradient_sum[name] = self.gradient_sum.get(name, torch.zeros_like(term)) + raw
            term = term.to(device=param.device, dtype=param.dtype)
            if param.grad is None:
                param.grad = term.clone()
            else:
                param.grad.add_(term)

    def mean_gradient(self, name: str) -> torch.Tensor | None:
        """The site's mean raw gradient of ``name`` over the round, if any step ran."""
        if not self.steps or name not in self.gradient_sum:
            return None
        return self.gradient_sum[name] / self.steps


class Scaffold(FedAvg):
    """FedAvg with control variates summed beside the adapter."""

    name: ClassVar[str] = "scaffold"
    global_at_sites: ClassVar[bool] = True  # the server's mean holds control variates: a site releases

    def __init__(self, spec: JobSpec) -> None:
        super().__init__(spec)
        self.global_control: dict[str, torch.Tensor] = {}  # c
        self.site_control: dict[str, torch.Tensor] = {}  # c_i
        self.steps = 0
        self._round_term: _Correction | None = None
        self._pending: dict[str, torch.Tensor] = {}  # c_i+ of the update sent, not yet in a returned sum

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
        """Add ``c - c_i`` to every gradient of the round (and average the raw gradients).

        Raises:
            PolicyError: If the adapter the site trains is not the job's shape (a rank cap).
        """
        if any(tuple(global_adapter[k].shape) != tuple(self.global_control[k].shape)
               for k in global_adapter if k in self.global_control):
            raise PolicyError("scaffold does not combine with a site's max_lora_rank yet: its control variates "
                              "have the job's rank; remove the cap or use another strategy at this site")
        self._round_term = _Correction({k: self.global_control[k] - self.site_control[k] for k in global_adapter
                                        if k in self.global_control})
        return self._round_term

    def update_to_send(self, *, global_adapter: AdapterState, local_adapter: AdapterState) -> AdapterState:
        """The trained adapter, and ``K lr (c_i+ - c_i)`` for each tensor; c_i becomes c_i+ with the next sum."""
        sent = super().update_to_send(global_adapter=global_adapter, local_adapter=local_adapter)
        changes = {}
        term = self._round_term
        for name in list(sent):
            mean_gradient = term.mean_gradient(name) if term is not None else None
            if mean_gradient is None:  # no step ran through the term: option II's SGD form
                mean_gradient = (global_adapter[name].double() - local_adapter[name].double()) / self._scale
            new_site = mean_gradient.reshape(self.site_control[name].shape)
            changes[CONTROL + name] = ((new_site - self.site_control[name]) * self._scale).to(torch.float32)
            self._pending[name] = new_site  # becomes c_i when the sum that holds its change comes back
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
        self.site_control.update(self._pending)
        self._pending = {}
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
