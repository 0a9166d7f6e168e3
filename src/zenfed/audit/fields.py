"""Checks that keep secrets and bulk data out of audit records.

A record says *that* something happened and names it by hash and size; it never
carries the thing itself. So values must be small plain JSON, and names that
suggest a secret are refused outright rather than trusted to hold something safe.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping
from typing import Any

from zenfed.audit.errors import AuditError

MAX_STRING = 4096
"""Longest string value allowed in a record (a PEM certificate fits; a dataset does not)."""
MAX_ITEMS = 1024
"""Most items in one list or dict value."""
MAX_FIELDS_BYTES = 65536
"""Largest canonical size of one record's fields."""

_SECRET_WORDS = frozenset(
    {"key", "keys", "secret", "secrets", "password", "passwords", "passwd", "pwd", "passphrase",
     "token", "credential", "credentials", "privkey", "apikey", "seckey"}
)
_SECRET_SUBSTRINGS = ("secret", "password", "passwd", "passphrase", "privatekey", "apikey")


def _words(name: str) -> list[str]:
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", name)
    return [w.lower() for w in re.split(r"[^A-Za-z0-9]+", spaced) if w]


def is_secret_name(name: str) -> bool:
    """Return True if a field name looks like it would hold a secret.

    A name is refused if one of its words (split at ``_``, ``-``, ``.`` and camelCase)
    is key, secret, password, token, credential and the like, or if it contains
    secret/password/passphrase anywhere. ``num_tokens`` passes (the word is
    "tokens", a count); ``api_key``, ``private_key_pem`` and ``authToken`` do not.
    """
    words = _words(name)
    joined = "".join(words)
    return any(w in _SECRET_WORDS for w in words) or any(s in joined for s in _SECRET_SUBSTRINGS)


def clean_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Return a plain-JSON copy of ``fields``, or raise AuditError naming the bad field.

    Numbers from numpy and the like are converted to int or float; bytes, long
    strings, long lists, non-finite numbers, secret-looking names and objects of
    other types are refused.
    """
    out = {}
    for name, value in fields.items():
        out[_check_name(name, name)] = _clean(value, name, depth=0)
    return out


def _check_name(name: Any, where: str) -> str:
    if not isinstance(name, str):
        raise AuditError(f"audit field name {name!r} at '{where}' is not a string")
    if is_secret_name(name):
        raise AuditError(
            f"audit field '{where}' looks like it holds a secret; records must never hold keys, "
            "secrets, passwords or tokens: record a fingerprint under a neutral name "
            "(e.g. 'cert_sha256') instead"
        )
    return name


def _clean(value: Any, where: str, *, depth: int) -> Any:
    if depth > 8:
        raise AuditError(f"audit field '{where}' nests deeper than 8 levels; flatten it")
    if value is None or isinstance(value, bool | str):
        if isinstance(value, str) and len(value) > MAX_STRING:
            raise AuditError(
                f"audit field '{where}' is a string of {len(value)} characters (limit "
                f"{MAX_STRING}); record a hash and a size instead of bulk content"
            )
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        raise AuditError(
            f"audit field '{where}' is bytes; records never hold payloads: record its SHA-256 "
            "and size instead"
        )
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        number = float(value)
        if not math.isfinite(number):
            raise AuditError(f"audit field '{where}' is {number}; record a finite number or None")
        return number
    if isinstance(value, Mapping):
        _check_size(value, where)
        return {
            _check_name(k, f"{where}.{k}"): _clean(v, f"{where}.{k}", depth=depth + 1)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        _check_size(value, where)
        return [_clean(v, f"{where}[{i}]", depth=depth + 1) for i, v in enumerate(value)]
    raise AuditError(
        f"audit field '{where}' is a {type(value).__name__}; use str, int, float, bool, None, "
        "list or dict"
    )


def _check_size(value: Any, where: str) -> None:
    if len(value) > MAX_ITEMS:
        raise AuditError(
            f"audit field '{where}' has {len(value)} items (limit {MAX_ITEMS}); records hold "
            "summaries, not bulk data"
        )
