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


# A masked update ends with three fields: 1 (the sum counts its sites) and its weight in fixed point.
WEIGHT_FIELDS = 3


def quantise(values: np.ndarray, *, packing: PackingConfig) -> np.ndarray:
    """Clip values to [-clip, clip] and round them to multiples of the step: int64 in [-Q, Q]."""
    return np.rint(np.clip(values, -packing.clip, packing.clip) / packing.step).astype(np.int64)


def weight_fields(weight: float, *, packing: PackingConfig) -> np.ndarray:
    """A count of 1 and a weight in (0, 1] as ``hi + lo / Q = weight * Q``: summable, exact to 1/Q^2."""
    q = packing.quant_max
    hi = round(weight * q)
    lo = round((weight * q - hi) * q)
    return np.array([1, hi, lo], dtype=np.int64)


def summed_count_and_weight(fields: np.ndarray, *, packing: PackingConfig) -> tuple[int, float]:
    """The number of sites and the total weight that summed :func:`weight_fields` stand for."""
    q = packing.quant_max
    return int(fields[0]), (float(fields[1]) + float(fields[2]) / q) / q


def pack_ints(q: np.ndarray, *, layout: SlotLayout) -> np.ndarray:
    """Pack signed integer fields, ``fields_per_slot`` to an int64 slot (``field_bits`` apart)."""
    per = layout.fields_per_slot
    q = np.concatenate([q, np.zeros((-q.size) % per, dtype=np.int64)]).reshape(-1, per)
    slots = q[:, -1].copy()
    for j in range(per - 2, -1, -1):
        slots = (slots << layout.field_bits) + q[:, j]
    return slots


def pack_values(values: np.ndarray, *, packing: PackingConfig, layout: SlotLayout) -> np.ndarray:
    """Quantise weighted values and pack them into slot reals (float64, exact integers)."""
    if packing.quant_bits is None:
        return values.astype(np.float64)
    return pack_ints(quantise(values, packing=packing), layout=layout).astype(np.float64)


def unmask_slots(slots: np.ndarray, *, layout: SlotLayout) -> np.ndarray:
    """Reduce summed masked slots modulo M and centre them: the masks are gone, the packed sum is left."""
    modulus = np.int64(layout.mask_modulus)
    reduced = np.mod(slots, modulus)
    return np.where(reduced >= modulus // 2, reduced - modulus, reduced)


def unpack_ints(slots: np.ndarray, *, n_fields: int, layout: SlotLayout) -> np.ndarray:
    """Inverse of :func:`pack_ints` for a sum of packed int64 slots."""
    rest = slots.astype(np.int64)
    width, half = layout.field_bits, np.int64(1) << (layout.field_bits - 1)
    mask = (np.int64(1) << width) - 1
    fields = np.empty((rest.size, layout.fields_per_slot), dtype=np.int64)
    for j in range(layout.fields_per_slot - 1):
        low = ((rest + half) & mask) - half  # centred remainder: the signed field
        fields[:, j] = low
        rest = (rest - low) >> width
    fields[:, -1] = rest
    return fields.reshape(-1)[:n_fields]


def unpack_values(
    slots: np.ndarray, *, n_values: int, packing: PackingConfig, layout: SlotLayout
) -> np.ndarray:
    """Inverse of :func:`pack_values` for a sum of packed slots; returns float64 values."""
    if packing.quant_bits is None:
        return slots[:n_values].astype(np.float64)
    fields = unpack_ints(np.rint(slots).astype(np.int64), n_fields=n_values, layout=layout)
    return fields.astype(np.float64) * (packing.clip / packing.quant_max)
