"""A FLARE result filter that tampers with a site's signed update after it left the site session.

Copied into one site kit's ``local/custom/`` (FLARE's folder for site-level
code) and named in its ``local/privacy.json`` by the fault tests: it stands
for anything between the site session and the server that changes bytes and
recomputes every hash it can (a compromised filter, relay or disk). It flips
one bit in the middle of a training update's payload and rewrites the
payload's SHA-256 in the header; it cannot forge the site's signature.
"""

from __future__ import annotations

import hashlib

from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable

from zenfed import protocol as P


class FlipABitAndRehash(Filter):
    """Flips one bit of every signed training update's payload; recomputes the payload hash."""

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        """Tamper with a training answer that carries a signed payload; pass anything else on."""
        if fl_ctx.get_prop(FLContextKey.TASK_NAME) != P.TASK_TRAIN:
            return shareable
        header, payload = shareable.get(P.KEY_HEADER), shareable.get(P.KEY_PAYLOAD)
        if not isinstance(header, dict) or not payload or P.H_SIGNATURE not in header:
            return shareable
        forged = bytearray(payload)
        forged[len(forged) // 2] ^= 0x01
        shareable[P.KEY_PAYLOAD] = bytes(forged)
        header[P.H_PAYLOAD_SHA256] = hashlib.sha256(bytes(forged)).hexdigest()
        return shareable
