"""Compact wire form of SEAL ciphertexts, without their context.

SEAL saves a ciphertext zstd-compressed (TenSEAL wraps such bytes in a
protobuf). Ciphertext coefficients are uniform below the data prime, so zstd
gains nothing, and every 60-bit coefficient still takes a 64-bit word. This
form keeps SEAL's per-ciphertext metadata once and bit-packs the coefficients at
the width of the data modulus: 15 bytes per 16 for a 60-bit prime. It is
reversible to bytes SEAL loads (uncompressed), and SEAL's loader validates
every coefficient against the context.

Layout (little endian)::

    b"ZFC1" | u8 seal_major | u8 seal_minor | u8 coeff_bits | u8 0 | f64 scale
    | u32 n_ct | u32 meta_len | u32 tail_len | meta | n_ct x u32 slot count
    | n_ct x (packed words | tail)

A seeded ciphertext (SEAL's symmetric encryption saved with its seed: c1 is
regenerated from a 64-byte seed on load) has half the words and a tail holding
the seed; a sum of ciphertexts has all the words and no tail.
"""

from __future__ import annotations

import ctypes
import struct
from functools import lru_cache

import numpy as np
import tenseal as ts

from zenfed.privacy.he.errors import HEDecodeError

_MAGIC = b"ZFC1"
_HEAD = struct.Struct("<4sBBBBdIII")
_SEAL_HEADER = struct.Struct("<HBBBBHQ")  # magic, header size, major, minor, compr, reserved, size
_SEAL_MAGIC = 0xA15E
_COMPR_NONE, _COMPR_ZSTD = 0, 2
# SEAL ciphertext body: parms_id (4 x u64), is_ntt_form (u8), size, N, coeff_modulus_size (u64),
# scale (f64), correction_factor (u64); then the coefficient array as its own SEAL object.
_META_LEN = 32 + 1 + 8 * 5
# Header + SEAL metadata: equal for two vectors exactly when they can be added.
CHUNK_HEAD_BYTES = _HEAD.size + _META_LEN


@lru_cache(maxsize=1)
def _zstd() -> ctypes.CDLL:
    # TenSEAL links zstd (SEAL compresses with it) and exports its C API; use that
    # very library, so the decompressor always matches the compressor.
    lib = ctypes.CDLL(ts._ts_cpp.__file__)
    lib.ZSTD_getFrameContentSize.restype = ctypes.c_ulonglong
    lib.ZSTD_getFrameContentSize.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
    lib.ZSTD_decompress.restype = ctypes.c_size_t
    lib.ZSTD_decompress.argtypes = [
        ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t
    ]
    lib.ZSTD_isError.restype = ctypes.c_uint
    lib.ZSTD_isError.argtypes = [ctypes.c_size_t]
    return lib


def _zstd_decompress(data: bytes) -> bytes:
    lib = _zstd()
    size = lib.ZSTD_getFrameContentSize(data, len(data))
    if size >= 2**63 or size > 1 << 31:
        raise HEDecodeError("a SEAL ciphertext has no readable zstd frame size")
    buf = ctypes.create_string_buffer(size)
    got = lib.ZSTD_decompress(buf, size, data, len(data))
    if lib.ZSTD_isError(got) or got != size:
        raise HEDecodeError("a SEAL ciphertext's zstd payload is corrupt")
    return buf.raw


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(data) or shift > 63:
            raise HEDecodeError("truncated protobuf varint in a TenSEAL vector")
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        shift += 7
        if not byte & 0x80:
            return value, pos


def parse_fields(data: bytes) -> dict[int, bytes | int]:
    """Parse the top level of a protobuf message: field number -> last value."""
    out: dict[int, bytes | int] = {}
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        field, wire = key >> 3, key & 7
        if wire == 2:
            length, pos = _read_varint(data, pos)
            out[field] = data[pos : pos + length]
            pos += length
        elif wire == 0:
            out[field], pos = _read_varint(data, pos)
        elif wire == 1:
            out[field] = data[pos : pos + 8]
            pos += 8
        else:
            raise HEDecodeError(f"unexpected protobuf wire type {wire}")
    return out


