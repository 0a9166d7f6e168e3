"""Packed CKKS aggregation of adapter updates: pack, encrypt, add, decrypt, unpack.

A site flattens its update (named float32 tensors) into one vector, multiplies it
by its weight, quantises it (values clipped to ``[-clip, clip]``, 16 bits by
default) and packs two quantised integers into each real, with headroom so that
up to ``max_sites`` sums never carry between fields (``he_pack``). Each complex
CKKS slot carries two such reals; the secret key encrypts them with SEAL's seeded
symmetric encryption (``he_seal``), in chunks of at most ``CHUNK_CIPHERTEXTS``
ciphertexts, sent bit-packed and without the context (``he_wire``): about 0.95
bytes per float32 byte.

The server adds ciphertexts in place with a public-only TenSEAL context. A key
holder decrypts the sum, unpacks it and divides by the plain total weight.

With quantisation off each real is one value at scale 2^40; the sum then
matches plaintext to about 1e-9 absolute.
"""

from __future__ import annotations

import atexit
import hashlib
import math
import struct
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np
import tenseal as ts
import torch

from zenfed.digest import canonical_json
from zenfed.privacy.he.context import HEContext, context_from_bytes, context_to_bytes
from zenfed.privacy.he.errors import HEError, HEKeyError
from zenfed.privacy.he.pack import (
    WEIGHT_FIELDS,
    UpdateLayout,
    flatten_update,
    pack_ints,
    pack_values,
    quantise,
    summed_count_and_weight,
    unflatten_update,
    unmask_slots,
    unpack_ints,
    unpack_values,
    weight_fields,
)
from zenfed.privacy.he.params import PackingConfig, SlotLayout, slot_layout
from zenfed.privacy.he.seal import SealKit
from zenfed.privacy.he.wire import (
    CHUNK_HEAD_BYTES,
    HEDecodeError,
    build_vector_proto,
    compact_ciphertexts,
    expand_ciphertexts,
    parse_vector_proto,
)

CHUNK_CIPHERTEXTS = 16
# SEAL's saved PRNG info after a seeded ciphertext's c0 (header, PRNG type, 64-byte seed).
SEED_TAIL_BYTES = 81
_BLOB_MAGIC = b"ZFB1"

__all__ = [
    "CHUNK_CIPHERTEXTS",
    "EncryptedSum",
    "Encryptor",
    "MaskSource",
    "UpdateLayout",
    "decrypt_sum",
    "expected_ciphertext_bytes",
    "fingerprint",
    "flatten_update",
    "pack_values",
    "slot_count",
    "split_chunks",
    "unflatten_update",
    "unpack_values",
]


MaskSource = Callable[[int, int], np.ndarray]
"""``mask(n_slots, mask_bits)``: a site's mask, uint64 values uniform in [0, 2^mask_bits)."""


