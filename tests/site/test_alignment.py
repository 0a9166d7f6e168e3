"""A site's DPO reference and preference data: kept at the stage's first round, resumed, refused when missing."""

from __future__ import annotations

import stat

import pytest
import torch

from zenfed import protocol as P
from zenfed.errors import AdapterError, PolicyError
from zenfed.jobs.simulate import builtin_locations
from zenfed.site.alignment import SitePreferences
from zenfed.spec import DatasetLocation, SitePolicy


def adapter(value: float) -> dict[str, torch.Tensor]:
    return {"m.lora_A.weight": torch.full((2, 4), value), "m.lora_B.weight": torch.full((4, 2), value)}


@pytest.fixture
def dpo_spec(tiny_job_spec):
    return tiny_job_spec("dpo-site", objective="dpo", dpo={"sft_rounds": 2}, federation={"rounds": 4})


@pytest.fixture
def policy(small_builtin_data):
    return SitePolicy(site="site-1", datasets=builtin_locations(small_builtin_data / "site-1"))


def test_a_supervised_job_has_no_preferences_and_a_dpo_job_reads_the_sites_pairs(tiny_job_spec, dpo_spec, policy,
                                                                                 tmp_path):
    # Execute
    none = SitePreferences.load(tiny_job_spec(), policy, folder=tmp_path)
    loaded = SitePreferences.load(dpo_spec, policy, folder=tmp_path)

    # Assert: the held-out pairs are cut to evaluation.max_examples, the stage starts after the SFT rounds.
    assert none is None
    assert loaded is not None and len(loaded.train) > 0
    assert len(loaded.valid) == dpo_spec.evaluation.max_examples
    assert loaded.start_round == 3 and loaded.beta == dpo_spec.dpo.beta


def test_a_site_without_the_preference_dataset_is_told_which_one_to_add(dpo_spec, small_builtin_data, tmp_path):
    # Prepare
    only_sft = SitePolicy(site="site-1", datasets={"builtin": DatasetLocation(path=small_builtin_data / "site-1")})

    # Execute / Assert
    with pytest.raises(PolicyError, match="no dataset named 'builtin-preferences'"):
        SitePreferences.load(dpo_spec, only_sft, folder=tmp_path)


def header(payload_sha: str | None, reference_sha: str | None) -> dict:
    return {P.H_PAYLOAD_SHA256: payload_sha, P.H_DPO_REFERENCE: reference_sha}


def test_the_reference_is_kept_as_the_stages_first_global_arrives_and_a_restarted_site_resumes_it(
        dpo_spec, policy, tmp_path):
    # Prepare
    folder = tmp_path / "state"
    site = SitePreferences.load(dpo_spec, policy, folder=folder)

    # Execute: round 3 opens the stage with global "g3" = adapter(1); later rounds name g3 as the reference.
    site.keep_reference(2, adapter(9.0), header=header("g2", None))  # an SFT round: nothing kept
    site.keep_reference(3, adapter(1.0), header=header("g3", "g3"))
    kept = site.reference(3, header=header("g3", "g3"), initial=adapter(0.0))
    later = site.reference(4, header=header("g4", "g3"), initial=adapter(0.0))
    restarted = SitePreferences.load(dpo_spec, policy, folder=folder).reference(
        4, header=header("g4", "g3"), initial=adapter(0.0))

    # Assert: the reference stays the stage's start, on disk 0600 in a 0700 folder.
    for reference in (kept, later, restarted):
        assert all(torch.equal(reference[k], adapter(1.0)[k]) for k in reference)
    assert stat.S_IMODE(site.path.stat().st_mode) == 0o600 and stat.S_IMODE(folder.stat().st_mode) == 0o700


def test_dpo_from_round_1_trains_against_the_initial_adapter_without_keeping_anything(tiny_job_spec, policy,
                                                                                       tmp_path):
    # Prepare
    spec = tiny_job_spec("dpo-only", objective="dpo", federation={"rounds": 3})
    site = SitePreferences.load(spec, policy, folder=tmp_path / "state")

    # Execute: a site that missed round 1 still has the reference every site has.
    site.keep_reference(1, adapter(1.0), header=header(None, None))
    reference = site.reference(2, header=header("g2", None), initial=adapter(0.0))

    # Assert
    assert all(torch.equal(reference[k], adapter(0.0)[k]) for k in reference)
    assert not site.path.exists()


def test_a_site_that_missed_the_stages_first_round_refuses_the_dpo_rounds_with_the_reason(dpo_spec, policy, tmp_path):
    # Prepare
    site = SitePreferences.load(dpo_spec, policy, folder=tmp_path / "state")

    # Execute / Assert
    with pytest.raises(PolicyError, match="did not receive round 3's global, where the DPO stage started"):
        site.reference(4, header=header("g4", "g3"), initial=adapter(0.0))


def test_another_runs_reference_is_refused(dpo_spec, policy, tmp_path):
    # Prepare: a reference kept by an earlier run of the same spec, whose stage started from "old".
    folder = tmp_path / "state"
    SitePreferences.load(dpo_spec, policy, folder=folder).keep_reference(3, adapter(1.0), header=header("old", "old"))

    # Execute / Assert: this run's server names another global as the stage's start.
    with pytest.raises(PolicyError, match="is another run's"):
        SitePreferences.load(dpo_spec, policy, folder=folder).reference(4, header=header("g4", "new"),
                                                                        initial=adapter(0.0))


def test_a_server_that_names_another_reference_than_the_global_it_sent_is_refused(dpo_spec, policy, tmp_path):
    site = SitePreferences.load(dpo_spec, policy, folder=tmp_path / "state")
    with pytest.raises(PolicyError, match="not the global it sent"):
        site.keep_reference(3, adapter(1.0), header=header("g3", "other"))


def test_a_damaged_or_foreign_kept_reference_is_refused(dpo_spec, policy, tmp_path):
    # Prepare
    folder = tmp_path / "state"
    SitePreferences.load(dpo_spec, policy, folder=folder).keep_reference(3, adapter(1.0), header=header("g3", "g3"))
    path = folder / "dpo-reference.safetensors"
    good = path.read_bytes()

    # Execute / Assert: a truncated file, and one of another LoRA shape.
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(PolicyError, match="cannot be read"):
        SitePreferences.load(dpo_spec, policy, folder=folder).reference(4, header=header("g4", "g3"),
                                                                        initial=adapter(0.0))
    path.write_bytes(good)
    other = {"m.lora_A.weight": torch.zeros(3, 4), "m.lora_B.weight": torch.zeros(4, 3)}
    with pytest.raises(AdapterError):
        SitePreferences.load(dpo_spec, policy, folder=folder).reference(4, header=header("g4", "g3"), initial=other)


def test_a_fresh_start_forgets_the_kept_reference(dpo_spec, policy, tmp_path):
    # Prepare
    site = SitePreferences.load(dpo_spec, policy, folder=tmp_path / "state")
    site.keep_reference(3, adapter(1.0), header=header("g3", "g3"))

    # Execute
    site.forget()

    # Assert
    assert not site.path.exists()
    with pytest.raises(PolicyError, match="has no reference adapter"):
        site.reference(4, header=header("g4", "g3"), initial=adapter(0.0))
