"""Exported job folders: configuration only, importable zenfed/nvflare classes, jobs/ up to date."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

from zenfed.errors import JobError
from zenfed.jobs import export_job
from zenfed.jobs.allow_list import class_allow_list
from zenfed.spec import JobSpec, load_job_spec

REPO = Path(__file__).resolve().parents[2]
SPEC_FILE = REPO / "src" / "zenfed" / "jobs" / "specs" / "demo-lora.yaml"
CHECKED_IN = REPO / "jobs" / "demo-lora"


def relative_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def class_paths(node):
    """Every value under a "path" key, anywhere in a FLARE config."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "path" and isinstance(value, str):
                yield value
            else:
                yield from class_paths(value)
    elif isinstance(node, list):
        for item in node:
            yield from class_paths(item)


def small_spec(name: str) -> JobSpec:
    return JobSpec.model_validate(
        {
            "name": name,
            "model": {"base": "/models/tiny"},
            "lora": {"rank": 4},
            "federation": {"rounds": 2, "min_sites": 2},
        }
    )


@pytest.fixture
def exported(tmp_path) -> Path:
    return export_job(small_spec("export-me"), out=tmp_path / "jobs" / "export-me")


def test_the_folder_holds_meta_and_app_configs_and_no_code(exported):
    # Execute
    files = relative_files(exported)

    # Assert
    assert set(files) == {
        "meta.json",
        "app/config/config_fed_server.json",
        "app/config/config_fed_client.json",
    }
    assert not (exported / "app" / "custom").exists()
    assert not list(exported.rglob("*.py")) and not list(exported.rglob("*.pyc"))
    meta = json.loads(files["meta.json"])
    assert meta["name"] == "export-me" and meta["min_clients"] == 2
    assert meta["deploy_map"] == {"app": ["@ALL"]}


def test_the_server_config_tells_flare_how_soon_a_site_is_lost(tmp_path):
    # Prepare
    data = small_spec("grace").model_dump(mode="json")
    data["federation"]["lost_site_grace_s"] = 7
    spec = JobSpec.model_validate(data)

    # Execute
    server = json.loads((export_job(spec, out=tmp_path / "job") / "app/config/config_fed_server.json").read_text())

    # Assert: FLARE reads these names from the server app's config
    assert server["dead_client_grace_period"] == 7
    assert server["dead_client_check_lead_time"] == 7


def test_every_named_class_is_zenfed_or_nvflare_and_importable(exported):
    # Prepare
    configs = [json.loads(p.read_text()) for p in sorted((exported / "app" / "config").glob("*.json"))]
    paths = sorted({p for config in configs for p in class_paths(config)})

    # Execute / Assert
    assert "zenfed.controllers.round_controller.FedLoRAController" in paths
    assert "zenfed.executors.lora_executor.LoRAExecutor" in paths
    for path in paths:
        assert path.startswith(("zenfed.", "nvflare.")), path
        module, _, name = path.rpartition(".")
        assert isinstance(getattr(importlib.import_module(module), name), type), path


def test_the_configs_carry_the_whole_spec_and_no_data_path(exported):
    # Prepare
    spec = small_spec("export-me")
    server = json.loads((exported / "app/config/config_fed_server.json").read_text())
    client = json.loads((exported / "app/config/config_fed_client.json").read_text())

    # Execute
    server_spec = JobSpec.model_validate(server["workflows"][0]["args"]["spec"])
    client_spec = JobSpec.model_validate(client["executors"][0]["executor"]["args"]["spec"])

    # Assert: both ends rebuild the identical spec (same hash); only the dataset's name travels.
    assert server_spec.spec_hash() == client_spec.spec_hash() == spec.spec_hash()
    assert {"zenfed_train", "zenfed_evaluate"} <= set(client["executors"][0]["tasks"])
    assert "jsonl" not in json.dumps(client) and "site-1" not in json.dumps(client)


def test_the_allow_list_admits_every_class_a_job_names(exported):
    # Prepare
    allow = class_allow_list()
    config = json.loads((exported / "app/config/config_fed_server.json").read_text())

    # Execute / Assert
    assert "zenfed." in allow
    for path in class_paths(config):
        assert any(path.startswith(prefix) for prefix in allow)


def test_an_existing_folder_is_kept_unless_overwrite(exported):
    # Prepare
    marker = exported / "meta.json"
    before = marker.read_bytes()

    # Execute
    with pytest.raises(JobError, match="already exists"):
        export_job(small_spec("changed"), out=exported)
    unchanged = marker.read_bytes()
    export_job(small_spec("changed"), out=exported, overwrite=True)

    # Assert
    assert unchanged == before
    assert json.loads(marker.read_text())["name"] == "changed"
    assert not [p for p in exported.parent.iterdir() if p.name.startswith(".")]


def test_the_checked_in_demo_job_equals_a_fresh_export(tmp_path):
    # Execute
    fresh = export_job(load_job_spec(SPEC_FILE), out=tmp_path / "demo-lora")

    # Assert: `zenfed job export src/zenfed/jobs/specs/demo-lora.yaml --out jobs/demo-lora --force`
    # regenerates the checked-in folder after a spec or exporter change.
    assert relative_files(CHECKED_IN) == relative_files(fresh)


@pytest.mark.parametrize("spec_file", sorted(SPEC_FILE.parent.glob("*.yaml")), ids=lambda path: path.stem)
def test_every_shipped_job_spec_exports_a_submittable_job(spec_file, tmp_path):
    # Execute: the pinned-base check included, as `zenfed job export` runs it.
    spec = load_job_spec(spec_file)
    exported = export_job(spec, out=tmp_path / spec.name, require_pinned_base=True)

    # Assert: the sites' executor carries the whole spec, which parses back to the same job.
    assert spec.name == spec_file.stem
    client = json.loads((exported / "app" / "config" / "config_fed_client.json").read_text())
    carried = client["executors"][0]["executor"]["args"]["spec"]
    assert JobSpec.model_validate(carried).spec_hash() == spec.spec_hash()


def test_the_simulator_is_not_started_without_a_worker(tmp_path):
    from zenfed.jobs.simulate import builtin_policies, run_simulation

    policies = builtin_policies(tmp_path / "data", sites=3, dataset="builtin", allow_any_model=True)
    with pytest.raises(JobError, match="at least one worker"):
        run_simulation(small_spec("sim"), workspace=tmp_path / "sim", policies=policies, threads=0)
    assert not (tmp_path / "sim").exists()
