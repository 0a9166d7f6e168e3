"""Pairwise masks that cancel in the encrypted sum, so no key holder can read one site's update.

Every site of a job makes its own X25519 key pair at the site and announces the
public half signed with its provisioned certificate. For each round, each pair
of sites in the round's cohort derives one seed from their X25519 shared secret
with HKDF-SHA256, bound to the job, the round and the two names, and expands it
with ChaCha20 into a mask stream, uniform modulo M = 2^mask_bits. The site whose
name sorts first adds the stream to its packed update, the other subtracts it::

    sent_i = (packed_i + sum_{j > i} s_ij - sum_{j < i} s_ij) mod M

so each ``sent_i`` is a one-time pad of ``packed_i`` and, summed over the whole
cohort, the masks cancel: ``sum_i sent_i mod M = sum_i packed_i``. The CKKS key
alone opens a site's ciphertext to uniform noise; reading ``packed_i`` also takes
the seeds ``s_ij`` of every other site of the round.

A site of the cohort that does not answer leaves its pair masks in the sum.
Each survivor then sends one encrypted correction, ``-(sign * s_id)`` summed over
the dropped sites ``d``, and the sum cancels again (see docs/he.md for what this
costs and what it exposes).

The packing that leaves room for the masks is ``PackingConfig(masked=True)``
(``zenfed.privacy.he.params``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from zenfed.atomic import atomic_write_bytes
from zenfed.digest import canonical_json
from zenfed.errors import ZenfedError

KEY_FILE = "pairwise_x25519.key"
KEY_STATEMENT_FORMAT = "zenfed-pairwise-key/1"
_SEED_INFO = "zenfed-pairwise-mask/1"
_ZERO_NONCE = bytes(16)  # each seed is used for one stream only


class PairwiseError(ZenfedError):
    """A pairwise key is missing, malformed or unsigned, or a cohort or dropout claim does not add up."""


def load_or_create_key(folder: Path) -> X25519PrivateKey:
    """This site's X25519 key for a job: read from ``folder`` or made there (0600 file, 0700 folder).

    Raises:
        PairwiseError: If a key file exists but cannot be read.
    """
    path = folder / KEY_FILE
    if path.is_file():
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (ValueError, TypeError, OSError) as err:
            raise PairwiseError(f"{path} is not a readable X25519 key ({err}); delete it and rerun the job, "
                                "the site then announces a new key") from None
        if not isinstance(key, X25519PrivateKey):
            raise PairwiseError(f"{path} holds a {type(key).__name__}, not an X25519 key; delete it")
        return key
    key = X25519PrivateKey.generate()
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.chmod(0o700)
    atomic_write_bytes(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    return key


def public_key_text(key: X25519PrivateKey) -> str:
    """The public half of ``key`` as base64 of its 32 raw bytes (what a site announces)."""
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def parse_public_key(text: object, *, site: str) -> X25519PublicKey:
    """Read an announced public key.

    Raises:
        PairwiseError: If it is not base64 of 32 bytes.
    """
    try:
        raw = base64.b64decode(str(text), validate=True)
        if len(raw) != 32:
            raise ValueError(f"{len(raw)} bytes")
        return X25519PublicKey.from_public_bytes(raw)
    except (binascii.Error, ValueError) as err:
        raise PairwiseError(f"the pairwise key announced for {site} is not a 32-byte X25519 key ({err})") from None


def key_fingerprint(text: str) -> str:
    """SHA-256 of an announced public key (what the audit logs record)."""
    return hashlib.sha256(text.encode()).hexdigest()


def key_statement(*, job_id: str, site: str, public_key: str) -> bytes:
    """The bytes a site signs with its provisioned key to announce its pairwise key for a job."""
    return canonical_json({"format": KEY_STATEMENT_FORMAT, "job": job_id, "site": site, "public_key": public_key})


def check_cohort(cohort: Sequence[str], *, site: str, max_sites: int) -> list[str]:
    """The round's cohort, sorted; it must name this site and fit the packing's headroom.

    Raises:
        PairwiseError: If the cohort is empty, repeats a site, lacks this site or exceeds ``max_sites``.
    """
    members = sorted(str(s) for s in cohort)
    if len(set(members)) != len(members) or site not in members:
        raise PairwiseError(f"the round's cohort {members} repeats a site or does not name {site}")
    if len(members) > max_sites:
        raise PairwiseError(f"the round's cohort has {len(members)} sites; the packing has headroom for "
                            f"encryption.max_sites={max_sites}: raise max_sites in the job spec or use cohorts")
    return members


class PairwiseMasker:
    """One site's masks for one round: its key, the cohort's public keys, the job and the round.

    Args:
        key: This site's X25519 private key.
        site: This site's name.
        peers: Public keys of the cohort's other sites, by name.
        job_id: The job.
        round_index: The round.
    """

    def __init__(self, *, key: X25519PrivateKey, site: str, peers: Mapping[str, X25519PublicKey], job_id: str,
                 round_index: int) -> None:
        if site in peers:
            raise PairwiseError(f"{site} cannot mask with itself")
        self.site = site
        self.job_id = job_id
        self.round = round_index
        self._shared = {peer: key.exchange(public) for peer, public in peers.items()}

    @property
    def peers(self) -> list[str]:
        """The other sites of the cohort."""
        return sorted(self._shared)

    def _seed(self, peer: str) -> bytes:
        first, second = sorted((self.site, peer))
        info = canonical_json({"format": _SEED_INFO, "job": self.job_id, "round": self.round,
                               "pair": [first, second]})
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(self._shared[peer])

    def _signed_streams(self, peers: Sequence[str], count: int, bits: int) -> np.ndarray:
        total = np.zeros(count, dtype=np.uint64)
        for peer in peers:
            stream = mask_stream(self._seed(peer), count=count, bits=bits)
            total = total + stream if self.site < peer else total - stream  # uint64 wraps: exact mod 2^bits
        return total & np.uint64((1 << bits) - 1)

    def mask(self, count: int, bits: int) -> np.ndarray:
        """This site's mask: ``count`` values uniform in [0, 2^bits), summing to 0 over the cohort."""
        return self._signed_streams(self.peers, count, bits)

    def correction(self, dropped: Sequence[str]) -> CorrectionMask:
        """What this site adds to cancel its masks with the ``dropped`` sites.

        Raises:
            PairwiseError: If a dropped site is not one of this round's peers.
        """
        unknown = sorted(set(dropped) - set(self._shared))
        if unknown or not dropped:
            raise PairwiseError(f"a correction was asked for {sorted(dropped)}; {unknown or 'none'} "
                                f"are not other sites of round {self.round}'s cohort")
        return CorrectionMask(self, sorted(dropped))


class CorrectionMask:
    """The negated share of a site's mask that it holds with the dropped sites (a ``MaskSource``)."""

    def __init__(self, masker: PairwiseMasker, dropped: list[str]) -> None:
        self.masker = masker
        self.dropped = dropped

    def __call__(self, count: int, bits: int) -> np.ndarray:
        """``-(sum over dropped d of sign * s_id) mod 2^bits``."""
        share = self.masker._signed_streams(self.dropped, count, bits)
        return (np.uint64(0) - share) & np.uint64((1 << bits) - 1)


def mask_stream(seed: bytes, *, count: int, bits: int) -> np.ndarray:
    """``count`` values uniform in [0, 2^bits) from ChaCha20 keyed by ``seed`` (bits <= 64)."""
    if not 1 <= bits <= 64:
        raise PairwiseError(f"mask bits must be 1..64, got {bits}")
    encryptor = Cipher(algorithms.ChaCha20(seed, _ZERO_NONCE), mode=None).encryptor()
    words = np.frombuffer(encryptor.update(bytes(8 * count)), dtype="<u8").astype(np.uint64)
    return words & np.uint64((1 << bits) - 1) if bits < 64 else words
