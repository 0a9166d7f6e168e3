"""CKKS contexts: make a secret one (sites), derive a public-only one (server), save and load.

A context file is ``b"ZFHECTX1"``, a u32 length, a JSON header (key id, ring
parameters, whether it holds the secret key), then TenSEAL's own context bytes.
The key id, fixed when the secret key is made, tells two contexts with equal
parameters but different keys apart, so their ciphertexts are never summed.
Loading checks the header against the TenSEAL context it describes and refuses
anything below 128-bit security.
"""

from __future__ import annotations

import json
import os
import secrets
import struct
from dataclasses import dataclass
from pathlib import Path

import tenseal as ts

from zenfed.privacy.he.errors import HEError, HEKeyError
from zenfed.privacy.he.params import HEParams, require_security

SITE_CONTEXT_FILE = "zenfed_he_site.context"
"""File name of the secret context in a site kit's startup/ folder."""
SERVER_CONTEXT_FILE = "zenfed_he_server.context"
"""File name of the public-only context in the server kit's startup/ folder."""

_MAGIC = b"ZFHECTX1"
_FORMAT = "zenfed-he-context/1"


@dataclass(frozen=True)
class HEContext:
    """A TenSEAL CKKS context with its parameters and key id.

    Attributes:
        tenseal: The TenSEAL context.
        params: Ring parameters.
        key_id: Random hex id of the secret key this context belongs to.

    """

    tenseal: ts.Context
    params: HEParams
    key_id: str

    @property
    def has_secret_key(self) -> bool:
        """Whether this context can decrypt."""
        return bool(self.tenseal.has_secret_key())

    @property
    def security_bits(self) -> int:
        """Security level of the loaded ring, per the HE standard table."""
        return context_security_bits(self.tenseal)


def context_security_bits(context: ts.Context) -> int:
    """Return the security level of a TenSEAL context from its actual N and modulus.

    Raises:
        HESecurityError: If it is below 128 bits.

    """
    key_data = context.seal_context().data.key_context_data()
    return require_security(
        poly_modulus_degree=key_data.parms().poly_modulus_degree(),
        total_modulus_bits=key_data.total_coeff_modulus_bit_count(),
    )


def make_secret_context(*, params: HEParams | None = None) -> HEContext:
    """Make a new CKKS context holding a fresh secret key (for sites).

    Encryption is symmetric (with the secret key): only key holders encrypt. No
    relinearisation or Galois keys are made; the workload only adds.
    """
    params = params or HEParams()
    context = ts.context(
        ts.SCHEME_TYPE.CKKS,
        poly_modulus_degree=params.poly_modulus_degree,
        coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
        encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC,
    )
    context_security_bits(context)
    return HEContext(tenseal=context, params=params, key_id=secrets.token_hex(16))


def make_public_context(context: HEContext) -> HEContext:
    """Return a copy of ``context`` without its secret key (for the server)."""
    data = context.tenseal.serialize(
        save_public_key=False, save_secret_key=False, save_galois_keys=False, save_relin_keys=False
    )
    public = ts.context_from(data)
    if public.has_secret_key():
        raise HEKeyError("a public-only context still holds a secret key; this is a bug")
    return HEContext(tenseal=public, params=context.params, key_id=context.key_id)


def context_to_bytes(context: HEContext) -> bytes:
    """Serialise a context with its header; the secret key is kept if the context has one."""
    secret = context.has_secret_key
    body = context.tenseal.serialize(
        save_public_key=False, save_secret_key=secret, save_galois_keys=False, save_relin_keys=False
    )
    header = json.dumps(
        {
            "format": _FORMAT,
            "key_id": context.key_id,
            "poly_modulus_degree": context.params.poly_modulus_degree,
            "coeff_mod_bit_sizes": list(context.params.coeff_mod_bit_sizes),
            "has_secret_key": secret,
        },
        sort_keys=True,
    ).encode()
    return _MAGIC + struct.pack("<I", len(header)) + header + body


