"""Site side of encrypted aggregation: the site's secret context, decrypt the global sum, encrypt an update."""

from __future__ import annotations

from pathlib import Path

from zenfed.errors import PolicyError
from zenfed.kit_files import KitFolders, find_kit_file
from zenfed.privacy.he import (
    SITE_CONTEXT_FILE,
    Encryptor,
    HEDecodeError,
    MaskSource,
    UpdateLayout,
    decrypt_sum,
    fingerprint,
    load_context,
    packing_for,
    seal_envelope,
)
from zenfed.spec import JobSpec
from zenfed.types import AdapterState


def find_site_context(folders: KitFolders) -> Path:
    """The site's secret context: in its kit's startup/, or local/zenfed_sites/ in the simulator.

    Raises:
        PolicyError: If there is none (the site cannot take part in an encrypted job).
    """
    return find_kit_file(
        folders, startup=[SITE_CONTEXT_FILE], shared=[SITE_CONTEXT_FILE], what=f"this site's {SITE_CONTEXT_FILE}",
        hint="the job is encrypted; provision the project with encryption (ProjectSpec.encryption: true)",
        error=PolicyError,
    )


class SiteEncryption:
    """One site's HE state for a job: its secret context and the job's packing."""

    def __init__(self, *, spec: JobSpec, context_path: Path):
        self.spec = spec
        self.context = load_context(context_path, require_secret=True)
        self.packing = packing_for(spec.encryption)
        self.fingerprint = fingerprint(self.context, self.packing)

    def decrypt_global(self, payload: bytes, *, template: AdapterState, total_weight: float | None,
                       contributors: int | None = None) -> AdapterState:
        """Decrypt the summed global and divide by the total weight: the weighted mean adapter.

        Args:
            payload: The summed ciphertexts.
            template: Names and shapes of the global.
            total_weight: The plain total weight; None for a masked sum, which carries its own.
            contributors: How many updates the server says a masked sum holds.

        Raises:
            PolicyError: If a value lies beyond the clip bound every packed update obeys, or a masked
                sum's masks did not cancel: the sum was tampered with, is incomplete, or mixes in
                something that is not a weighted update.
        """
        layout = UpdateLayout.from_update(template)
        try:
            mean = decrypt_sum(payload, context=self.context, packing=self.packing, layout=layout,
                               total_weight=total_weight, contributors=contributors)
        except HEDecodeError as err:
            raise PolicyError(f"refusing the global: {err}") from None
        step = self.packing.step
        if step is not None:
            # Each site clips its values to [-clip, clip] and weights them by w <= 1, so the
            # weighted mean stays within the clip, up to the quantisation steps of the sum.
            bound = self.packing.clip + 2 * step
            worst = max((float(t.abs().max()) for t in mean.values() if t.numel()), default=0.0)
            if not worst <= bound:
                raise PolicyError(
                    f"the decrypted global holds a value of {worst:.4g}, beyond the +/-{self.packing.clip} "
                    "every update is clipped to: the encrypted sum was tampered with or mixes in foreign "
                    "data; refusing it (check the server and the other sites' updates)"
                )
        return mean

    def encrypt(self, adapter: AdapterState, *, weight: float, mask: MaskSource | None = None) -> tuple[bytes, int]:
        """Weight, pack, mask (under pairwise masks) and encrypt the adapter; return the ciphertext and its size."""
        layout = UpdateLayout.from_update(adapter)
        with Encryptor(context=self.context, packing=self.packing) as encryptor:
            return encryptor.encrypt(adapter, weight=weight, layout=layout, mask=mask), layout.n_values

    def encrypt_correction(self, n_values: int, correction: MaskSource) -> tuple[bytes, int]:
        """Encrypt a mask correction the size of an update of ``n_values`` values."""
        if n_values <= 0:
            raise PolicyError("no masked update was sent this round; there is nothing to correct")
        with Encryptor(context=self.context, packing=self.packing) as encryptor:
            return encryptor.encrypt_correction(n_values, correction), n_values

    def envelope(self, ciphertext: bytes, *, n_values: int, job_id: str, round_index: int, site: str) -> bytes:
        """Wrap a ciphertext in the envelope that binds it to job, round, site and HE parameters."""
        return seal_envelope(job=job_id, round=round_index, site=site, fingerprint=self.fingerprint,
                             n_values=n_values, ciphertext=ciphertext)
