"""Packed CKKS aggregation of adapter updates: pack, encrypt, add, decrypt, unpack.

A site flattens its update (named float32 tensors) into one vector, multiplies it
by its weight, quantises it (values clipped to ``[-clip, clip]``, 16 bits by
default) and packs several quantised integers into each CKKS slot, with headroom
so that up to ``max_sites`` sums never carry between fields. The slots are
encrypted with the secret key, in chunks of at most ``CHUNK_CIPHERTEXTS``
ciphertexts, and sent in a compact form without the context (``he_wire``).

The server adds ciphertexts in place with a public-only context. A key holder
decrypts the sum, unpacks it and divides by the plain total weight.

With quantisation off each slot carries one float at scale 2^40; the sum then
matches plaintext to about 1e-8 absolute.
"""

from __future__ import annotations

import atexit
import hashlib
import math
import struct
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context

import numpy as np
import tenseal as ts
import torch

from zenfed.privacy.he_context import HEContext, context_from_bytes, context_to_bytes
from zenfed.privacy.he_params import HEError, HEKeyError, PackingConfig, SlotLayout, slot_layout
from zenfed.privacy.he_wire import CHUNK_HEAD_BYTES
from zenfed.privacy.he_seal import SealKit
from zenfed.privacy.he_wire import (
    HEDecodeError,
    compact_ciphertexts,
    compact_vector,
    expand_ciphertexts,
    expand_vector,
)
from zenfed.spec import canonical_json

CHUNK_CIPHERTEXTS = 16
# SEAL's saved PRNG info after a seeded ciphertext's c0 (header, PRNG type, 64-byte seed).
SEED_TAIL_BYTES = 81
_BLOB_MAGIC = b"ZFB1"


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


def fingerprint(context: HEContext, packing: PackingConfig) -> str:
    """SHA-256 of everything that must match for two ciphertexts to be summed."""
    lay = slot_layout(context.params, packing)
    return hashlib.sha256(
        canonical_json(
            {
                "scheme": "ckks",
                "wire": "ZFB1/ZFC1",
                "poly_modulus_degree": context.params.poly_modulus_degree,
                "coeff_mod_bit_sizes": list(context.params.coeff_mod_bit_sizes),
                "key_id": context.key_id,
                "quant_bits": packing.quant_bits,
                "max_sites": packing.max_sites,
                "clip": repr(float(packing.clip)),
                "layout": [lay.fields_per_slot, lay.field_bits, lay.scale_bits],
            }
        )
    ).hexdigest()


