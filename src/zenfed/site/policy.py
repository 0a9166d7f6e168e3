"""Finding and applying a site's own policy: which jobs, models and datasets it admits."""

from __future__ import annotations

import fnmatch
from pathlib import Path

from zenfed.engines.hardware import Hardware
from zenfed.errors import PolicyError
from zenfed.kit_files import KitFolders, find_kit_file
from zenfed.spec import JobSpec, SitePolicy, load_site_policy

POLICY_FILE = "zenfed_site.yaml"
SHA256_PREFIX = "sha256:"


def find_site_policy(*, site: str, site_config_dir: str | Path | None) -> Path:
    """Return the path of a site's policy file.

    A provisioned site keeps it at ``local/zenfed_site.yaml`` in its kit. In the
    simulator, where sites share one ``local/`` folder, it is
    ``local/zenfed_sites/SITE.yaml``.

    Raises:
        PolicyError: If neither exists.
    """
    local = Path(site_config_dir) if site_config_dir else None
    folders = KitFolders(startup=None, local=local, root=local or Path("."), run=Path("."))
    return find_kit_file(
        folders, local=[POLICY_FILE], shared=[f"{site}.yaml"], what=f"site {site!r}'s zenfed site policy",
        hint=f"provision the site with `zenfed provision` or write {POLICY_FILE} into the kit's local/ folder",
        error=PolicyError,
    )


def load_policy_for(*, site: str, site_config_dir: str | Path | None) -> SitePolicy:
    """Load a site's policy and check it belongs to this site."""
    policy = load_site_policy(find_site_policy(site=site, site_config_dir=site_config_dir))
    if policy.site != site:
        raise PolicyError(
            f"the site policy is for {policy.site!r}, but this site is {site!r}; fix its 'site:'"
        )
    return policy


def check_job_allowed(policy: SitePolicy, spec: JobSpec) -> None:
    """Raise PolicyError with the reason if the site's policy refuses this job."""
    if not any(fnmatch.fnmatchcase(spec.name, pattern) for pattern in policy.allowed_jobs):
        raise PolicyError(
            f"job {spec.name!r} is not in this site's allowed_jobs {list(policy.allowed_jobs)}"
        )
    allowed = policy.allowed_base_models
    by_content = any(entry.startswith(SHA256_PREFIX) for entry in allowed)
    if "*" not in allowed and spec.model.base not in allowed and not by_content:
        raise PolicyError(
            f"base model {spec.model.base!r} is not in this site's allowed_base_models {list(allowed)}"
        )
    if not policy.allow_plaintext_release and not spec.encryption.enabled:
        raise PolicyError(
            "this site does not allow its model in the clear (allow_plaintext_release: false), and the job "
            "is not encrypted; run the job with encryption.enabled: true"
        )
    if policy.require_secure_aggregation and not (
            spec.encryption.enabled and spec.encryption.secure_aggregation == "pairwise"):
        raise PolicyError(
            "this site requires pairwise masks inside the encrypted sum (require_secure_aggregation: true), so that "
            "no holder of the CKKS key reads its update alone; run the job with encryption.enabled: true and "
            "encryption.secure_aggregation: pairwise"
        )
    policy.dataset(spec.data.dataset)


def check_base_model(policy: SitePolicy, spec: JobSpec, *, fingerprint: str, model_dir: Path) -> None:
    """Refuse a base model whose content differs from the job's pin or that the site has not approved.

    Args:
        policy: The site's policy.
        spec: The job.
        fingerprint: The SHA-256 of the site's copy (``engines.base_model.model_fingerprint``).
        model_dir: Where that copy is, for the message.

    Raises:
        PolicyError: With the two hashes, or the approved list, and what to do.
    """
    pinned = spec.model.base_sha256
    if pinned is not None and fingerprint != pinned:
        raise PolicyError(
            f"the base model at {model_dir} hashes to {fingerprint}, but the job pins {pinned}: this site's "
            f"copy is not the model the job was written for; install the approved copy or correct the job's "
            f"model.base_sha256"
        )
    allowed = policy.allowed_base_models
    if "*" in allowed or spec.model.base in allowed or f"{SHA256_PREFIX}{fingerprint}" in allowed:
        return
    raise PolicyError(
        f"base model {spec.model.base!r} (content SHA-256 {fingerprint}) is not in this site's "
        f"allowed_base_models {list(allowed)}; approve it by name or as {SHA256_PREFIX}{fingerprint}"
    )


def site_hardware(policy: SitePolicy) -> Hardware:
    """Resolve the site's device, precision and memory options on this machine.

    Raises:
        HardwareError: If they cannot run here, with what to change in the policy.
    """
    return Hardware.for_site(device=policy.device, precision=policy.precision,
                             gradient_checkpointing=policy.gradient_checkpointing,
                             quantization=policy.base_quantization)