def parse_vector_proto(data: bytes) -> tuple[list[int], list[bytes], float]:
    """Parse TenSEAL's CKKSVectorProto: sizes (1), ciphertexts (2), scale (3)."""
    sizes: list[int] = []
    cts: list[bytes] = []
    scale = 0.0
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        field, wire = key >> 3, key & 7
        if wire == 2:
            length, pos = _read_varint(data, pos)
            chunk = data[pos : pos + length]
            pos += length
            if field == 1:
                sub = 0
                while sub < len(chunk):
                    value, sub = _read_varint(chunk, sub)
                    sizes.append(value)
            elif field == 2:
                cts.append(chunk)
        elif wire == 1 and field == 3:
            (scale,) = struct.unpack_from("<d", data, pos)
            pos += 8
        elif wire == 0:
            value, pos = _read_varint(data, pos)
            sizes.append(value)
        else:
            raise HEDecodeError(f"unexpected field {field} in a TenSEAL vector")
    return sizes, cts, scale


def build_vector_proto(sizes: list[int], cts: list[bytes], scale: float) -> bytes:
    """Build TenSEAL's CKKSVectorProto bytes from slot counts, SEAL ciphertexts and scale."""
    packed = b"".join(_varint(s) for s in sizes)
    out = [b"\x0a", _varint(len(packed)), packed]
    for ct in cts:
        out += [b"\x12", _varint(len(ct)), ct]
    out.append(b"\x19" + struct.pack("<d", scale))
    return b"".join(out)


def _pack_bits(words: np.ndarray, bits: int) -> bytes:
    """Pack uint64 words of at most ``bits`` bits: 64 words -> ``bits`` words."""
    groups = words.reshape(-1, 64)
    out = np.zeros((groups.shape[0], bits), dtype=np.uint64)
    for i in range(64):
        offset = i * bits
        idx, shift = divmod(offset, 64)
        out[:, idx] |= groups[:, i] << np.uint64(shift)
        if shift + bits > 64:
            out[:, idx + 1] |= groups[:, i] >> np.uint64(64 - shift)
    return out.astype("<u8").tobytes()


def _unpack_bits(data: bytes, bits: int, count: int) -> np.ndarray:
    packed = np.frombuffer(data, dtype="<u8").astype(np.uint64).reshape(-1, bits)
    mask = np.uint64((1 << bits) - 1)
    out = np.empty((packed.shape[0], 64), dtype=np.uint64)
    for i in range(64):
        idx, shift = divmod(i * bits, 64)
        value = packed[:, idx] >> np.uint64(shift)
        if shift + bits > 64:
            value |= packed[:, idx + 1] << np.uint64(64 - shift)
        out[:, i] = value & mask
    return out.reshape(-1)[:count]


def _split_ciphertext(ct: bytes) -> tuple[int, int, bytes, np.ndarray, bytes]:
    if len(ct) < 16 + _META_LEN + 24:
        raise HEDecodeError("SEAL ciphertext is truncated")
    magic, hsize, major, minor, compr, _, size = _SEAL_HEADER.unpack_from(ct)
    if magic != _SEAL_MAGIC or hsize != 16 or size != len(ct):
        raise HEDecodeError("not a SEAL ciphertext")
    body = ct[16:]
    if compr == _COMPR_ZSTD:
        body = _zstd_decompress(body)
    elif compr != _COMPR_NONE:
        raise HEDecodeError(f"unsupported SEAL compression mode {compr}")
    meta = body[:_META_LEN]
    inner = body[_META_LEN:]
    imagic, _, _, _, icompr, _, isize = _SEAL_HEADER.unpack_from(inner)
    if imagic != _SEAL_MAGIC or icompr != _COMPR_NONE or isize > len(inner):
        raise HEDecodeError("unexpected SEAL coefficient array")
    (count,) = struct.unpack_from("<Q", inner, 16)
    if 24 + 8 * count != isize:
        raise HEDecodeError("SEAL coefficient array has a wrong length")
    words = np.frombuffer(inner, dtype="<u8", count=count, offset=24)
    return major, minor, meta, words, inner[isize:]


