"""Site-side CKKS encryption and decryption through SEAL's own API (``tenseal.sealapi``).

TenSEAL's vectors encode one real per slot and save the full ciphertext. SEAL
itself can do better for this workload, and TenSEAL ships its bindings:

- complex encoding: a slot holds a complex number, so two reals (real and
  imaginary part), N reals per ciphertext instead of N / 2;
- seeded symmetric encryption: c1 of a secret-key ciphertext is uniform
  randomness, which SEAL saves as the 64-byte seed it came from; the loader
  regenerates it. An upload is thus half a ciphertext.

The server never uses this module: it loads the (seeded) ciphertexts with a
public-only TenSEAL context and adds them there.

The bindings read and write only files, so ciphertexts pass through a private
temporary folder (0700, in /dev/shm when present); the secret key is written
there only for the instant SEAL loads it, then deleted.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from pathlib import Path

import numpy as np
from tenseal import sealapi as sa

from zenfed.privacy.he.context import HEContext
from zenfed.privacy.he.errors import HEDecodeError, HEKeyError
from zenfed.privacy.he.wire import parse_fields


class SealKit:
    """SEAL encoder, encryptor and decryptor for one secret context.

    Call :meth:`close` (or use as a context manager) to remove its temporary folder.
    """

    def __init__(self, context: HEContext) -> None:
        if not context.has_secret_key:
            raise HEKeyError("SEAL encryption needs a site's secret context")
        data = context.tenseal.serialize(
            save_public_key=False, save_secret_key=True, save_galois_keys=False,
            save_relin_keys=False,
        )
        fields = parse_fields(data)  # TenSEALContextProto
        private = parse_fields(_as_bytes(fields.get(3)))  # TenSEALPrivateProto
        shm = Path("/dev/shm")
        self._dir = Path(tempfile.mkdtemp(prefix="zenfed-he-", dir=shm if shm.is_dir() else None))
        self._path = str(self._dir / "ct")
        self._cleanup = weakref.finalize(self, shutil.rmtree, self._dir, True)
        try:
            parms = sa.EncryptionParameters(sa.SCHEME_TYPE.CKKS)
            parms.load(self._write(_as_bytes(fields.get(1))))
            self.seal_context = sa.SEALContext(parms, True, sa.SEC_LEVEL_TYPE.TC128)
            secret = sa.SecretKey()
            secret.load(self.seal_context, self._write(_as_bytes(private.get(1))))
        finally:
            if os.path.exists(self._path):
                os.unlink(self._path)  # the secret key must not stay on disk
        self.encoder = sa.CKKSEncoder(self.seal_context)
        self.encryptor = sa.Encryptor(self.seal_context, secret)
        self.decryptor = sa.Decryptor(self.seal_context, secret)
        self.reals_per_ciphertext = 2 * self.encoder.slot_count()

    def __enter__(self) -> SealKit:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove the temporary folder (also done when the kit is garbage collected)."""
        self._cleanup()

    def _write(self, data: bytes) -> str:
        fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        return self._path

    def encrypt(self, reals: np.ndarray, *, scale: float) -> list[bytes]:
        """Encrypt reals, two per slot, into seeded SEAL ciphertext bytes (zero-padded)."""
        per = self.reals_per_ciphertext
        padded = np.zeros(-(-reals.size // per) * per)
        padded[: reals.size] = reals
        out = []
        for start in range(0, padded.size, per):
            block = padded[start : start + per]
            plain = sa.Plaintext()
            self.encoder.encode((block[0::2] + 1j * block[1::2]).tolist(), scale, plain)
            self.encryptor.encrypt_symmetric(plain).save(self._path)
            with open(self._path, "rb") as handle:
                out.append(handle.read())
        return out

    def decrypt(self, ciphertexts: list[bytes]) -> np.ndarray:
        """Decrypt SEAL ciphertext bytes into reals, two per slot.

        Raises:
            HEDecodeError: If SEAL refuses a ciphertext.

        """
        out = []
        for data in ciphertexts:
            cipher = sa.Ciphertext()
            try:
                cipher.load(self.seal_context, self._write(data))
            except Exception as err:  # SEAL validates parameters and coefficients
                raise HEDecodeError(f"SEAL cannot load a ciphertext: {err}") from None
            plain = sa.Plaintext()
            self.decryptor.decrypt(cipher, plain)
            slots = np.asarray(self.encoder.decode_complex(plain))
            reals = np.empty(2 * slots.size)
            reals[0::2], reals[1::2] = slots.real, slots.imag
            out.append(reals)
        return np.concatenate(out) if out else np.zeros(0)


def _as_bytes(value: bytes | int | None) -> bytes:
    if not isinstance(value, bytes) or not value:
        raise HEKeyError("the TenSEAL context lacks its parameters or secret key")
    return value
