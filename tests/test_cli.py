"""The `zenfed` command: help, data make, job export; a typed error is one stderr line, exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from zenfed.cli import main

GOOD_SPEC = "name: cli-job\nlora:\n  rank: 4\nfederation:\n  rounds: 2\n"


def zenfed_script() -> str:
    return str(Path(sys.executable).with_name("zenfed"))


def test_help_lists_the_commands():
    # Execute
    run = subprocess.run([zenfed_script(), "--help"], capture_output=True, text=True, timeout=60, check=False)

    # Assert
    assert run.returncode == 0
    for command in (
        "models",
        "data",
        "job",
        "simulate",
        "provision",
        "up",
        "down",
        "submit",
        "demo",
        "bench",
    ):
        assert command in run.stdout


def test_a_missing_subcommand_is_a_usage_error(capsys):
    # Execute
    with pytest.raises(SystemExit) as caught:
        main(["job"])

    # Assert
    assert caught.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_data_make_writes_one_folder_per_site(tmp_path, capsys):
    # Execute
    code = main(["data", "make", "--sites", "2", "--out", str(tmp_path / "data"), "--seed", "3"])

    # Assert
    assert code == 0
    assert "wrote 2 site folders" in capsys.readouterr().out
    for site in ("site-1", "site-2"):
        assert (tmp_path / "data" / site / "train.jsonl").stat().st_size > 0
        assert (tmp_path / "data" / site / "valid.jsonl").stat().st_size > 0
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert manifest["seed"] == 3 and sorted(manifest["sites"]) == ["site-1", "site-2"]


def test_data_make_with_no_sites_exits_2(tmp_path, capsys):
    # Execute
    code = main(["data", "make", "--sites", "0", "--out", str(tmp_path / "data")])

    # Assert
    assert code == 2
    assert capsys.readouterr().err.startswith("zenfed: error: --sites must be at least 1")
    assert not (tmp_path / "data").exists()


def test_job_export_writes_the_job_folder(tmp_path, capsys):
    # Prepare
    spec = tmp_path / "spec.yaml"
    spec.write_text(GOOD_SPEC)
    out = tmp_path / "jobs" / "cli-job"

    # Execute
    code = main(["job", "export", str(spec), "--out", str(out)])

    # Assert
    assert code == 0
    assert str(out) in capsys.readouterr().out
    assert json.loads((out / "meta.json").read_text())["name"] == "cli-job"
    assert (out / "app" / "config" / "config_fed_client.json").is_file()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (GOOD_SPEC.replace("rank: 4", "rank: 0"), "lora.rank"),
        (GOOD_SPEC + "rounds: 3\n", "rounds: is not a known field"),
        ("lora:\n  rank: 4\n", "name: is required"),
        ("name: [oops\n", "is not valid YAML"),
    ],
)
def test_job_export_of_a_bad_spec_exits_2_and_leaves_no_folder(tmp_path, capsys, text, expected):
    # Prepare
    spec = tmp_path / "spec.yaml"
    spec.write_text(text)
    out = tmp_path / "jobs" / "bad"

    # Execute
    code = main(["job", "export", str(spec), "--out", str(out)])

    # Assert
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.startswith("zenfed: error: ") and expected in captured.err
    assert captured.out == ""
    assert not out.exists()
    assert not (tmp_path / "jobs").exists() or not any((tmp_path / "jobs").iterdir())


def test_job_export_of_a_missing_spec_exits_2(tmp_path, capsys):
    # Execute
    code = main(["job", "export", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "out")])

    # Assert
    assert code == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_job_export_refuses_to_overwrite_without_force(tmp_path, capsys):
    # Prepare
    spec = tmp_path / "spec.yaml"
    spec.write_text(GOOD_SPEC)
    out = tmp_path / "job"
    assert main(["job", "export", str(spec), "--out", str(out)]) == 0
    spec.write_text(GOOD_SPEC.replace("cli-job", "renamed"))
    capsys.readouterr()

    # Execute
    refused = main(["job", "export", str(spec), "--out", str(out)])
    refused_err = capsys.readouterr().err
    forced = main(["job", "export", str(spec), "--out", str(out), "--force"])

    # Assert
    assert refused == 2 and "already exists" in refused_err and "--force" in refused_err
    assert forced == 0
    assert json.loads((out / "meta.json").read_text())["name"] == "renamed"


def test_up_on_a_folder_that_was_not_provisioned_exits_2(tmp_path, capsys):
    # Execute
    code = main(["up", str(tmp_path)])

    # Assert
    assert code == 2
    assert "is not a zenfed workspace" in capsys.readouterr().err


def test_the_console_script_reports_errors_on_stderr_with_exit_2(tmp_path):
    # Prepare
    spec = tmp_path / "spec.yaml"
    spec.write_text(GOOD_SPEC.replace("rank: 4", "rank: -3"))

    # Execute
    run = subprocess.run(
        [zenfed_script(), "job", "export", str(spec), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    # Assert
    assert run.returncode == 2
    assert "zenfed: error: invalid job spec" in run.stderr and "lora.rank" in run.stderr
    assert "Traceback" not in run.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kit", ["missing", "empty"])
def test_submit_with_a_folder_that_is_no_admin_kit_exits_2_with_the_reason(tmp_path, capsys, kit):
    # Prepare: a folder high in the tree (no WS/PROJECT/prod_NN above it), or one that does not exist
    folder = tmp_path / kit
    if kit == "empty":
        folder.mkdir()

    # Execute
    code = main(["submit", "jobs/demo-lora", "--kit", str(folder)])

    # Assert
    assert code == 2
    assert "is not an admin kit" in capsys.readouterr().err


def test_provision_warns_of_a_dataset_path_missing_on_this_machine(tmp_path, capsys):
    # Prepare
    project = tmp_path / "p.yml"
    project.write_text("name: p\nserver: {name: localhost}\nsites:\n"
                       f"  - {{name: site-1, org: a, datasets: {{builtin: {{path: {tmp_path / 'nope'}}}}}}}\n"
                       "admins: [{name: admin@x.org}]\n")

    # Execute
    code = main(["provision", str(project), "--out", str(tmp_path / "ws")])

    # Assert: provisioned all the same (the path may exist on the site's machine), with a warning
    assert code == 0
    assert "site site-1's dataset 'builtin' path" in capsys.readouterr().err


def test_a_job_on_a_model_folder_exports_only_once_pinned_by_models_hash(tmp_path, capsys, tiny_model_dir):
    # Prepare
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"name: own-model\nmodel:\n  base: {tiny_model_dir}\n")
    out = tmp_path / "jobs" / "own-model"

    # Execute: unpinned, refused; `models hash` prints the pin; pinned, exported.
    refused = main(["job", "export", str(spec), "--out", str(out)])
    refusal, left = capsys.readouterr().err, out.exists()
    assert main(["models", "hash", str(tiny_model_dir), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    spec.write_text(spec.read_text() + f"  base_sha256: {printed['base_sha256']}\n")
    exported = main(["job", "export", str(spec), "--out", str(out)])

    # Assert
    assert refused == 2 and f"zenfed models hash {tiny_model_dir}" in refusal and not left
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(printed["files"])
    assert exported == 0 and (out / "meta.json").is_file()