def context_from_bytes(data: bytes, *, source: str = "context bytes") -> HEContext:
    """Load a context serialised by :func:`context_to_bytes`.

    Raises:
        HEError: If the bytes are not a zenfed context or disagree with their header.
        HESecurityError: If the context is below 128-bit security.

    """
    header, body = _split(data, source)
    try:
        params = HEParams(
            poly_modulus_degree=int(header["poly_modulus_degree"]),
            coeff_mod_bit_sizes=tuple(int(b) for b in header["coeff_mod_bit_sizes"]),
        )
        key_id = str(header["key_id"])
    except (KeyError, TypeError, ValueError) as err:
        raise HEError(f"{source}: context header is incomplete ({err}); re-provision") from None
    try:
        context = ts.context_from(body)
    except Exception as err:  # TenSEAL raises bare ValueError/RuntimeError on bad bytes
        raise HEError(f"{source}: TenSEAL cannot read the context ({err}); re-provision") from None
    context_security_bits(context)
    key_data = context.seal_context().data.key_context_data()
    degree = key_data.parms().poly_modulus_degree()
    total = key_data.total_coeff_modulus_bit_count()
    expected = sum(params.coeff_mod_bit_sizes)
    low = expected - len(params.coeff_mod_bit_sizes)  # a product of k primes loses < k bits
    if degree != params.poly_modulus_degree or not low < total <= expected:
        raise HEError(
            f"{source}: header says N={params.poly_modulus_degree} with {expected} modulus bits, "
            f"the context has N={degree} with {total}; the file was altered, re-provision"
        )
    return HEContext(tenseal=context, params=params, key_id=key_id)


def _split(data: bytes, source: str) -> tuple[dict, bytes]:
    if not data.startswith(_MAGIC) or len(data) < len(_MAGIC) + 4:
        raise HEError(f"{source} is not a zenfed HE context file; provision it with zenfed")
    (size,) = struct.unpack_from("<I", data, len(_MAGIC))
    start = len(_MAGIC) + 4
    try:
        header = json.loads(data[start : start + size])
    except ValueError:
        raise HEError(f"{source}: context header is not JSON; re-provision") from None
    if not isinstance(header, dict) or header.get("format") != _FORMAT:
        raise HEError(f"{source}: unknown context format; re-provision with this zenfed version")
    return header, data[start + size :]


def save_context(context: HEContext, path: str | Path) -> Path:
    """Write a context file readable by its owner only (0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = context_to_bytes(context)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(path, 0o600)
    return path


def load_context(path: str | Path, *, require_secret: bool | None = None) -> HEContext:
    """Load a context file.

    Args:
        path: The file written by :func:`save_context`.
        require_secret: True to demand the secret key (sites), False to refuse it (server).

    Raises:
        HEError: If the file is missing or not a zenfed context.
        HESecurityError: If the context is below 128-bit security.
        HEKeyError: If the secret key is present or absent against ``require_secret``.

    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise HEError(f"cannot read HE context {path}: {err.strerror}; check the kit") from None
    context = context_from_bytes(data, source=str(path))
    if require_secret is True and not context.has_secret_key:
        raise HEKeyError(f"{path} holds no secret key; sites need their kit's secret context")
    if require_secret is False and context.has_secret_key:
        raise HEKeyError(f"{path} holds a secret key; the server must only get the public context")
    return context


def context_has_secret_key(path_or_ctx: str | Path | HEContext | ts.Context) -> bool:
    """Return whether a context, or the file at a path, holds a CKKS secret key.

    Files that are plain TenSEAL contexts are checked too; any other file gives False.
    """
    if isinstance(path_or_ctx, HEContext):
        return path_or_ctx.has_secret_key
    if isinstance(path_or_ctx, ts.Context):
        return bool(path_or_ctx.has_secret_key())
    data = Path(path_or_ctx).read_bytes()
    if data.startswith(_MAGIC):
        _, body = _split(data, str(path_or_ctx))
    else:
        body = data
    try:
        return bool(ts.context_from(body).has_secret_key())
    except Exception:  # not a TenSEAL context at all
        return False
