"""The regulated project template enforces what it promises; project files reach every policy field."""

from __future__ import annotations

from pathlib import Path

import pytest

from zenfed.errors import PolicyError
from zenfed.site.policy import check_job_allowed
from zenfed.spec import DatasetLocation, SitePolicy, SiteSpec, load_job_spec, load_project_spec

REPO = Path(__file__).resolve().parents[2]


def test_every_regulated_site_refuses_a_job_without_pairwise_masks():
    # Prepare
    project = load_project_spec(REPO / "provisioning" / "regulated-multi-org.yml")
    masked = load_job_spec(REPO / "src" / "zenfed" / "jobs" / "specs" / "demo-lora.yaml").model_copy(
        update={"name": "clinical-notes"})
    data = masked.model_dump(mode="json")
    data["encryption"]["secure_aggregation"] = "none"
    unmasked = type(masked).model_validate(data)

    for site in project.sites:
        where = {"builtin": DatasetLocation(path="/data")}  # the demo job's dataset, at this site
        policy = site.policy().model_copy(update={"allowed_base_models": ("*",), "datasets": where})

        # Execute / Assert: the job under masks passes this check; without masks it is refused
        check_job_allowed(policy, masked)
        with pytest.raises(PolicyError, match="requires pairwise masks"):
            check_job_allowed(policy, unmasked)


def test_a_project_file_can_set_every_site_policy_field():
    assert set(SitePolicy.model_fields) - {"site"} <= set(SiteSpec.model_fields)
