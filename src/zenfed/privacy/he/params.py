"""CKKS parameters, their security level, and the packing layout they allow.

The security table is the HomomorphicEncryption.org standard's (classical
attacks, ternary secret): for each ring size N, the largest total coefficient
modulus, in bits, that still gives 128, 192 or 256 bits of security.

Packing puts several quantised integers into one CKKS slot. A slot holds a real
number whose absolute error after encryption and summing is a few thousand
units of 2^-scale_bits, and whose value must stay below both the data modulus
(q / 2 over the scale) and the 53-bit mantissa of the float64 that SEAL encodes
and decodes through. Each field but the top one gets log2(max_sites) + 1 bits of
headroom, so the sum of up to ``max_sites`` fields never carries into the next.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from zenfed.privacy.he.errors import HEError, HESecurityError

# HomomorphicEncryption.org security standard (2018), Table 1, classical, ternary secret:
# ring size N -> {security bits: max total coefficient modulus bits}.
SECURITY_TABLE: dict[int, dict[int, int]] = {
    1024: {128: 27, 192: 19, 256: 14},
    2048: {128: 54, 192: 37, 256: 29},
    4096: {128: 109, 192: 75, 256: 58},
    8192: {128: 218, 192: 152, 256: 118},
    16384: {128: 438, 192: 305, 256: 237},
    32768: {128: 881, 192: 611, 256: 476},
}
MIN_SECURITY_BITS = 128

# float64 carries 53 bits; keep 5 for the FFT round-off of SEAL's encoder and decoder.
_MAX_VALUE_BITS = 48
# Scale for unquantised values: about 12 decimal digits below the unit.
_REAL_SCALE_BITS = 40


def security_level(*, poly_modulus_degree: int, total_modulus_bits: int) -> int:
    """Return the security level in bits of a CKKS ring, per the HE standard table.

    Args:
        poly_modulus_degree: The ring size N.
        total_modulus_bits: Bits of the whole coefficient modulus, special prime included.

    Returns:
        256, 192 or 128; 0 if the parameters are below 128 bits or N is not in the table.

    """
    bounds = SECURITY_TABLE.get(poly_modulus_degree)
    if bounds is None:
        return 0
    for level in (256, 192, 128):
        if total_modulus_bits <= bounds[level]:
            return level
    return 0


def require_security(*, poly_modulus_degree: int, total_modulus_bits: int) -> int:
    """Return the security level, or raise HESecurityError if it is below 128 bits."""
    level = security_level(
        poly_modulus_degree=poly_modulus_degree, total_modulus_bits=total_modulus_bits
    )
    if level < MIN_SECURITY_BITS:
        limit = SECURITY_TABLE.get(poly_modulus_degree, {}).get(128)
        hint = (
            f"at N={poly_modulus_degree} the total must be at most {limit} bits"
            if limit
            else f"use N in {sorted(SECURITY_TABLE)}"
        )
        raise HESecurityError(
            f"CKKS context with N={poly_modulus_degree} and a {total_modulus_bits}-bit coefficient "
            f"modulus is below 128-bit security; {hint}; re-provision with zenfed's defaults"
        )
    return level


@dataclass(frozen=True)
class HEParams:
    """Ring parameters of a CKKS context.

    The default N=4096 with primes (60, 40) has a 100-bit total modulus (128-bit
    security; the limit is 109). Ciphertexts live on the 60-bit data prime; the
    40-bit prime is SEAL's special prime, unused by an add-only workload.
    """

    poly_modulus_degree: int = 4096
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 40)

    def __post_init__(self) -> None:
        if len(self.coeff_mod_bit_sizes) < 2:
            raise HEError("coeff_mod_bit_sizes needs at least two primes (data + special prime)")
        if any(not 20 <= b <= 60 for b in self.coeff_mod_bit_sizes):
            raise HEError("each prime of coeff_mod_bit_sizes must have 20 to 60 bits")
        require_security(
            poly_modulus_degree=self.poly_modulus_degree,
            total_modulus_bits=sum(self.coeff_mod_bit_sizes),
        )

    @property
    def slots(self) -> int:
        """Values per ciphertext (N / 2)."""
        return self.poly_modulus_degree // 2

    @property
    def data_modulus_bits(self) -> int:
        """Bits of the modulus a fresh ciphertext lives on (all primes but the special one)."""
        return sum(self.coeff_mod_bit_sizes[:-1])


@dataclass(frozen=True)
class PackingConfig:
    """How update values become CKKS slots; identical at every site and the server.

    Attributes:
        quant_bits: Bits of a quantised value (2..24), or None for one float per slot.
        max_sites: Most sites whose updates may be summed; sets the headroom.
        clip: Values are clipped to [-clip, clip] before quantisation (quantised mode only).
        masked: Pairwise masks hide each packed real modulo 2^mask_bits (``zenfed.privacy.pairwise``);
            the sum then also carries the sites' weights, and one correction per survivor.

    """

    quant_bits: int | None = 16
    max_sites: int = 64
    clip: float = 0.05
    masked: bool = False

    def __post_init__(self) -> None:
        if self.masked and self.quant_bits is None:
            raise HEError("pairwise masks work on quantised integers; set quant_bits (e.g. 16)")
        if self.quant_bits is not None and not 2 <= self.quant_bits <= 24:
            raise HEError(f"quant_bits must be 2..24 or None (off), got {self.quant_bits}")
        if not 1 <= self.max_sites <= 4096:
            raise HEError(f"max_sites must be 1..4096, got {self.max_sites}")
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise HEError(f"clip must be a positive number, got {self.clip}")

    @property
    def quant_max(self) -> int:
        """Largest quantised magnitude Q: values map to integers in [-Q, Q]."""
        if self.quant_bits is None:
            raise HEError("quant_max is undefined when quantisation is off")
        return 2 ** (self.quant_bits - 1) - 1

    @property
    def step(self) -> float | None:
        """Quantisation step (clip / Q), or None when quantisation is off."""
        return None if self.quant_bits is None else self.clip / self.quant_max


@dataclass(frozen=True)
class SlotLayout:
    """How many values share a slot, how wide each field is, and the encoding scale."""

    fields_per_slot: int
    field_bits: int
    scale_bits: int
    value_bits: int
    mask_bits: int = 0

    @property
    def mask_modulus(self) -> int:
        """M = 2^mask_bits: a masked real is a packed integer plus a mask, modulo M (0: unmasked)."""
        return 1 << self.mask_bits if self.mask_bits else 0


def _min_scale_bits(params: HEParams, max_sites: int) -> int:
    # Measured: after summing 64 fresh ciphertexts at N=4096 the slot error has a
    # standard deviation of about 1200 scale units; it grows with sqrt(sites * N).
    # Keep 10 standard deviations below the 0.5 rounding threshold.
    sigma = 150.0 * math.sqrt(max_sites * params.poly_modulus_degree / 4096)
    return math.ceil(math.log2(20.0 * sigma))


def slot_layout(params: HEParams, packing: PackingConfig) -> SlotLayout:
    """Return the packing layout the parameters allow.

    Raises:
        HEError: If not even one value per slot decodes exactly.

    """
    budget = params.data_modulus_bits - 2  # q/2, and one bit of margin
    if packing.quant_bits is None:
        value_bits = budget - _REAL_SCALE_BITS
        if value_bits < 8:
            raise HEError("the data modulus is too small for unquantised values; use bigger primes")
        return SlotLayout(1, 0, _REAL_SCALE_BITS, value_bits)
    headroom = math.ceil(math.log2(packing.max_sites))
    top_bits = packing.quant_bits - 1 + headroom  # |sum of max_sites fields| < 2^top_bits
    field_bits = top_bits + 1
    # Masked: a real is uniform in [0, M) with M = 2^(value_bits + 1), the sum adds up to
    # max_sites updates and as many corrections, so it needs log2(2 max_sites) bits more.
    summands = 2 * packing.max_sites if packing.masked else packing.max_sites
    mask_room = 1 + math.ceil(math.log2(summands)) if packing.masked else 0
    min_scale = _min_scale_bits(params, summands)
    limit = min(_MAX_VALUE_BITS, budget - min_scale) - mask_room
    if top_bits > limit:
        raise HEError(
            f"{packing.quant_bits}-bit values for {packing.max_sites} sites do not fit one slot "
            f"at N={params.poly_modulus_degree}"
            f"{' with pairwise masks' if packing.masked else ''}; lower quant_bits or max_sites"
        )
    fields = 1 + (limit - top_bits) // field_bits
    value_bits = field_bits * (fields - 1) + top_bits
    mask_bits = value_bits + 1 if packing.masked else 0
    return SlotLayout(fields, field_bits, budget - value_bits - mask_room, value_bits, mask_bits)


def packing_for(encryption: Any) -> PackingConfig:
    """The packing every participant of a job uses, from the job spec's ``encryption`` section."""
    return PackingConfig(quant_bits=encryption.quant_bits, max_sites=encryption.max_sites, clip=encryption.clip,
                         masked=encryption.secure_aggregation == "pairwise")
