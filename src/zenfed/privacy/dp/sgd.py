"""Record-level DP-SGD on the trainable (LoRA) parameters of a causal language model.

Per-example gradients come from Opacus' per-sample-gradient hooks on the
trainable (LoRA) layers, in one batched forward and backward pass, so a PEFT
model's frozen base weights cost nothing extra. Each example's gradient is
clipped to L2 norm C, the clipped gradients are summed, Gaussian noise of std
sigma*C is added, and the result is divided by the expected batch size q*n. The
result is written to ``.grad``, so any optimizer can step.

The privacy unit is one training record: one sequence, or, with a
:class:`UnitLoss`, a fixed number of rows that make one record together (DPO's
preference pair: the chosen and the rejected answer). Batches must be drawn
with :class:`PoissonSampler` at the same rate the accountant is told.
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from zenfed.privacy.dp.accountant import PrivacyAccountant, _check_rate, _positive
from zenfed.privacy.dp.errors import PrivacyError

IGNORE_INDEX = -100
# Scaling by C / (norm * (1 + _CLIP_SLACK)) keeps every clipped norm <= C despite rounding.
_CLIP_SLACK = 1e-6


def secure_generator(device: str | torch.device = "cpu") -> torch.Generator:
    """Return a torch generator seeded from the operating system's random source."""
    generator = torch.Generator(device=device)
    generator.manual_seed(int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1))
    return generator


class PoissonSampler:
    """Batch sampler: each step takes every record independently with probability q.

    Batch sizes vary (and may be 0); that is what the accountant assumes. It
    works as a ``torch.utils.data.DataLoader(batch_sampler=...)``, but an empty
    batch must still be a step: call :meth:`DPSGD.privatize_grads` and the
    optimizer on it (the update is then pure noise).

    Args:
        num_records: records in the site's training set.
        sample_rate: q, the probability of each record being in a batch.
        num_steps: batches to yield per iteration.
        generator: source of randomness; default a securely seeded one.

    """

    def __init__(
        self,
        *,
        num_records: int,
        sample_rate: float,
        num_steps: int,
        generator: torch.Generator | None = None,
    ) -> None:
        if num_records < 1 or num_steps < 0:
            raise PrivacyError(
                f"num_records must be >= 1 and num_steps >= 0, got {num_records}, {num_steps}"
            )
        self.num_records = num_records
        self.sample_rate = _check_rate(sample_rate)
        self.num_steps = num_steps
        self.generator = generator if generator is not None else secure_generator()

    def __len__(self) -> int:
        return self.num_steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.num_steps):
            draws = torch.rand(self.num_records, generator=self.generator)
            yield torch.nonzero(draws < self.sample_rate).flatten().tolist()


@dataclass(frozen=True)
class UnitLoss:
    """How the rows of a batch make the losses of its privacy units.

    Unit ``i`` is rows ``i * rows_per_unit`` to ``(i + 1) * rows_per_unit - 1``; its gradient
    (the sum of its rows' per-row gradients) is what is clipped. ``loss`` takes each row's summed
    label-token log-probability and label-token count, both ``(units, rows_per_unit)``, and the
    index of the first unit in the batch, and returns each unit's loss ``(units,)``.
    """

    rows_per_unit: int
    loss: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


def mean_token_loss(logp_sums: torch.Tensor, counts: torch.Tensor, first_unit: int) -> torch.Tensor:
    """The supervised loss of one-row units: mean next-token cross-entropy over the label tokens."""
    del first_unit  # the loss needs nothing beyond the rows themselves
    return (-logp_sums / counts.clamp(min=1)).sum(dim=1)


SEQUENCE_UNITS = UnitLoss(rows_per_unit=1, loss=mean_token_loss)


@dataclass(frozen=True)
class DPStepStats:
    """What one DP-SGD step did, computed before noise: not DP, so keep it at the site."""

    batch_size: int
    mean_loss: float | None
    mean_grad_norm: float | None
    clipped_fraction: float | None


