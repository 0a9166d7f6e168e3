"""Canonical JSON and SHA-256: the one encoding that every hash and signature in zenfed is taken over."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from zenfed.errors import ZenfedError


class CanonicalJSONError(ZenfedError, ValueError):
    """A value has no canonical JSON form (NaN or infinity, or a type JSON cannot hold)."""


def canonical_json(data: Any) -> bytes:
    """Serialise ``data`` as canonical JSON bytes (sorted keys, no spaces, UTF-8, finite numbers).

    Raises:
        CanonicalJSONError: If ``data`` holds NaN or infinity (which JSON has no form
            for, so two parties could hash different bytes) or a non-JSON type.

    """
    try:
        text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise CanonicalJSONError(
            f"cannot encode the value as canonical JSON ({exc}); pass only str, int, float, bool, "
            "None, lists and dicts, with finite numbers (replace NaN or infinity with None)"
        ) from exc
    return text.encode("utf-8")


def sha256_hex(data: bytes) -> str:
    """Return the SHA-256 hex digest of ``data``."""
    return hashlib.sha256(data).hexdigest()