def expected_ciphertext_bytes(
    *, n_values: int, context: HEContext, packing: PackingConfig, summed: bool = False
) -> int:
    """Exact size of the ciphertext blob for ``n_values`` values.

    Args:
        n_values: Values in the update.
        context: Any context of the key set (public or secret).
        packing: The packing configuration.
        summed: False for a site's upload (seeded ciphertexts), True for a sum.
    """
    lay = slot_layout(context.params, packing)
    params = context.params
    n_reals = -(-n_values // lay.fields_per_slot)
    n_ct = -(-n_reals // params.poly_modulus_degree)
    polys = 2 if summed else 1
    words = polys * params.poly_modulus_degree * (len(params.coeff_mod_bit_sizes) - 1)
    per_ct = words * max(params.coeff_mod_bit_sizes[:-1]) // 8 + (0 if summed else SEED_TAIL_BYTES)
    sizes = [min(CHUNK_CIPHERTEXTS, n_ct - i) for i in range(0, n_ct, CHUNK_CIPHERTEXTS)]
    return 8 + 8 * len(sizes) + sum(CHUNK_HEAD_BYTES + k * (4 + per_ct) for k in sizes)


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
    return fields.reshape(-1)[:n_values].astype(np.float64) * packing.step


def _weighted(values: np.ndarray, weight: float, packing: PackingConfig, lay: SlotLayout) -> np.ndarray:
    if not (math.isfinite(weight) and weight > 0):
        raise HEError(f"weight must be a positive number, got {weight}")
    if packing.quant_bits is not None:
        if weight > 1:
            raise HEError(
                f"weight {weight} > 1: with quantisation on, normalise weights to (0, 1] "
                "(e.g. samples / max samples) so the sum keeps its headroom"
            )
        return np.clip(values, -packing.clip, packing.clip) * weight
    weighted = values * weight
    limit = 2.0**lay.value_bits / packing.max_sites
    if weighted.size and float(np.abs(weighted).max()) >= limit:
        raise HEError(f"weighted values reach {np.abs(weighted).max():.3g}; the limit is {limit:.3g}")
    return weighted


def _encrypt_chunk(kit: SealKit, reals: np.ndarray, scale_bits: int, bits: int) -> bytes:
    cts = kit.encrypt(reals, scale=2.0**scale_bits)
    sizes = [kit.reals_per_ciphertext // 2] * len(cts)
    return compact_ciphertexts(cts, sizes=sizes, scale=2.0**scale_bits, coeff_bits=bits)


_WORKER_KIT: SealKit | None = None


def _worker_init(context_bytes: bytes) -> None:
    global _WORKER_KIT
    _WORKER_KIT = SealKit(context_from_bytes(context_bytes))
    atexit.register(_WORKER_KIT.close)


def _worker_encrypt(args: tuple[np.ndarray, int, int]) -> bytes:
    if _WORKER_KIT is None:
        raise HEError("encryption worker has no context")
    return _encrypt_chunk(_WORKER_KIT, *args)


def _join_chunks(chunks: Sequence[bytes]) -> bytes:
    head = _BLOB_MAGIC + struct.pack(f"<I{len(chunks)}Q", len(chunks), *(len(c) for c in chunks))
    return head + b"".join(chunks)


def split_chunks(blob: bytes) -> list[bytes]:
    """Split a ciphertext blob into its compact vectors.

    Raises:
        HEDecodeError: If the blob is truncated or padded.

    """
    if len(blob) < 8 or not blob.startswith(_BLOB_MAGIC):
        raise HEDecodeError("ciphertext blob does not start with the zenfed magic")
    (count,) = struct.unpack_from("<I", blob, 4)
    if count == 0 or len(blob) < 8 + 8 * count:
        raise HEDecodeError("ciphertext blob has a bad chunk table")
    sizes = struct.unpack_from(f"<{count}Q", blob, 8)
    pos = 8 + 8 * count
    if pos + sum(sizes) != len(blob):
        raise HEDecodeError(f"ciphertext blob is {len(blob)} bytes, its table says {pos + sum(sizes)}")
    chunks = []
    for size in sizes:
        chunks.append(blob[pos : pos + size])
        pos += size
    return chunks


class Encryptor:
    """Encrypts updates with a secret context, optionally on several processes.

    Use as a context manager, or call :meth:`close`, when ``workers > 1``.
    """

    def __init__(self, *, context: HEContext, packing: PackingConfig, workers: int = 1) -> None:
        if not context.has_secret_key:
            raise HEKeyError("encrypting needs the site's secret context (startup/ of a site kit)")
        self.context, self.packing = context, packing
        self.layout = slot_layout(context.params, packing)
        self.fingerprint = fingerprint(context, packing)
        self._bits = max(context.params.coeff_mod_bit_sizes[:-1])
        self._kit = SealKit(context)
        self._pool: ProcessPoolExecutor | None = None
        if workers > 1:
            self._pool = ProcessPoolExecutor(
                max_workers=workers,
                mp_context=get_context("spawn"),
                initializer=_worker_init,
                initargs=(context_to_bytes(context),),
            )

    def __enter__(self) -> Encryptor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the worker processes, if any, and remove temporary files."""
        self._kit.close()
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def encrypt(self, update: Mapping[str, torch.Tensor], *, weight: float, layout: UpdateLayout) -> bytes:
        """Weight, quantise, pack and encrypt ``update``; return the ciphertext blob.

        Args:
            update: Named float tensors, matching ``layout``.
            weight: This site's weight, applied before encryption; in (0, 1] when quantising.
            layout: Names and shapes, identical at every site.

        """
        values = _weighted(flatten_update(update, layout=layout), weight, self.packing, self.layout)
        return self.encrypt_vector(values)

    def encrypt_vector(self, values: np.ndarray) -> bytes:
        """Encrypt an already weighted flat vector; return the ciphertext blob."""
        if values.size == 0:
            raise HEError("the update has no values; nothing to encrypt")
        slots = pack_values(values, packing=self.packing, layout=self.layout)
        per_chunk = CHUNK_CIPHERTEXTS * self._kit.reals_per_ciphertext
        jobs = [
            (slots[i : i + per_chunk], self.layout.scale_bits, self._bits)
            for i in range(0, max(slots.size, 1), per_chunk)
        ]
        if self._pool is None:
            chunks = [_encrypt_chunk(self._kit, *job) for job in jobs]
        else:
            chunks = list(self._pool.map(_worker_encrypt, jobs))
        return _join_chunks(chunks)


class EncryptedSum:
    """A running sum of ciphertext blobs; adds in place, never decrypts.

    Memory is one update's ciphertexts, whatever the number of sites.
    """

    def __init__(self, *, context: HEContext) -> None:
        self.context = context
        self.count = 0
        self._chunks: list[ts.CKKSVector] = []
        self._heads: list[bytes] = []

    def _load(self, chunk: bytes) -> ts.CKKSVector:
        try:
            return ts.ckks_vector_from(self.context.tenseal, expand_vector(chunk))
        except HEDecodeError:
            raise
        except Exception as err:  # SEAL refuses coefficients or metadata that do not fit
            raise HEDecodeError(f"ciphertext does not load under this context: {err}") from None

    def add(self, blob: bytes) -> None:
        """Add one site's ciphertext blob in place.

        Every chunk is decoded and checked against the sum (parameters, scale,
        size) before any is added, so a bad blob leaves the sum untouched.

        Raises:
            HEDecodeError: If the blob is undecodable or does not match the sum.

        """
        chunks = split_chunks(blob)
        heads = [c[:CHUNK_HEAD_BYTES] for c in chunks]
        if self._chunks and heads != self._heads:
            raise HEDecodeError("ciphertext blob differs from the sum in parameters, scale or shape")
        vectors = [self._load(c) for c in chunks]
        if self._chunks and [v.size() for v in vectors] != [v.size() for v in self._chunks]:
            raise HEDecodeError("ciphertext blob has a different length than the running sum")
        if not self._chunks:
            self._chunks, self._heads = vectors, heads
        else:
            for total, vector in zip(self._chunks, vectors):
                total.add_(vector)
        self.count += 1

    def to_bytes(self) -> bytes:
        """Serialise the sum as a ciphertext blob (no context)."""
        if not self._chunks:
            raise HEError("the encrypted sum is empty; no site update was added")
        bits = max(self.context.params.coeff_mod_bit_sizes[:-1])
        return _join_chunks([compact_vector(v.serialize(), coeff_bits=bits) for v in self._chunks])


def decrypt_sum(
    blob: bytes,
    *,
    context: HEContext,
    packing: PackingConfig,
    layout: UpdateLayout,
    total_weight: float,
) -> dict[str, torch.Tensor]:
    """Decrypt a summed blob, unpack it and divide by ``total_weight``: the weighted mean.

    Raises:
        HEKeyError: If ``context`` has no secret key.
        HEDecodeError: If the blob is undecodable.

    """
    if not context.has_secret_key:
        raise HEKeyError("decrypting needs a site's secret context; the server cannot decrypt")
    if not (math.isfinite(total_weight) and total_weight > 0):
        raise HEError(f"total_weight must be a positive number, got {total_weight}")
    lay = slot_layout(context.params, packing)
    with SealKit(context) as kit:
        reals = np.concatenate([kit.decrypt(expand_ciphertexts(c)[1]) for c in split_chunks(blob)])
    needed = -(-layout.n_values // lay.fields_per_slot)
    if reals.size < needed:
        raise HEDecodeError(f"the sum holds {reals.size} slots, the layout needs {needed}")
    values = unpack_values(reals, n_values=layout.n_values, packing=packing, layout=lay)
    return unflatten_update(values / total_weight, layout=layout)