def label_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return, per row, the positions whose next token is a label, and those labels.

    Both are ``(B, K)`` with K the most labels in any row; shorter rows are filled with
    position 0 and target ``IGNORE_INDEX``, so they add nothing to the loss.
    """
    shifted = labels[:, 1:]
    has_label = shifted != IGNORE_INDEX
    width = max(1, int(has_label.sum(dim=1).max())) if labels.shape[0] else 1
    positions = torch.zeros((labels.shape[0], width), dtype=torch.long, device=labels.device)
    targets = torch.full_like(positions, IGNORE_INDEX)
    for row in range(labels.shape[0]):
        found = torch.nonzero(has_label[row]).flatten()
        positions[row, : found.numel()] = found
        targets[row, : found.numel()] = shifted[row, found]
    return positions, targets


def label_logps(
    model: torch.nn.Module, *, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
    keeps_logits: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return each row's summed next-token log-probability over its label tokens, and their count.

    Only the logits at positions some row has a label after are computed (``keeps_logits``: the
    model takes ``logits_to_keep``): the output layer over the whole vocabulary at every prompt
    token was ~40% of a step, for no loss.
    """
    positions, targets = label_positions(labels)
    kept = positions[targets != IGNORE_INDEX].unique()
    if kept.numel() == 0:
        kept = torch.zeros(1, dtype=torch.long, device=labels.device)
    kwargs: dict[str, object] = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    if keeps_logits:
        kwargs["logits_to_keep"] = kept
    out = model(**kwargs)
    logits = out if isinstance(out, torch.Tensor) else out.logits
    if not keeps_logits:
        logits = logits[:, kept]
    # Column of each (row, label) position among the kept ones; filler entries are ignored.
    columns = torch.searchsorted(kept, positions).clamp(max=kept.numel() - 1)
    chosen = logits.gather(1, columns[..., None].expand(-1, -1, logits.shape[-1]))
    token_loss = torch.nn.functional.cross_entropy(
        chosen.float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
    )
    return -token_loss.sum(dim=1), (targets != IGNORE_INDEX).sum(dim=1)


def accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether the (possibly PEFT-wrapped) Hugging Face model can compute only some logits."""
    get_base = getattr(model, "get_base_model", None)
    base = get_base() if callable(get_base) else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def _take_grad_sample(name: str, param: torch.Tensor) -> torch.Tensor:
    """Return and clear a parameter's per-example gradient from the last backward pass."""
    sample = getattr(param, "grad_sample", None)
    if not isinstance(sample, torch.Tensor):
        raise PrivacyError(
            f"no per-example gradient for trainable parameter {name}: its layer has state that "
            "mixes examples (e.g. a buffer); train LoRA on linear layers only"
        )
    param.grad_sample = None  # type: ignore[attr-defined]
    param.grad = None
    return sample.detach()


