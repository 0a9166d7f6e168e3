"""Job specs, site policies and project specs: valid files load, bad ones say what to fix."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from zenfed.errors import PolicyError, SpecError
from zenfed.spec import (
    JobSpec,
    ProjectSpec,
    SitePolicy,
    SiteSpec,
    load_job_spec,
    load_project_spec,
    load_site_policy,
    parse_model,
)

GOOD_SPEC = """\
name: my-job
lora:
  rank: 4
training:
  local_steps: 3
federation:
  rounds: 2
"""


def write(tmp_path: Path, text: str, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_good_spec_loads_with_defaults_filled_in(tmp_path):
    # Prepare
    path = write(tmp_path, GOOD_SPEC)

    # Execute
    spec = load_job_spec(path)

    # Assert
    assert spec.name == "my-job"
    assert spec.lora.rank == 4 and spec.lora.alpha == 16.0
    assert spec.training.local_steps == 3 and spec.federation.rounds == 2
    assert spec.model.base == "default" and spec.data.dataset == "builtin"


def test_the_spec_hash_is_stable_and_changes_with_the_content(tmp_path):
    # Prepare
    spec = load_job_spec(write(tmp_path, GOOD_SPEC))
    same = load_job_spec(write(tmp_path, GOOD_SPEC, "again.yaml"))
    other = load_job_spec(write(tmp_path, GOOD_SPEC.replace("rounds: 2", "rounds: 3"), "other.yaml"))

    # Assert
    assert spec.spec_hash() == same.spec_hash()
    assert spec.spec_hash() != other.spec_hash()
    assert len(spec.spec_hash()) == 64


@pytest.mark.parametrize(
    ("text", "field", "what"),
    [
        (
            GOOD_SPEC + "lora_rank: 4\n",
            "lora_rank",
            "is not a known field; remove it or check its spelling",
        ),
        (GOOD_SPEC.replace("rank: 4", "rnak: 4"), "lora.rnak", "is not a known field"),
        (GOOD_SPEC.replace("rank: 4", "rank: four"), "lora.rank", "valid integer"),
        (GOOD_SPEC.replace("rank: 4", "rank: 0"), "lora.rank", "greater than or equal to 1"),
        (
            GOOD_SPEC.replace("local_steps: 3", "local_steps: -1"),
            "training.local_steps",
            "greater than",
        ),
        (GOOD_SPEC.replace("rounds: 2", "rounds: 2.5"), "federation.rounds", "integer"),
        (GOOD_SPEC.replace("name: my-job", "name: 'my job/../x'"), "name", "pattern"),
        (GOOD_SPEC + "model:\n  engine: tensorflow\n", "model.engine", "'peft' or 'nemo'"),
        (GOOD_SPEC + "data:\n  dataset: /etc/passwd\n", "data.dataset", "pattern"),
    ],
)
def test_a_bad_field_is_named_with_what_was_wrong(tmp_path, text, field, what):
    # Prepare
    path = write(tmp_path, text)

    # Execute
    with pytest.raises(SpecError) as caught:
        load_job_spec(path)

    # Assert: the message names the file, the field (as a dotted path) and the problem.
    message = str(caught.value)
    assert str(path) in message
    assert f"  - {field}:" in message
    assert what in message


def test_an_out_of_range_value_names_the_fix_from_the_field_description(tmp_path):
    # Prepare
    path = write(tmp_path, GOOD_SPEC.replace("rank: 4", "rank: 1000"))

    # Execute
    with pytest.raises(SpecError) as caught:
        load_job_spec(path)

    # Assert: the got-value and the expected range are both in the message.
    message = str(caught.value)
    assert "lora.rank" in message and "(got 1000)" in message
    assert "expected LoRA rank r, an integer from 1 to 256" in message


def test_a_missing_name_says_it_is_required(tmp_path):
    # Prepare
    path = write(tmp_path, "lora:\n  rank: 4\n")

    # Execute
    with pytest.raises(SpecError) as caught:
        load_job_spec(path)

    # Assert
    assert "  - name: is required; add it" in str(caught.value)


def test_every_bad_field_is_reported_at_once(tmp_path):
    # Prepare
    path = write(tmp_path, "name: ok\nlora:\n  rank: 0\n  dropout: 1.5\ntraining:\n  batch_size: 0\n")

    # Execute
    with pytest.raises(SpecError) as caught:
        load_job_spec(path)

    # Assert
    message = str(caught.value)
    for field in ("lora.rank", "lora.dropout", "training.batch_size"):
        assert f"  - {field}:" in message


def test_invalid_yaml_is_a_spec_error_naming_the_file(tmp_path):
    # Prepare
    path = write(tmp_path, "name: [unclosed\n  rank: : :\n")

    # Execute
    with pytest.raises(SpecError) as caught:
        load_job_spec(path)

    # Assert
    assert "is not valid YAML" in str(caught.value) and str(path) in str(caught.value)


def test_a_yaml_list_instead_of_a_mapping_is_refused(tmp_path):
    # Execute
    with pytest.raises(SpecError) as caught:
        load_job_spec(write(tmp_path, "- name: x\n"))

    # Assert
    assert "expected a mapping of fields, got list" in str(caught.value)


def test_an_empty_file_is_refused(tmp_path):
    # Execute
    with pytest.raises(SpecError) as caught:
        load_job_spec(write(tmp_path, ""))

    # Assert
    assert "expected a mapping of fields" in str(caught.value)


def test_a_missing_file_says_to_check_the_path(tmp_path):
    # Execute
    with pytest.raises(SpecError) as caught:
        load_job_spec(tmp_path / "nope.yaml")

    # Assert
    assert "does not exist; check the path" in str(caught.value)


def test_duplicate_target_modules_are_refused():
    # Execute
    with pytest.raises(SpecError) as caught:
        parse_model(
            JobSpec,
            {"name": "x", "lora": {"target_modules": ["q_proj", "q_proj"]}},
            kind="job spec",
            source="test",
        )

    # Assert
    assert "lora.target_modules" in str(caught.value) and "twice" in str(caught.value)



@pytest.mark.parametrize(("layers", "message"), [([3, 3], "twice"), ([-1], "start at 0"), ([], "at least 1")])
def test_bad_lora_layers_are_refused(layers, message):
    # Execute
    with pytest.raises(SpecError) as caught:
        parse_model(JobSpec, {"name": "x", "lora": {"layers": layers}}, kind="job spec", source="test")

    # Assert
    assert "lora.layers" in str(caught.value) and message in str(caught.value)


def test_lora_layers_are_kept_sorted():
    spec = parse_model(JobSpec, {"name": "x", "lora": {"layers": [29, 27, 28]}}, kind="job spec", source="test")

    assert spec.lora.layers == (27, 28, 29)

def test_specs_are_frozen():
    # Prepare
    spec = JobSpec(name="x")

    # Execute / Assert
    with pytest.raises(ValueError):
        spec.name = "y"  # type: ignore[misc]


def test_site_policy_loads_and_names_missing_datasets(tmp_path):
    # Prepare
    path = write(tmp_path, "site: site-1\ndatasets:\n  builtin:\n    path: /data/site-1\n", "policy.yaml")

    # Execute
    policy = load_site_policy(path)

    # Assert
    assert policy.dataset("builtin").path == Path("/data/site-1")
    assert policy.dataset("builtin").train == "train.jsonl"
    with pytest.raises(PolicyError) as caught:
        policy.dataset("clinical")
    assert "no dataset named 'clinical'" in str(caught.value) and "builtin" in str(caught.value)


def test_project_spec_refuses_duplicate_names_and_equal_ports(tmp_path):
    # Prepare
    dupes = "name: p\nsites: [{name: a}, {name: a}]\nadmins: [{name: x@y.org}]\n"
    ports = "name: p\nserver: {fl_port: 9000, admin_port: 9000}\nsites: [{name: a}]\nadmins: [{name: x@y.org}]\n"

    # Execute / Assert
    with pytest.raises(SpecError, match="repeated: a"):
        load_project_spec(write(tmp_path, dupes, "p1.yaml"))
    with pytest.raises(SpecError, match="must differ"):
        load_project_spec(write(tmp_path, ports, "p2.yaml"))


def test_project_needs_a_site_and_an_admin_with_an_email(tmp_path):
    # Execute
    with pytest.raises(SpecError) as caught:
        load_project_spec(write(tmp_path, "name: p\nsites: []\nadmins: [{name: bob}]\n"))

    # Assert
    message = str(caught.value)
    assert "  - sites:" in message and "  - admins.0.name:" in message


def test_an_unknown_key_in_a_projects_site_is_one_line_without_a_dump(tmp_path):
    # Prepare: a long site entry with one misspelt key
    text = ("name: p\nsites: [{name: a, datasets: {x: {path: /a/very/long/path/to/the/data/of/this/site}}, "
            "allowed_jobs: ['clinical-*', 'research-*'], requre_dp: true}]\nadmins: [{name: x@y.org}]\n")

    # Execute
    with pytest.raises(SpecError) as caught:
        load_project_spec(write(tmp_path, text, "p.yaml"))

    # Assert: the misspelt key alone, no cascade about an empty site list, no copy of the whole site
    lines = str(caught.value).splitlines()[1:]
    assert lines == ["  - sites.0.requre_dp: is not a known field; remove it or check its spelling (got True)"]


def test_a_site_spec_becomes_that_sites_policy():
    # Prepare
    site = SiteSpec(name="hospital-a", org="h", torch_threads=2)

    # Execute
    policy = site.policy()

    # Assert
    assert isinstance(policy, SitePolicy)
    assert policy.site == "hospital-a" and policy.torch_threads == 2


def test_the_packaged_provisioning_templates_parse():
    # Prepare
    folder = Path(__file__).resolve().parents[1] / "provisioning"
    files = sorted(folder.glob("*.y*ml"))
    if not files:
        pytest.skip("no project templates checked in yet")

    # Execute / Assert: every template is a valid ProjectSpec (or a raw FLARE project file).
    for path in files:
        try:
            assert isinstance(load_project_spec(path), ProjectSpec)
        except SpecError as err:
            if "api_version" not in path.read_text():
                raise AssertionError(f"{path.name}: {err}") from None


def test_attestation_mode_off_unquoted_in_yaml_means_off(tmp_path):
    # Prepare: YAML 1.1 reads `off` as False
    path = tmp_path / "job.yaml"
    path.write_text("name: off-job\nattestation:\n  mode: off\n")

    # Execute
    from zenfed.spec import load_job_spec

    spec = load_job_spec(path)

    # Assert
    assert spec.attestation.mode == "off"


def test_an_infinite_number_in_a_job_spec_is_refused():
    # Execute / Assert: infinity has no canonical JSON, so it could never be hashed
    with pytest.raises(ValidationError):
        JobSpec(name="inf", privacy={"level": "record", "target_epsilon": float("inf")})


@pytest.mark.parametrize(("data", "message"), [
    ({"objective": "dpo", "dpo": {"sft_rounds": 3}, "federation": {"rounds": 3}}, "leaves no DPO round"),
    ({"dpo": {"beta": 0.5}}, "sets ['beta'] but objective is 'sft'"),
    ({"objective": "rlhf"}, "objective"),
    ({"objective": "dpo", "dpo": {"beta": 0}}, "dpo.beta"),
    ({"objective": "dpo", "dpo": {"dataset": "../prefs"}}, "dpo.dataset"),
    ({"objective": "dpo", "dpo": {"sft_rounds": 1}, "federation": {"strategy": "scaffold"}}, "would steer the DPO"),
])
def test_a_bad_dpo_job_is_refused_with_the_fix(data, message):
    # Execute
    with pytest.raises(SpecError) as caught:
        parse_model(JobSpec, {"name": "x", **data}, kind="job spec", source="test")

    # Assert
    assert message in str(caught.value)


def test_a_two_stage_job_trains_sft_then_dpo_and_survives_its_own_dump():
    # Prepare
    spec = JobSpec(name="x", objective="dpo", dpo={"sft_rounds": 2}, federation={"rounds": 5})

    # Execute
    again = JobSpec.model_validate(spec.model_dump(mode="json"))
    supervised = JobSpec.model_validate(JobSpec(name="y").model_dump(mode="json"))

    # Assert: rounds 1-2 SFT, 3-5 DPO; a dump of either kind loads back (the sites parse it).
    assert [spec.objective_for_round(r) for r in range(1, 6)] == ["sft", "sft", "dpo", "dpo", "dpo"]
    assert spec.dpo_start_round == 3 and again == spec
    assert supervised.dpo_start_round is None and supervised.privacy_unit() is None
    assert "preference pair" in JobSpec(name="z", objective="dpo", privacy={
        "level": "record", "target_epsilon": 8}).privacy_unit()
