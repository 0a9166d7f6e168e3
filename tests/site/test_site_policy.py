"""A site's policy: found in its kit (or the simulator's shared folder), and it can refuse a job."""

from __future__ import annotations

import pytest
import yaml

from zenfed.errors import PolicyError, SpecError
from zenfed.kit_files import SHARED_SITE_DIR as SHARED_POLICY_DIR
from zenfed.site.policy import (
    POLICY_FILE,
    check_job_allowed,
    find_site_policy,
    load_policy_for,
)
from zenfed.spec import DatasetLocation, JobSpec, SitePolicy


def write_policy(path, **data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_kit_policy_is_found_before_a_shared_one(tmp_path):
    # Prepare
    kit = write_policy(tmp_path / POLICY_FILE, site="site-1")
    write_policy(tmp_path / SHARED_POLICY_DIR / "site-1.yaml", site="site-1")

    # Execute / Assert
    assert find_site_policy(site="site-1", site_config_dir=str(tmp_path)) == kit


def test_the_simulators_shared_folder_holds_one_policy_per_site(tmp_path):
    # Prepare
    write_policy(tmp_path / SHARED_POLICY_DIR / "site-1.yaml", site="site-1", torch_threads=1)
    write_policy(tmp_path / SHARED_POLICY_DIR / "site-2.yaml", site="site-2", torch_threads=2)

    # Execute
    one = load_policy_for(site="site-1", site_config_dir=str(tmp_path))
    two = load_policy_for(site="site-2", site_config_dir=str(tmp_path))

    # Assert
    assert (one.site, one.torch_threads) == ("site-1", 1)
    assert (two.site, two.torch_threads) == ("site-2", 2)


def test_no_policy_is_a_policy_error_saying_where_it_looked(tmp_path):
    # Execute
    with pytest.raises(PolicyError) as caught:
        find_site_policy(site="site-9", site_config_dir=str(tmp_path))

    # Assert
    assert str(tmp_path / POLICY_FILE) in str(caught.value) and "zenfed provision" in str(caught.value)
    with pytest.raises(PolicyError, match="no kit folder is configured"):
        find_site_policy(site="site-9", site_config_dir=None)


def test_a_policy_for_another_site_is_refused(tmp_path):
    # Prepare
    write_policy(tmp_path / POLICY_FILE, site="site-2")

    # Execute / Assert
    with pytest.raises(PolicyError, match="the site policy is for 'site-2', but this site is 'site-1'"):
        load_policy_for(site="site-1", site_config_dir=str(tmp_path))


def test_a_malformed_policy_is_a_spec_error_naming_the_field(tmp_path):
    # Prepare
    write_policy(tmp_path / POLICY_FILE, site="site-1", torch_thread=2)

    # Execute / Assert
    with pytest.raises(SpecError, match="torch_thread: is not a known field"):
        load_policy_for(site="site-1", site_config_dir=str(tmp_path))


POLICY = SitePolicy(
    site="site-1",
    datasets={"builtin": DatasetLocation(path="/data")},
    allowed_base_models=("default",),
    allowed_jobs=("demo-*", "audit"),
)


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        (JobSpec(name="demo-lora"), None),
        (JobSpec(name="audit"), None),
        (JobSpec(name="other-job"), "not in this site's allowed_jobs"),
        (
            JobSpec(name="demo-x", model={"base": "/models/llama"}),
            "not in this site's allowed_base_models",
        ),
        (JobSpec(name="demo-x", data={"dataset": "clinical"}), "no dataset named 'clinical'"),
    ],
)
def test_check_job_allowed_applies_jobs_models_and_datasets(spec, reason):
    # Execute / Assert
    if reason is None:
        check_job_allowed(POLICY, spec)
    else:
        with pytest.raises(PolicyError, match=reason):
            check_job_allowed(POLICY, spec)


@pytest.mark.parametrize(("encryption", "refused"), [
    ({"enabled": True, "secure_aggregation": "pairwise", "quant_bits": 16}, False),
    ({"enabled": True, "secure_aggregation": "none"}, True),
    ({"enabled": False}, True),
])
def test_a_site_can_require_pairwise_masks(encryption, refused):
    # Prepare
    policy = POLICY.model_copy(update={"require_secure_aggregation": True})
    spec = JobSpec(name="demo-x", encryption=encryption)

    # Execute / Assert
    if refused:
        with pytest.raises(PolicyError, match="requires pairwise masks"):
            check_job_allowed(policy, spec)
    else:
        check_job_allowed(policy, spec)


def test_a_star_allows_any_base_model():
    # Prepare
    policy = POLICY.model_copy(update={"allowed_base_models": ("*",)})

    # Execute / Assert: no exception
    check_job_allowed(policy, JobSpec(name="demo-x", model={"base": "/models/llama"}))