@contextmanager
def per_sample_hooks(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Attach Opacus' per-sample-gradient hooks to ``model`` for the block; yield the hooked module.

    After each backward pass inside the block, every trainable parameter carries a
    ``grad_sample`` of shape (batch, *shape). The hooks and every attribute Opacus adds are
    removed on exit, so a plain forward or backward afterwards costs nothing extra.
    """
    from opacus.grad_sample import GradSampleModule

    # strict=False: modules Opacus has no rule for get per-sample gradients from torch.func.
    hooked = GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=False)
    try:
        yield hooked
    finally:
        hooked.cleanup()


class DPSGD:
    """Per-example clipping and Gaussian noise for the trainable parameters of a model.

    Args:
        model: a causal LM (e.g. a PEFT-wrapped Hugging Face model, or the HF module
            a NeMo model wraps) taking ``input_ids`` and ``attention_mask`` and
            returning logits (or an object with ``.logits``).
        clip_norm: C, the L2 bound on each example's gradient.
        noise_multiplier: sigma; the noise std is sigma * C.
        sample_rate: q, the Poisson rate the batches are drawn with.
        num_records: n, the site's training records; the sum is divided by q * n.
        accountant: if given, one step is composed on every call.
        generator: noise source; default a securely seeded one.
        chunk_size: examples per forward and backward pass (bounds memory); None for all at once.
        forward_context: wraps each forward pass (a device's autocast); the backward pass and the
            per-example gradients, norms and clipping stay outside it.

    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        clip_norm: float,
        noise_multiplier: float,
        sample_rate: float,
        num_records: int,
        accountant: PrivacyAccountant | None = None,
        generator: torch.Generator | None = None,
        chunk_size: int | None = None,
        forward_context: Callable[[], AbstractContextManager[Any]] = nullcontext,
    ) -> None:
        self.model = model
        self.forward_context = forward_context
        self.clip_norm = _positive("clip_norm", clip_norm)
        if noise_multiplier < 0:
            raise PrivacyError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
        if noise_multiplier == 0 and accountant is not None:
            raise PrivacyError("noise_multiplier 0 gives no privacy; do not pass an accountant")
        self.noise_multiplier = float(noise_multiplier)
        self.sample_rate = _check_rate(sample_rate)
        if num_records < 1:
            raise PrivacyError(f"num_records must be at least 1, got {num_records}")
        self.expected_batch_size = self.sample_rate * num_records
        self.accountant = accountant
        self.generator = generator if generator is not None else secure_generator()
        self.chunk_size = chunk_size
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self._keeps_logits = accepts_logits_to_keep(model)
        if not self.params:
            raise PrivacyError("the model has no trainable parameters; add LoRA adapters first")

    def _row_logps(
        self, hooked: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return each row's summed label-token log-probability and label-token count, both ``(B,)``."""
        return label_logps(hooked, input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                           keeps_logits=self._keeps_logits)

    def per_example_grads(
        self, *, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
        units: UnitLoss = SEQUENCE_UNITS,
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Return per-unit gradients ``{name: (U, *shape)}`` and per-unit losses ``(U,)``.

        One batched forward and backward per micro-batch of ``chunk_size`` units, with Opacus'
        hooks turning each trainable layer's activations and output gradients into per-row
        gradients; a unit's gradient is the sum of its rows'. Rows do not interact in a causal
        LM (each has its own attention mask), so the gradient of the summed unit losses splits
        exactly.
        """
        per_unit = units.rows_per_unit
        count = int(input_ids.shape[0]) // per_unit
        if count == 0:
            return {n: p.new_zeros((0, *p.shape)) for n, p in self.params.items()}, torch.zeros(0)
        step = self.chunk_size or count
        parts: dict[str, list[torch.Tensor]] = {name: [] for name in self.params}
        losses: list[torch.Tensor] = []
        # The backward pass also sums into .grad; the caller's .grad is put back afterwards.
        saved = {name: param.grad for name, param in self.params.items()}
        for param in self.params.values():
            param.grad = None  # else backward would add into the saved tensor in place
        try:
            with per_sample_hooks(self.model) as hooked, warnings.catch_warnings():
                # The frozen layers below the first adapter need no input gradient; torch warns.
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                for first in range(0, count, step):
                    taken = min(step, count - first)
                    rows = slice(first * per_unit, (first + taken) * per_unit)
                    with self.forward_context():
                        logps, tokens = self._row_logps(hooked, input_ids[rows], attention_mask[rows], labels[rows])
                    unit_losses = units.loss(logps.view(taken, per_unit), tokens.view(taken, per_unit), first)
                    unit_losses.sum().backward()
                    losses.append(unit_losses.detach())
                    for name, param in self.params.items():
                        sample = _take_grad_sample(name, param)
                        parts[name].append(sample.view(taken, per_unit, *sample.shape[1:]).sum(dim=1))
        finally:
            for name, param in self.params.items():
                param.grad = saved[name]
        return {name: torch.cat(chunks) for name, chunks in parts.items()}, torch.cat(losses)

    def privatize_grads(
        self, *, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
        units: UnitLoss = SEQUENCE_UNITS,
    ) -> DPStepStats:
        """Write clipped, summed, noised, normalised gradients to each trainable ``.grad``.

        Args:
            input_ids: (B, T) token ids of a Poisson-sampled batch; B may be 0.
            attention_mask: (B, T), 1 for real tokens.
            labels: (B, T), -100 for tokens without loss.
            units: how rows make privacy units (default: one row each); each unit's gradient is clipped.

        Returns:
            Statistics of the batch before noise.

        """
        if not (input_ids.shape == attention_mask.shape == labels.shape) or input_ids.dim() != 2:
            raise PrivacyError(
                "input_ids, attention_mask and labels must all have the same (batch, tokens) "
                f"shape, got {tuple(input_ids.shape)}, {tuple(attention_mask.shape)}, "
                f"{tuple(labels.shape)}"
            )
        if input_ids.shape[0] % units.rows_per_unit:
            raise PrivacyError(f"a batch of {input_ids.shape[0]} rows does not split into units of "
                               f"{units.rows_per_unit} rows; build the batch unit by unit")
        batch = int(input_ids.shape[0]) // units.rows_per_unit
        sums = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in self.params.items()}
        stats = DPStepStats(0, None, None, None)
        if batch > 0:
            grads, losses = self.per_example_grads(
                input_ids=input_ids, attention_mask=attention_mask, labels=labels, units=units
            )
            flat = torch.cat([g.reshape(batch, -1).double() for g in grads.values()], dim=1)
            norms = flat.norm(dim=1)
            factors = (self.clip_norm / (norms * (1 + _CLIP_SLACK))).clamp(max=1.0)
            for name, g in grads.items():
                scale = factors.to(torch.float32).view(-1, *([1] * (g.dim() - 1)))
                sums[name] = (g.float() * scale).sum(dim=0)
            stats = DPStepStats(
                batch_size=batch,
                mean_loss=float(losses.mean()),
                mean_grad_norm=float(norms.mean()),
                clipped_fraction=float((norms > self.clip_norm).double().mean()),
            )
        std = self.noise_multiplier * self.clip_norm
        for name, param in self.params.items():
            noisy = sums[name]
            if std > 0:
                noise = torch.normal(
                    0.0,
                    std,
                    size=noisy.shape,
                    generator=self.generator,
                    device=self.generator.device,
                )
                noisy = noisy + noise.to(noisy.device)
            param.grad = (noisy / self.expected_batch_size).to(param.dtype)
        if self.accountant is not None:
            self.accountant.step(
                noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate
            )
        return stats
