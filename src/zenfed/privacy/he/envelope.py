r"""The envelope around one site's encrypted update: a JSON header and the raw ciphertext.

Wire form (no pickle)::

    b"ZFEV1\\n" | u32 header length | header JSON (UTF-8) | u64 ciphertext length | ciphertext

The header names the job, round, site, HE parameter fingerprint, number of
values and the SHA-256 of the ciphertext bytes. :func:`open_envelope` checks all
of them and raises one typed error per failure, so the server can log the reason
and skip the update without aborting the round.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import asdict, dataclass

from zenfed.privacy.he.errors import (
    HashMismatchError,
    LengthMismatchError,
    ParameterMismatchError,
    ReplayError,
    SiteMismatchError,
    UndecodableEnvelopeError,
)

_MAGIC = b"ZFEV1\n"
_FORMAT = "zenfed-he-envelope/1"
_MAX_HEADER = 64 * 1024









@dataclass(frozen=True)
class EnvelopeHeader:
    """What the server checks before it adds an update."""

    job: str
    round: int
    site: str
    fingerprint: str
    n_values: int
    sha256: str


def seal_envelope(
    *, job: str, round: int, site: str, fingerprint: str, n_values: int, ciphertext: bytes
) -> bytes:
    """Wrap a ciphertext blob in an envelope.

    Args:
        job: Job id.
        round: Round number the update belongs to.
        site: Name of the sending site.
        fingerprint: ``zenfed.privacy.he.fingerprint`` of the context and packing.
        n_values: Number of update values encrypted.
        ciphertext: The ciphertext blob.

    """
    header = EnvelopeHeader(
        job=job,
        round=int(round),
        site=site,
        fingerprint=fingerprint,
        n_values=int(n_values),
        sha256=hashlib.sha256(ciphertext).hexdigest(),
    )
    text = json.dumps({"format": _FORMAT, **asdict(header)}, sort_keys=True).encode()
    return b"".join(
        [_MAGIC, struct.pack("<I", len(text)), text, struct.pack("<Q", len(ciphertext)), ciphertext]
    )


def read_envelope(data: bytes) -> tuple[EnvelopeHeader, bytes]:
    """Parse an envelope without checking it against a round.

    Raises:
        UndecodableEnvelopeError: If the bytes are not a well-formed envelope.

    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise UndecodableEnvelopeError(f"envelope must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if not data.startswith(_MAGIC) or len(data) < len(_MAGIC) + 4:
        raise UndecodableEnvelopeError("not a zenfed HE envelope (bad magic); check the sender")
    pos = len(_MAGIC)
    (size,) = struct.unpack_from("<I", data, pos)
    pos += 4
    if size > _MAX_HEADER or len(data) < pos + size + 8:
        raise UndecodableEnvelopeError("envelope header is truncated or too large")
    try:
        raw = json.loads(data[pos : pos + size].decode("utf-8"))
        if raw.pop("format") != _FORMAT:
            raise ValueError("unknown format")
        header = EnvelopeHeader(**raw)
        if not all(isinstance(getattr(header, f), str) for f in ("job", "site", "fingerprint")):
            raise ValueError("job, site and fingerprint must be strings")
        if not all(type(getattr(header, f)) is int for f in ("round", "n_values")):
            raise ValueError("round and n_values must be integers")
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise UndecodableEnvelopeError(f"envelope header is not valid: {err}") from None
    pos += size
    (length,) = struct.unpack_from("<Q", data, pos)
    pos += 8
    if len(data) != pos + length:
        raise UndecodableEnvelopeError(
            f"envelope carries {len(data) - pos} ciphertext bytes, its header says {length}"
        )
    return header, data[pos:]


def open_envelope(
    data: bytes,
    *,
    job: str,
    round: int,
    fingerprint: str,
    n_values: int,
    site: str | None = None,
    ciphertext_bytes: int | None = None,
) -> tuple[EnvelopeHeader, bytes]:
    """Parse and check an envelope for the current round; return its header and ciphertext.

    Args:
        data: Envelope bytes as received.
        job: The running job's id.
        round: The current round.
        fingerprint: The server's own fingerprint of context and packing.
        n_values: Values the round's update layout has.
        site: The authenticated sender, if known; must match the header.
        ciphertext_bytes: Exact ciphertext size expected, if known.

    Raises:
        UndecodableEnvelopeError: Bytes that do not parse.
        ParameterMismatchError: Another parameter set or key.
        LengthMismatchError: Another number of values or ciphertext size.
        ReplayError: Another job or round.
        SiteMismatchError: Header site differs from the sender.
        HashMismatchError: Ciphertext altered after sealing.

    """
    header, ciphertext = read_envelope(data)
    if header.job != job or header.round != round:
        raise ReplayError(
            f"update from {header.site!r} is for job {header.job!r} round {header.round}, "
            f"but this is job {job!r} round {round}; dropping it"
        )
    if site is not None and header.site != site:
        raise SiteMismatchError(f"update sent by {site!r} claims to come from {header.site!r}")
    if header.fingerprint != fingerprint:
        raise ParameterMismatchError(
            f"update from {header.site!r} has HE fingerprint {header.fingerprint[:16]}..., "
            f"the server's is {fingerprint[:16]}...; the site's kit or job config differs"
        )
    if header.n_values != n_values:
        raise LengthMismatchError(
            f"update from {header.site!r} has {header.n_values} values, "
            f"the round expects {n_values}"
        )
    if ciphertext_bytes is not None and len(ciphertext) != ciphertext_bytes:
        raise LengthMismatchError(
            f"update from {header.site!r} has {len(ciphertext)} ciphertext bytes, "
            f"{ciphertext_bytes} expected"
        )
    if hashlib.sha256(ciphertext).hexdigest() != header.sha256:
        raise HashMismatchError(
            f"update from {header.site!r}: ciphertext SHA-256 does not match its header; "
            "it was altered in transit"
        )
    return header, ciphertext
