"""Record-level DP-SGD local training, shared by every engine.

Poisson batches at the true sampling rate, per-example clipping and Gaussian
noise (``zenfed.privacy.dp.DPSGD``), one accountant step per optimizer step.
An engine passes the ``torch.nn.Module`` whose trainable parameters are the
LoRA weights (the PEFT model, or the HF model NeMo wraps).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from zenfed.data.tokenize import TokenizedExample, collate
from zenfed.engines.hardware import Hardware
from zenfed.types import RecordDP

if TYPE_CHECKING:
    from zenfed.privacy.dp.sgd import UnitLoss

# Indices of a Poisson batch -> the model inputs and how their rows make privacy units.
DPBatchBuilder = Callable[[list[int]], tuple[dict[str, torch.Tensor], "UnitLoss"]]

# Examples per forward and backward pass of a DP step: the pass holds every layer's
# activations for all of them (as plain training's MICRO_BATCH does).
MAX_DP_MICRO_BATCH = 16


def collate_poisson(batch: Sequence[TokenizedExample], *, pad_id: int) -> dict[str, torch.Tensor]:
    """Collate a Poisson batch; an empty batch gives (0, 1) tensors (the step is still taken)."""
    if batch:
        return collate(batch, pad_id=pad_id)
    empty = torch.zeros((0, 1), dtype=torch.long)
    return {"input_ids": empty, "attention_mask": empty.clone(), "labels": empty.clone()}


@contextmanager
def without_checkpointing(model: Any) -> Iterator[None]:
    """Turn a Hugging Face model's gradient checkpointing off for the block, and back on after.

    DP-SGD's per-example gradients need each layer's activations from one forward pass;
    checkpointing recomputes them in the backward pass, which the per-sample hooks cannot follow.
    """
    active = bool(getattr(model, "is_gradient_checkpointing", False))
    if active:
        model.gradient_checkpointing_disable()
    try:
        yield
    finally:
        if active:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def train_dp(
    model: Any, *, data: Sequence[Any], optimizer: torch.optim.Optimizer, steps: int,
    dp: RecordDP, pad_id: int, chunk_size: int, before_step: Callable[[], None] | None = None,
    hardware: Hardware | None = None, batch_for: DPBatchBuilder | None = None,
) -> tuple[float, dict[str, float]]:
    """Run ``steps`` DP-SGD steps; return the mean pre-noise loss and DP statistics.

    Every step, even one whose Poisson batch is empty (its update is pure noise),
    calls ``privatize_grads`` (which steps ``dp.accountant``) and the optimizer, so
    the accounting matches exactly what was done. The statistics are computed
    before noise: they are not private, and stay at the site. ``before_step`` runs
    after the gradient is privatized and before each optimizer step. Batches go to
    ``hardware``'s device and forward passes run in its precision; gradient checkpointing
    is off for the steps (``without_checkpointing``).

    ``data`` holds the privacy units (tokenized records by default). ``batch_for`` turns the
    indices of a Poisson batch into model inputs and the :class:`UnitLoss` that makes unit losses
    of their rows (a preference pair is two rows); by default each unit is one supervised row.
    """
    from zenfed.privacy.dp import DPSGD, PoissonSampler
    from zenfed.privacy.dp.sgd import SEQUENCE_UNITS

    hardware = hardware or Hardware()
    hardware.check_dp()

    private = DPSGD(
        model, clip_norm=dp.clip_norm, noise_multiplier=dp.noise_multiplier, sample_rate=dp.sample_rate,
        num_records=len(data), accountant=dp.accountant, chunk_size=max(1, min(chunk_size, MAX_DP_MICRO_BATCH)),
        forward_context=hardware.autocast,
    )
    sampler = PoissonSampler(num_records=len(data), sample_rate=dp.sample_rate, num_steps=steps)
    losses: list[float] = []
    sizes: list[int] = []
    clipped: list[float] = []
    model.train()
    try:
        with without_checkpointing(model):
            for indices in sampler:
                if batch_for is None:
                    inputs, units = collate_poisson([data[i] for i in indices], pad_id=pad_id), SEQUENCE_UNITS
                else:
                    inputs, units = batch_for(indices)
                stats = private.privatize_grads(**hardware.to(inputs), units=units)
                if before_step is not None:
                    before_step()  # after the noise: a data-free term is post-processing of a private gradient
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                sizes.append(stats.batch_size)
                if stats.mean_loss is not None:
                    losses.append(stats.mean_loss)
                if stats.clipped_fraction is not None:
                    clipped.append(stats.clipped_fraction)
    finally:
        model.eval()
    metrics = {
        "dp_steps": float(steps),
        "dp_mean_batch_size": sum(sizes) / len(sizes) if sizes else 0.0,
        "dp_clipped_fraction": sum(clipped) / len(clipped) if clipped else 0.0,
    }
    if losses:
        metrics["train_loss_last"] = losses[-1]
    return (sum(losses) / len(losses) if losses else math.nan), metrics
