"""Fresh nonces: issued by the verifier, valid for a short time, accepted once."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from zenfed.attestation.records import EvidenceRejected
from zenfed.errors import ZenfedError

NONCE_BYTES = 32


@dataclass(frozen=True)
class _Issued:
    peer: str
    expires_at: float


class NonceRegistry:
    """Issues random nonces for peers and accepts each one once, before it expires.

    A verifier calls ``issue`` before asking a peer for evidence and ``consume``
    when the evidence arrives. ``consume`` refuses a nonce it never issued, one
    issued for another peer, one that has expired, and one already used (a replay).
    Thread-safe: a controller may attest several sites at once.

    Args:
        ttl_s: Seconds a nonce stays valid after it is issued.
        max_outstanding: Most unconsumed nonces kept; the oldest are dropped beyond it.
        clock: Returns the current time in seconds (injectable for tests).

    """

    def __init__(
        self,
        *,
        ttl_s: float = 120.0,
        max_outstanding: int = 10_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if ttl_s <= 0:
            raise ZenfedError(f"nonce ttl_s must be positive, got {ttl_s}; use e.g. 120")
        if max_outstanding < 1:
            raise ZenfedError(f"max_outstanding must be at least 1, got {max_outstanding}")
        self.ttl_s = float(ttl_s)
        self._max = max_outstanding
        self._clock = clock
        self._issued: dict[str, _Issued] = {}
        self._used: dict[str, float] = {}  # nonce -> time it may be forgotten
        self._lock = threading.Lock()

    def issue(self, *, peer: str) -> str:
        """Return a fresh random nonce (64 hex characters) for ``peer``."""
        nonce = secrets.token_hex(NONCE_BYTES)
        now = self._clock()
        with self._lock:
            self._prune(now)
            while len(self._issued) >= self._max:
                self._issued.pop(next(iter(self._issued)))
            self._issued[nonce] = _Issued(peer, now + self.ttl_s)
        return nonce

    def consume(self, *, nonce: str, peer: str) -> None:
        """Accept ``nonce`` from ``peer`` once.

        Raises:
            EvidenceRejected: If the nonce was never issued, was issued for another
                peer, has expired, or was already used; the message says which.

        """
        now = self._clock()
        with self._lock:
            if nonce in self._used:
                raise EvidenceRejected(
                    f"nonce {nonce[:16]}... was already used: replayed evidence is refused; "
                    "ask for fresh evidence with a new nonce"
                )
            issued = self._issued.pop(nonce, None)
            if issued is None:
                raise EvidenceRejected(
                    f"nonce {nonce[:16]}... was not issued by this verifier (or was dropped); "
                    "evidence must answer a nonce this verifier issued"
                )
            self._used[nonce] = max(issued.expires_at, now) + self.ttl_s
            if issued.peer != peer:
                raise EvidenceRejected(
                    f"nonce {nonce[:16]}... was issued for {issued.peer!r}, not {peer!r}"
                )
            if now > issued.expires_at:
                raise EvidenceRejected(
                    f"evidence expired: nonce {nonce[:16]}... expired "
                    f"{now - issued.expires_at:.1f} s ago (valid {self.ttl_s:.0f} s); "
                    "ask for fresh evidence"
                )
            self._prune(now)

    def _prune(self, now: float) -> None:
        for key in [k for k, v in self._issued.items() if v.expires_at + self.ttl_s < now]:
            del self._issued[key]
        for key in [k for k, t in self._used.items() if t < now]:
            del self._used[key]


class SeenNonces:
    """Remembers nonces chosen by attesters, to refuse replays where no nonce was issued.

    FLARE's own CC flow has no verifier nonce: the attester picks one. This set
    refuses the same nonce twice within ``window_s``; older evidence is refused
    anyway by its age check, so forgetting it after the window is safe.
    """

    def __init__(self, *, window_s: float, clock: Callable[[], float] = time.time) -> None:
        self._window = float(window_s)
        self._clock = clock
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()

    def check_and_add(self, *, nonce: str) -> None:
        """Record ``nonce``; raise EvidenceRejected if it was seen within the window."""
        now = self._clock()
        with self._lock:
            for key in [k for k, t in self._seen.items() if t < now]:
                del self._seen[key]
            if nonce in self._seen:
                raise EvidenceRejected(
                    f"nonce {nonce[:16]}... was already seen: replayed evidence is refused"
                )
            self._seen[nonce] = now + 2 * self._window
