"""Site side of encrypted aggregation: the site's secret context, decrypt the global sum, encrypt an update."""

from __future__ import annotations

from pathlib import Path

from zenfed.errors import PolicyError
from zenfed.kit_files import KitFolders, find_kit_file
from zenfed.privacy.he import (
    SITE_CONTEXT_FILE,
    Encryptor,
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

    def decrypt_global(self, payload: bytes, *, template: AdapterState, total_weight: float) -> AdapterState:
        """Decrypt the summed global and divide by the total weight: the weighted mean adapter.

        Raises:
            PolicyError: If a value lies beyond the clip bound every packed update obeys: the
                sum was tampered with, or mixes in something that is not a weighted update.
        """
        layout = UpdateLayout.from_update(template)
        mean = decrypt_sum(payload, context=self.context, packing=self.packing, layout=layout,
                           total_weight=total_weight)
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

    def encrypt(self, adapter: AdapterState, *, weight: float) -> tuple[bytes, int]:
        """Weight, pack and encrypt the adapter; return the ciphertext and its number of values."""
        layout = UpdateLayout.from_update(adapter)
        with Encryptor(context=self.context, packing=self.packing) as encryptor:
            return encryptor.encrypt(adapter, weight=weight, layout=layout), layout.n_values

    def envelope(self, ciphertext: bytes, *, n_values: int, job_id: str, round_index: int, site: str) -> bytes:
        """Wrap a ciphertext in the envelope that binds it to job, round, site and HE parameters."""
        return seal_envelope(job=job_id, round=round_index, site=site, fingerprint=self.fingerprint,
                             n_values=n_values, ciphertext=ciphertext)