def slot_count(n_values: int, *, packing: PackingConfig, layout: SlotLayout) -> int:
    """Packed reals an update of ``n_values`` values fills (a masked one also carries its weight)."""
    fields = n_values + (WEIGHT_FIELDS if packing.masked else 0)
    return -(-fields // layout.fields_per_slot)


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
                **({"masked": lay.mask_bits} if packing.masked else {}),
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
    n_reals = slot_count(n_values, packing=packing, layout=lay)
    n_ct = -(-n_reals // params.poly_modulus_degree)
    polys = 2 if summed else 1
    words = polys * params.poly_modulus_degree * (len(params.coeff_mod_bit_sizes) - 1)
    per_ct = words * max(params.coeff_mod_bit_sizes[:-1]) // 8 + (0 if summed else SEED_TAIL_BYTES)
    sizes = [min(CHUNK_CIPHERTEXTS, n_ct - i) for i in range(0, n_ct, CHUNK_CIPHERTEXTS)]
    return 8 + 8 * len(sizes) + sum(CHUNK_HEAD_BYTES + k * (4 + per_ct) for k in sizes)


def _weighted(
    values: np.ndarray, weight: float, packing: PackingConfig, lay: SlotLayout
) -> np.ndarray:
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
        raise HEError(
            f"weighted values reach {np.abs(weighted).max():.3g}, over the limit {limit:.3g} "
            "for unquantised sums; lower the weight or turn quantisation on"
        )
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
        raise HEDecodeError(
            f"ciphertext blob is {len(blob)} bytes, its table says {pos + sum(sizes)}"
        )
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

    def encrypt(
        self, update: Mapping[str, torch.Tensor], *, weight: float, layout: UpdateLayout,
        mask: MaskSource | None = None,
    ) -> bytes:
        """Weight, quantise, pack, mask (if the packing is masked) and encrypt ``update``.

        Args:
            update: Named float tensors, matching ``layout``.
            weight: This site's weight, applied before encryption; in (0, 1] when quantising.
            layout: Names and shapes, identical at every site.
            mask: This site's pairwise mask; required exactly when the packing is masked.

        Returns:
            The ciphertext blob.

        """
        values = _weighted(flatten_update(update, layout=layout), weight, self.packing, self.layout)
        if not self.packing.masked:
            if mask is not None:
                raise HEError("a mask was given, but the packing has no room for masks (masked=False)")
            return self.encrypt_vector(values)
        if mask is None:
            raise HEError("this job sums under pairwise masks; an update must be masked before encryption")
        if values.size == 0:
            raise HEError("the update has no values; nothing to encrypt")
        fields = np.concatenate([quantise(values, packing=self.packing),
                                 weight_fields(weight, packing=self.packing)])
        slots = pack_ints(fields, layout=self.layout)
        return self.encrypt_slots(np.mod(slots + self._mask(mask, slots.size), self.layout.mask_modulus))

    def encrypt_correction(self, n_values: int, mask: MaskSource) -> bytes:
        """Encrypt a mask correction alone (a survivor's share of a dropped site's masks)."""
        count = slot_count(n_values, packing=self.packing, layout=self.layout)
        return self.encrypt_slots(self._mask(mask, count))

    def _mask(self, mask: MaskSource, count: int) -> np.ndarray:
        values = np.asarray(mask(count, self.layout.mask_bits))
        if values.shape != (count,) or (values.size and int(values.max()) >= self.layout.mask_modulus):
            raise HEError(f"the mask must hold {count} values below 2^{self.layout.mask_bits}")
        return values.astype(np.int64)

    def encrypt_vector(self, values: np.ndarray) -> bytes:
        """Encrypt an already weighted flat vector; return the ciphertext blob."""
        if values.size == 0:
            raise HEError("the update has no values; nothing to encrypt")
        return self.encrypt_slots(pack_values(values, packing=self.packing, layout=self.layout))

    def encrypt_slots(self, slots: np.ndarray) -> bytes:
        """Encrypt packed reals (exact integers, or values at scale 2^40 when unquantised)."""
        slots = slots.astype(np.float64)
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

    Memory is one update's ciphertexts, whatever the number of sites. Each SEAL
    ciphertext is its own TenSEAL vector (a vector spanning several ciphertexts
    makes TenSEAL print a warning on stdout for every load).
    """

    def __init__(self, *, context: HEContext) -> None:
        self.context = context
        self.count = 0
        self._chunks: list[list[ts.CKKSVector]] = []
        self._heads: list[bytes] = []

    def _load(self, chunk: bytes) -> list[ts.CKKSVector]:
        sizes, cts, scale = expand_ciphertexts(chunk)
        try:
            return [
                ts.ckks_vector_from(self.context.tenseal, build_vector_proto([size], [ct], scale))
                for size, ct in zip(sizes, cts, strict=True)
            ]
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
            raise HEDecodeError("ciphertext blob differs from the sum in parameters, scale, shape")
        loaded = [self._load(c) for c in chunks]
        shape = [[v.size() for v in vectors] for vectors in loaded]
        if self._chunks and shape != [[v.size() for v in vs] for vs in self._chunks]:
            raise HEDecodeError("ciphertext blob has a different length than the running sum")
        if not self._chunks:
            self._chunks, self._heads = loaded, heads
        else:
            for totals, vectors in zip(self._chunks, loaded, strict=True):
                for total, vector in zip(totals, vectors, strict=True):
                    total.add_(vector)
        self.count += 1

    def to_bytes(self) -> bytes:
        """Serialise the sum as a ciphertext blob (no context)."""
        if not self._chunks:
            raise HEError("the encrypted sum is empty; no site update was added")
        bits = max(self.context.params.coeff_mod_bit_sizes[:-1])
        out = []
        for vectors in self._chunks:
            sizes, cts, scales = [], [], set()
            for vector in vectors:
                v_sizes, v_cts, v_scale = parse_vector_proto(vector.serialize())
                sizes += v_sizes
                cts += v_cts
                scales.add(v_scale)
            if len(scales) != 1:
                raise HEError("ciphertexts of the sum differ in scale; this is a bug")
            out.append(compact_ciphertexts(cts, sizes=sizes, scale=scales.pop(), coeff_bits=bits))
        return _join_chunks(out)


def decrypt_sum(
    blob: bytes,
    *,
    context: HEContext,
    packing: PackingConfig,
    layout: UpdateLayout,
    total_weight: float | None,
    contributors: int | None = None,
) -> dict[str, torch.Tensor]:
    """Decrypt a summed blob, unpack it and divide by the total weight: the weighted mean.

    Args:
        blob: The summed ciphertexts.
        context: A site's secret context.
        packing: The job's packing.
        layout: Names and shapes of the update.
        total_weight: The plain total weight; None for a masked sum, which carries its own.
        contributors: For a masked sum, how many updates the server says it holds (checked).

    Raises:
        HEKeyError: If ``context`` has no secret key.
        HEDecodeError: If the blob is undecodable, or a masked sum's count or weight is off
            (its masks did not cancel: an incomplete or foreign sum).

    """
    if not context.has_secret_key:
        raise HEKeyError("decrypting needs a site's secret context; the server cannot decrypt")
    lay = slot_layout(context.params, packing)
    with SealKit(context) as kit:
        reals = np.concatenate([kit.decrypt(expand_ciphertexts(c)[1]) for c in split_chunks(blob)])
    needed = slot_count(layout.n_values, packing=packing, layout=lay)
    if reals.size < needed:
        raise HEDecodeError(f"the sum holds {reals.size} slots, the layout needs {needed}")
    if packing.masked:
        slots = unmask_slots(np.rint(reals[:needed]).astype(np.int64), layout=lay)
        fields = unpack_ints(slots, n_fields=layout.n_values + WEIGHT_FIELDS, layout=lay)
        total_weight = masked_total_weight(fields[layout.n_values:], packing, contributors=contributors)
        values = fields[: layout.n_values].astype(np.float64) * (packing.clip / packing.quant_max)
    else:
        if total_weight is None or not (math.isfinite(total_weight) and total_weight > 0):
            raise HEError(f"total_weight must be a positive number, got {total_weight}")
        values = unpack_values(reals, n_values=layout.n_values, packing=packing, layout=lay)
    return unflatten_update(values / total_weight, layout=layout)


def masked_total_weight(fields: np.ndarray, packing: PackingConfig, *, contributors: int | None) -> float:
    """The total weight a masked sum carries in its last fields, after checking its site count.

    A sum whose masks did not cancel holds uniform noise there: its count lands in
    [1, max_sites] with odds of about max_sites / 2^field_bits.

    Raises:
        HEDecodeError: If the count is off (or differs from ``contributors``) or the weight is
            not in (0, count].
    """
    count, weight = summed_count_and_weight(fields, packing=packing)
    if not 1 <= count <= packing.max_sites or (contributors is not None and count != contributors) or not (
            0 < weight <= count + 1e-6):
        raise HEDecodeError(
            f"the decrypted sum counts {count} site(s) with weight {weight:.4g}"
            f"{f', the server says {contributors}' if contributors is not None else ''}: its pairwise masks "
            "did not cancel (a sum that misses a site's update or correction, or one site's ciphertext)"
        )
    return weight


def open_update(
    data: bytes, *, context: HEContext, packing: PackingConfig, job: str, round: int, site: str,
    n_values: int | None = None,
) -> tuple[int, bytes]:
    """Open one site's update envelope for this job, round and site; return its value count and ciphertext.

    Args:
        data: The envelope bytes the site sent.
        context: A (public) context of the job's parameters.
        packing: The job's packing.
        job: The job id the envelope must name.
        round: The round it must name.
        site: The site it must name.
        n_values: The update length the round expects; the envelope's own if None (the first of a job).

    Raises:
        EnvelopeError: If any check fails (parameters, length, job, round, site, hash).
    """
    from zenfed.privacy.he.envelope import open_envelope, read_envelope

    if n_values is None:
        n_values = read_envelope(data)[0].n_values
    _, ciphertext = open_envelope(
        data, job=job, round=round, site=site, fingerprint=fingerprint(context, packing), n_values=n_values,
        ciphertext_bytes=expected_ciphertext_bytes(n_values=n_values, context=context, packing=packing),
    )
    return n_values, ciphertext
