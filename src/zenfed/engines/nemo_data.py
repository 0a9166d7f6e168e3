"""Feeding NeMo the same batches the PEFT engine sees.

Both engines tokenise with ``zenfed.data.tokenize`` and draw batches with the
same seeded plan (``batch_plan``), so with the same seed they train on the same
examples in the same order. The one difference is the label layout:
transformers shifts labels inside the model, while NeMo's
``HFAutoModelForCausalLM.training_step`` compares position ``t``'s logits with
``labels[t]`` directly, so NeMo batches carry labels already shifted left.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
import torch

from zenfed.data.tokenize import IGNORE_INDEX, TokenizedExample, collate
from zenfed.errors import ModelError


def batch_plan(num_examples: int, *, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """Return the example indices of each step: seeded reshuffles, consumed in order.

    This is the PEFT engine's sampling: an epoch is a ``torch.randperm`` from a
    generator seeded with ``seed``; a new one is appended whenever fewer than
    ``batch_size`` indices remain.
    """
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    plan: list[list[int]] = []
    for _ in range(steps):
        if len(order) < batch_size:
            order.extend(torch.randperm(num_examples, generator=generator).tolist())
        plan.append(order[:batch_size])
        order = order[batch_size:]
    return plan


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Return labels moved one position left (next-token targets), padded with ignore."""
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:, :-1] = labels[:, 1:]
    return shifted


def nemo_batch(items: Sequence[TokenizedExample], *, pad_id: int) -> dict[str, torch.Tensor]:
    """Collate ``items`` like the PEFT engine, with next-token labels for NeMo."""
    batch = collate(items, pad_id=pad_id)
    batch["labels"] = shift_labels(batch["labels"])
    return batch


class _Batches(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    def __init__(self, batches: list[dict[str, torch.Tensor]]):
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        # training_step pops keys from the batch: hand out a fresh dict every time.
        return dict(self.batches[index])


class PlannedDataModule(pl.LightningDataModule):
    """A datamodule that yields a precomputed list of batches, one per optimizer step.

    Under data parallelism each rank takes every ``world_size``-th row of each
    batch, so the global batch (and the data seen) does not depend on the
    number of devices.
    """

    def __init__(
        self,
        *,
        data: Sequence[TokenizedExample],
        plan: Sequence[Sequence[int]],
        pad_id: int,
        seq_len: int,
    ):
        super().__init__()
        self.data = list(data)
        self.plan = [list(step) for step in plan]
        self.pad_id = pad_id
        # Read by NeMo's llm.api (validation and telemetry).
        self.seq_length = seq_len
        self.micro_batch_size = len(self.plan[0]) if self.plan else 1
        self.global_batch_size = self.micro_batch_size

    def _rank_and_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        return int(trainer.global_rank), int(trainer.world_size)

    def train_dataloader(self) -> torch.utils.data.DataLoader[dict[str, torch.Tensor]]:
        """Return the planned batches, this rank's rows only."""
        rank, world = self._rank_and_world()
        if world > self.micro_batch_size:
            raise ModelError(
                f"batch_size={self.micro_batch_size} is smaller than the {world} data-parallel "
                f"devices; raise training.batch_size or use fewer devices"
            )
        batches = [
            nemo_batch([self.data[i] for i in step[rank::world]], pad_id=self.pad_id)
            for step in self.plan
        ]
        return torch.utils.data.DataLoader(_Batches(batches), batch_size=None, shuffle=False)
