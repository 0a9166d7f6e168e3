"""The base model pin and approval by content, through real site and server sessions."""

from __future__ import annotations

import pytest

from zenfed import protocol as P
from zenfed.engines.base_model import model_fingerprint
from zenfed.errors import PolicyError, SpecError
from zenfed.jobs.in_process import run_in_process
from zenfed.jobs.simulate import builtin_policies
from zenfed.server.result import RESULT_FILE
from zenfed.site.policy import check_base_model, check_job_allowed
from zenfed.spec import SitePolicy, load_site_policy


def test_a_site_whose_copy_differs_from_the_pin_refuses_and_says_both_hashes(tiny_job_spec, three_site_data,
                                                                               tiny_model_dir, tmp_path):
    # Prepare: the job pins another model's content.
    actual = model_fingerprint(tiny_model_dir)
    spec = tiny_job_spec("pinned-elsewhere", model={"base_sha256": "0" * 64}, federation={"rounds": 1, "min_sites": 3})
    policies = builtin_policies(three_site_data, sites=3, dataset="builtin", allow_any_model=True)

    # Execute
    run = run_in_process(spec, workspace=tmp_path, policies=policies)

    # Assert: every site refused before training; the job stopped without a result.
    refusals = [answer.refusal for task, site, answer in run.transport.answers if answer.refusal]
    assert len({r for r in refusals}) >= 1 and all(f"hashes to {actual}, but the job pins {'0' * 64}" in r
                                                   for r in refusals)
    assert not any(answer.payload for task, _, answer in run.transport.answers if task == P.TASK_TRAIN)
    assert run.transport.stopped is not None and not (run.result_dir / RESULT_FILE).exists()


def test_a_site_may_approve_a_model_by_content_whatever_its_path(tiny_job_spec, tiny_model_dir):
    # Prepare
    pin = model_fingerprint(tiny_model_dir)
    spec = tiny_job_spec("by-content")
    by_content = SitePolicy(site="site-1", allowed_base_models=(f"sha256:{pin}",))
    by_name_only = SitePolicy(site="site-1", allowed_base_models=("default",))
    other_content = SitePolicy(site="site-1", allowed_base_models=("sha256:" + "1" * 64,))

    # Execute / Assert
    check_base_model(by_content, spec, fingerprint=pin, model_dir=tiny_model_dir)
    with pytest.raises(PolicyError, match="not in this site's allowed_base_models"):
        check_job_allowed(by_name_only, spec)
    with pytest.raises(PolicyError, match=f"approve it by name or as sha256:{pin}"):
        check_base_model(other_content, spec, fingerprint=pin, model_dir=tiny_model_dir)


def test_a_malformed_content_approval_is_a_spec_error(tmp_path):
    path = tmp_path / "site.yaml"
    path.write_text("site: site-1\nallowed_base_models: ['sha256:ABC']\n")
    with pytest.raises(SpecError, match="64 lowercase hex digits"):
        load_site_policy(path)
