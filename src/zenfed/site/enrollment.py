"""What a site declares about itself once per job: compute, data, availability, as far as its policy allows.

The profile is sent in the clear, so the site's policy decides each part of it
(``enrollment`` in ``local/zenfed_site.yaml``): nothing is sent with
``disclose: false``; the record count of the job's dataset (and, for a DPO job,
the pair count of its preference set) only with ``disclose_record_counts``;
domain tags only those listed. The compute fields
come from ``zenfed site probe``. The server uses profiles to match cohorts to a
job's ``federation.cohort_requirements`` and records them for the report.
"""

from __future__ import annotations

from typing import Any

from zenfed.errors import ZenfedError
from zenfed.spec import JobSpec, SitePolicy

WITHHELD = {"withheld": True}
_COMPUTE = ("device", "device_count", "memory_gib", "steps_per_minute", "probed_at", "availability_utc")


def enrollment_profile(policy: SitePolicy, spec: JobSpec) -> dict[str, Any]:
    """The profile this site discloses for ``spec``: only what its policy allows.

    Args:
        policy: The site's policy.
        spec: The job (its dataset is the one whose records are counted).

    Returns:
        Plain data; ``{"withheld": True}`` when the policy discloses nothing.
    """
    declared = policy.enrollment
    if not declared.disclose:
        return dict(WITHHELD)
    profile: dict[str, Any] = {name: getattr(declared, name) for name in _COMPUTE
                               if getattr(declared, name) is not None}
    if declared.domain_tags:
        profile["domain_tags"] = sorted(declared.domain_tags)
    if declared.disclose_record_counts:
        records = count_training_records(policy, spec.data.dataset)
        if records is not None:
            profile["records"] = records
        pairs = count_training_records(policy, spec.dpo.dataset) if spec.objective == "dpo" else None
        if pairs is not None:
            profile["preference_pairs"] = pairs
    return profile


def count_training_records(policy: SitePolicy, dataset: str) -> int | None:
    """Non-empty lines of ``dataset``'s training file at this site, or None if it cannot be read (yet)."""
    try:
        location = policy.dataset(dataset)
        with (location.path / location.train).open("rb") as rows:
            return sum(1 for line in rows if line.strip())
    except (OSError, ValueError, ZenfedError):
        return None
