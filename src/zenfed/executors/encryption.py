"""Site side of encrypted aggregation: decrypt the global sum, weight and encrypt the update."""

from __future__ import annotations

from pathlib import Path

from zenfed.errors import PolicyError
from zenfed.privacy.he.ckks import Encryptor, UpdateLayout, decrypt_sum, fingerprint
from zenfed.privacy.he.context import SITE_CONTEXT_FILE, load_context
from zenfed.privacy.he.envelope import seal_envelope
from zenfed.privacy.he.params import packing_for
from zenfed.spec import JobSpec
from zenfed.types import AdapterState

SHARED_CONTEXT_DIR = "zenfed_sites"  # the simulator's shared local/ folder, as for site policies


def find_site_context(startup_dir: str | None, local_dir: str | None) -> Path:
    """The site's secret context: in its kit's startup/, or local/zenfed_sites/ in the simulator.

    Raises:
        PolicyError: If there is none (the site cannot take part in an encrypted job).
    """
    candidates = []
    if startup_dir:
        candidates.append(Path(startup_dir) / SITE_CONTEXT_FILE)
    if local_dir:
        candidates.append(Path(local_dir) / SHARED_CONTEXT_DIR / SITE_CONTEXT_FILE)
    for path in candidates:
        if path.is_file():
            return path
    raise PolicyError(
        f"the job is encrypted but this site has no {SITE_CONTEXT_FILE}; provision the project with "
        f"encryption (ProjectSpec.encryption: true)"
    )


class SiteEncryption:
    """One site's HE state for a job: its secret context and the job's packing."""

    def __init__(self, *, spec: JobSpec, context_path: Path):
        self.spec = spec
        self.context = load_context(context_path, require_secret=True)
        self.packing = packing_for(spec.encryption)
        self.fingerprint = fingerprint(self.context, self.packing)

    def weight(self, num_examples: int) -> float:
        """The weight this site applies before encrypting, in (0, 1]."""
        if self.spec.federation.weighting == "uniform":
            return 1.0
        return min(num_examples / self.spec.encryption.weight_unit, 1.0)

    def decrypt_global(self, payload: bytes, *, template: AdapterState, total_weight: float) -> AdapterState:
        """Decrypt the summed global and divide by the total weight: the weighted mean adapter."""
        layout = UpdateLayout.from_update(template)
        return decrypt_sum(payload, context=self.context, packing=self.packing, layout=layout,
                           total_weight=total_weight)

    def encrypt_update(self, adapter: AdapterState, *, weight: float, job_id: str, round_index: int,
                       site: str) -> bytes:
        """Weight, pack and encrypt the adapter; return the envelope that goes to the server."""
        layout = UpdateLayout.from_update(adapter)
        with Encryptor(context=self.context, packing=self.packing) as encryptor:
            ciphertext = encryptor.encrypt(adapter, weight=weight, layout=layout)
        return seal_envelope(job=job_id, round=round_index, site=site, fingerprint=self.fingerprint,
                             n_values=layout.n_values, ciphertext=ciphertext)
