"""The engine protocol: what a site needs from a LoRA trainer, whatever does the training.

Adapters travel as ``AdapterState``: a dict of HF PEFT state-dict names
(``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``) to
contiguous float32 CPU tensors. Every engine speaks this format, so sites with
different engines aggregate together.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from zenfed.data.jsonl import Example
from zenfed.errors import ModelError
from zenfed.types import AdapterState, LossTerm, RecordDP

if TYPE_CHECKING:
    from zenfed.data.preference import PreferencePair
    from zenfed.engines.dpo import PreferenceEval


@dataclass(frozen=True)
class TrainResult:
    """What one round of local training produced."""

    adapter: AdapterState
    num_examples: int
    steps: int
    train_loss: float
    metrics: dict[str, float] = field(default_factory=dict)
    optimizer_state: Any = None  # The site's optimizer moments: kept at the site for its next round, never sent.


def site_optimizer(model: torch.nn.Module, *, learning_rate: float, state: Any = None) -> torch.optim.Optimizer:
    """Return AdamW over ``model``'s trainable parameters, resuming the site's ``state`` if given.

    The moments carry over between rounds (``TrainResult.optimizer_state``): restarting
    them each round makes every round open with full-size, sign-like steps.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    if state is not None:
        optimizer.load_state_dict(state)
    return optimizer


@dataclass(frozen=True)
class EvalResult:
    """Loss (mean over response tokens) and exact-match accuracy on a dataset."""

    loss: float
    accuracy: float
    num_examples: int



@runtime_checkable
class Engine(Protocol):
    """A LoRA trainer for one base model and one LoRA shape."""

    def initial_adapter(self) -> AdapterState:
        """Return the deterministic initial adapter (a function of the spec's seed only)."""
        ...

    def train(
        self, *, adapter: AdapterState, examples: Sequence[Example], steps: int, seed: int,
        dp: RecordDP | None = None, optimizer_state: Any = None, loss_term: LossTerm | None = None,
        frozen: Collection[str] = (),
    ) -> TrainResult:
        """Load ``adapter``, train ``steps`` optimizer steps on ``examples``, return the result.

        With ``dp`` set, training is DP-SGD (see ``RecordDP``). ``optimizer_state`` (from the
        previous round's result) continues the site's optimizer instead of restarting it.
        ``loss_term`` (the strategy's) adds its gradient before every optimizer step.
        ``frozen`` names adapter tensors that keep their values (FFA-LoRA's A).
        """
        ...

    def evaluate(
        self, *, adapter: AdapterState, examples: Sequence[Example], max_new_tokens: int
    ) -> EvalResult:
        """Return the loss and exact-match accuracy of ``adapter`` on ``examples``."""
        ...

    def generate(self, *, adapter: AdapterState, prompts: Sequence[Example], max_new_tokens: int) -> list[str]:
        """Return greedy completions of ``prompts`` under ``adapter``."""
        ...

    def train_preferences(
        self, *, adapter: AdapterState, reference: AdapterState, pairs: Sequence[PreferencePair], steps: int,
        seed: int, beta: float, dp: RecordDP | None = None, optimizer_state: Any = None,
        loss_term: LossTerm | None = None, frozen: Collection[str] = (),
    ) -> TrainResult:
        """Train ``steps`` DPO steps from ``adapter`` against the frozen ``reference`` adapter on ``pairs``.

        The arguments mean what they mean in ``train``; under ``dp`` the unit of privacy is a pair
        (see ``engines/dpo.py``).
        """
        ...

    def evaluate_preferences(
        self, *, adapter: AdapterState, pairs: Sequence[PreferencePair], beta: float
    ) -> PreferenceEval:
        """Return the preference accuracy and reward margin of ``adapter`` on held-out ``pairs``."""
        ...


@contextmanager
def frozen_tensors(params: dict[str, torch.nn.Parameter], names: Collection[str]) -> Iterator[None]:
    """Freeze the named LoRA parameters for one training call, and restore them after.

    Raises:
        ModelError: If a name is not a LoRA parameter of the model.
    """
    unknown = sorted(set(names) - set(params))
    if unknown:
        raise ModelError(f"cannot freeze {unknown[:2]}: not LoRA tensors of this model")
    previous = {name: params[name].requires_grad for name in names}
    try:
        for name in names:
            params[name].requires_grad_(False)
        yield
    finally:
        for name, flag in previous.items():
            params[name].requires_grad_(flag)


def before_step_hook(params: dict[str, torch.nn.Parameter], *, loss_term: LossTerm | None,
                     frozen: Collection[str]) -> Callable[[], None] | None:
    """Return what runs before every optimizer step: frozen tensors get no step, the loss term its gradient.

    A frozen tensor's gradient is cleared, so AdamW (weight decay 0) leaves it as it is even
    where a training loop made it trainable again.
    """
    if loss_term is None and not frozen:
        return None
    trainable = {name: param for name, param in params.items() if name not in set(frozen)}

    def run() -> None:
        for name in frozen:
            params[name].grad = None
        if loss_term is not None:
            loss_term.add_gradient(trainable)

    return run


def optimizer_step(optimizer: torch.optim.Optimizer, *, scaler: torch.amp.GradScaler | None,
                   before_step: Callable[[], None] | None) -> None:
    """Take one optimizer step, through float16's loss ``scaler`` where there is one.

    ``before_step`` (a strategy's term, frozen tensors) sees true gradients: they are unscaled
    first. On a step the scaler skips for overflow, nothing may read the gradient, so it does not run.
    """
    if scaler is not None:
        scaler.unscale_(optimizer)
    finite = scaler is None or all(bool(torch.isfinite(p.grad).all()) for group in optimizer.param_groups
                                   for p in group["params"] if p.grad is not None)
    if before_step is not None and finite:
        before_step()
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


def to_wire(state: dict[str, torch.Tensor]) -> AdapterState:
    """Return a detached, contiguous float32 CPU copy of ``state``, sorted by name."""
    return {k: state[k].detach().to(device="cpu", dtype=torch.float32).contiguous().clone() for k in sorted(state)}
