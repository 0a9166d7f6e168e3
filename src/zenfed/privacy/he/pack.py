"""Flatten an update into one vector, and pack quantised values several to a real.

A packed real holds ``fields_per_slot`` signed integers, ``field_bits`` apart;
each field but the top one has headroom for ``max_sites`` summands, so a sum of
packed reals unpacks into the sums of the fields (see ``he_params.slot_layout``).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from zenfed.digest import canonical_json
from zenfed.privacy.he.errors import HEError
from zenfed.privacy.he.params import PackingConfig, SlotLayout


@dataclass(frozen=True)
class UpdateLayout:
    """Names and shapes of an update, in packing order."""

    entries: tuple[tuple[str, tuple[int, ...]], ...]

    @classmethod
    def from_update(
        cls, update: Mapping[str, torch.Tensor], *, order: Sequence[str] | None = None
    ) -> UpdateLayout:
        """Layout of ``update`` in ``order`` (default: sorted names)."""
        names = list(order) if order is not None else sorted(update)
        if sorted(names) != sorted(update):
            raise HEError("order must list every tensor name of the update exactly once")
        return cls(tuple((n, tuple(int(d) for d in update[n].shape)) for n in names))

    @property
    def n_values(self) -> int:
        """Total number of values."""
        return sum(math.prod(shape) for _, shape in self.entries)

    def digest(self) -> str:
        """SHA-256 of the names and shapes, to check both sides agree."""
        return hashlib.sha256(canonical_json([[n, list(s)] for n, s in self.entries])).hexdigest()


def flatten_update(update: Mapping[str, torch.Tensor], *, layout: UpdateLayout) -> np.ndarray:
    """Concatenate the tensors of ``update`` in layout order into one float64 vector."""
    parts = []
    for name, shape in layout.entries:
        tensor = update.get(name)
        if tensor is None or tuple(tensor.shape) != shape:
            got = None if tensor is None else tuple(tensor.shape)
            raise HEError(f"update tensor {name!r} has shape {got}, the layout expects {shape}")
        parts.append(tensor.detach().to("cpu", torch.float64).reshape(-1).numpy())
    return np.concatenate(parts) if parts else np.zeros(0)


def unflatten_update(vector: np.ndarray, *, layout: UpdateLayout) -> dict[str, torch.Tensor]:
    """Split a flat vector back into named float32 tensors."""
    if vector.size != layout.n_values:
        raise HEError(f"vector has {vector.size} values, the layout needs {layout.n_values}")
    out, pos = {}, 0
    for name, shape in layout.entries:
        size = math.prod(shape)
        out[name] = torch.from_numpy(vector[pos : pos + size].astype(np.float32)).reshape(shape)
        pos += size
    return out


def pack_values(values: np.ndarray, *, packing: PackingConfig, layout: SlotLayout) -> np.ndarray:
    """Quantise weighted values and pack them into slot reals (float64, exact integers)."""
    if packing.quant_bits is None:
        return values.astype(np.float64)
    q = np.rint(np.clip(values, -packing.clip, packing.clip) / packing.step).astype(np.int64)
    per = layout.fields_per_slot
    q = np.concatenate([q, np.zeros((-q.size) % per, dtype=np.int64)]).reshape(-1, per)
    slots = q[:, -1].copy()
    for j in range(per - 2, -1, -1):
        slots = (slots << layout.field_bits) + q[:, j]
    return slots.astype(np.float64)


def unpack_values(
    slots: np.ndarray, *, n_values: int, packing: PackingConfig, layout: SlotLayout
) -> np.ndarray:
    """Inverse of :func:`pack_values` for a sum of packed slots; returns float64 values."""
    if packing.quant_bits is None:
        return slots[:n_values].astype(np.float64)
    rest = np.rint(slots).astype(np.int64)
    width, half = layout.field_bits, np.int64(1) << (layout.field_bits - 1)
    mask = (np.int64(1) << width) - 1
    fields = np.empty((rest.size, layout.fields_per_slot), dtype=np.int64)
    for j in range(layout.fields_per_slot - 1):
        low = ((rest + half) & mask) - half  # centred remainder: the signed field
        fields[:, j] = low
        rest = (rest - low) >> width
    fields[:, -1] = rest
    return fields.reshape(-1)[:n_values].astype(np.float64) * (packing.clip / packing.quant_max)
