"""A site's enrollment profile discloses only what its policy allows; matching reads only what was disclosed."""

from __future__ import annotations

import pytest

from zenfed.server.enrollment import why_not_matched
from zenfed.site.enrollment import enrollment_profile
from zenfed.spec import CohortRequirements, DatasetLocation, JobSpec, SiteEnrollment, SitePolicy


def _policy(tmp_path, **enrollment) -> SitePolicy:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    (data / "train.jsonl").write_text('{"a": 1}\n\n{"a": 2}\n{"a": 3}\n')
    return SitePolicy(site="site-1", datasets={"builtin": DatasetLocation(path=data)},
                      enrollment=SiteEnrollment(**enrollment))


def test_the_profile_holds_the_probe_the_tags_and_the_record_count(tmp_path):
    # Execute
    profile = enrollment_profile(_policy(tmp_path, device="cpu", steps_per_minute=12.5, domain_tags=("b", "a"),
                                         availability_utc="22:00-06:00"), JobSpec(name="j"))

    # Assert: non-empty lines only; tags sorted; nothing undeclared
    assert profile == {"device": "cpu", "steps_per_minute": 12.5, "availability_utc": "22:00-06:00",
                       "domain_tags": ["a", "b"], "records": 3}


def test_a_site_keeps_its_record_count_or_its_whole_profile(tmp_path):
    assert "records" not in enrollment_profile(_policy(tmp_path, disclose_record_counts=False), JobSpec(name="j"))
    assert enrollment_profile(_policy(tmp_path, disclose=False, device="cpu"), JobSpec(name="j")) == {
        "withheld": True}


def test_a_dpo_job_also_counts_the_preference_pairs_where_counts_are_disclosed(tmp_path):
    # Prepare: the same file stands for the preference set here (only non-empty lines are counted).
    spec = JobSpec(name="j", objective="dpo", dpo={"dataset": "builtin"})
    hidden = _policy(tmp_path, disclose_record_counts=False)

    # Execute / Assert
    assert enrollment_profile(_policy(tmp_path), spec) == {"records": 3, "preference_pairs": 3}
    assert "preference_pairs" not in enrollment_profile(hidden, spec)


def test_a_missing_dataset_leaves_the_count_out(tmp_path):
    profile = enrollment_profile(_policy(tmp_path), JobSpec(name="j", data={"dataset": "other"}))
    assert "records" not in profile


def test_a_bad_availability_window_is_refused():
    with pytest.raises(ValueError, match="availability_utc"):
        SiteEnrollment(availability_utc="25:00-06:00")


@pytest.mark.parametrize(("profile", "required", "reason"), [
    ({"records": 50, "domain_tags": ["a"], "steps_per_minute": 10.0, "device": "cuda"},
     {"min_records": 10, "domain_tags": ["a"], "min_steps_per_minute": 5, "device": "cuda"}, None),
    (None, {"min_records": 1}, "sent no enrollment profile"),
    ({"withheld": True}, {"min_records": 1}, "withholds its enrollment profile"),
    ({}, {"min_records": 10}, "does not disclose its record count"),
    ({"records": 5}, {"min_records": 10}, "5 training records, fewer than min_records 10"),
    ({"domain_tags": ["a"]}, {"domain_tags": ["a", "c"]}, "does not declare the domain tag(s) c"),
    ({}, {"min_steps_per_minute": 5}, "run `zenfed site probe`"),
    ({"steps_per_minute": 2.0}, {"min_steps_per_minute": 5}, "2.0 steps per minute, slower"),
    ({"device": "cpu"}, {"device": "cuda"}, "trains on cpu, not cuda"),
])
def test_matching_names_the_first_unmet_requirement(profile, required, reason):
    said = why_not_matched(profile, CohortRequirements(**required))
    assert said == reason if reason is None else reason in said