def _join_ciphertext(major: int, minor: int, meta: bytes, words: np.ndarray, tail: bytes) -> bytes:
    array = struct.pack("<Q", len(words)) + words.astype("<u8").tobytes()
    inner = _SEAL_HEADER.pack(_SEAL_MAGIC, 16, major, minor, _COMPR_NONE, 0, 16 + len(array))
    body = meta + inner + array + tail
    return _SEAL_HEADER.pack(_SEAL_MAGIC, 16, major, minor, _COMPR_NONE, 0, 16 + len(body)) + body


def compact_ciphertexts(
    cts: list[bytes], *, sizes: list[int], scale: float, coeff_bits: int
) -> bytes:
    """Pack SEAL ciphertext bytes (seeded or not, all alike) into the compact wire form.

    Args:
        cts: SEAL ``Ciphertext.save`` bytes, one per ciphertext.
        sizes: Slot count TenSEAL records for each ciphertext.
        scale: The CKKS scale they were encoded at.
        coeff_bits: Bits of the data modulus; every coefficient is below 2**coeff_bits.

    Raises:
        HEDecodeError: If the ciphertexts are malformed or differ in parameters.

    """
    if not cts or len(sizes) != len(cts):
        raise HEDecodeError("a ciphertext vector without ciphertexts")
    parts = [_split_ciphertext(ct) for ct in cts]
    major, minor, meta, first_words, first_tail = parts[0]
    chunks = []
    for p_major, p_minor, p_meta, words, tail in parts:
        if (p_major, p_minor, p_meta) != (major, minor, meta) or len(tail) != len(first_tail):
            raise HEDecodeError("ciphertexts of one vector differ in parameters")
        if words.size != first_words.size or words.size % 64:
            raise HEDecodeError("ciphertexts of one vector differ in size")
        if coeff_bits < 64 and int(words.max()) >> coeff_bits:
            raise HEDecodeError("ciphertext coefficients exceed the data modulus")
        chunks.append(_pack_bits(words, coeff_bits) + tail)
    head = _HEAD.pack(
        _MAGIC, major, minor, coeff_bits, 0, scale, len(cts), len(meta), len(first_tail)
    )
    return head + meta + struct.pack(f"<{len(sizes)}I", *sizes) + b"".join(chunks)


def expand_ciphertexts(data: bytes) -> tuple[list[int], list[bytes], float]:
    """Inverse of :func:`compact_ciphertexts`: slot counts, SEAL ciphertext bytes, scale.

    Raises:
        HEDecodeError: If the bytes are truncated, padded or not in the compact form.

    """
    if len(data) < _HEAD.size:
        raise HEDecodeError(f"ciphertext blob of {len(data)} bytes is too short")
    magic, major, minor, bits, _, scale, n_ct, meta_len, tail_len = _HEAD.unpack_from(data)
    if magic != _MAGIC or not 1 <= bits <= 64 or meta_len != _META_LEN or not 0 < n_ct < 1 << 20:
        raise HEDecodeError("ciphertext blob does not start with a zenfed compact header")
    if tail_len > 4096:
        raise HEDecodeError("ciphertext blob has an impossible seed size")
    pos = _HEAD.size
    meta = data[pos : pos + meta_len]
    pos += meta_len
    if len(data) < pos + 4 * n_ct:
        raise HEDecodeError("ciphertext blob is truncated")
    sizes = list(struct.unpack_from(f"<{n_ct}I", data, pos))
    pos += 4 * n_ct
    size, degree, moduli = struct.unpack_from("<QQQ", meta, 33)
    words = (1 if tail_len else size) * degree * moduli  # seeded: c1 is in the seed
    if words % 64 or words == 0 or words > 1 << 24:
        raise HEDecodeError("ciphertext blob has an impossible ciphertext shape")
    packed = words // 64 * bits * 8
    per_ct = packed + tail_len
    if len(data) != pos + per_ct * n_ct:
        raise HEDecodeError(
            f"ciphertext blob is {len(data)} bytes; {pos + per_ct * n_ct} expected "
            f"for {n_ct} ciphertexts"
        )
    cts = []
    for i in range(n_ct):
        start = pos + i * per_ct
        unpacked = _unpack_bits(data[start : start + packed], bits, words)
        tail = data[start + packed : start + per_ct]
        cts.append(_join_ciphertext(major, minor, meta, unpacked, tail))
    return sizes, cts, scale
