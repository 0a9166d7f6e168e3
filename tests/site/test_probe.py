"""`zenfed site probe`: a real measurement on the tiny model, written into the site policy without losing it."""

from __future__ import annotations

import os
import stat

import pytest
import yaml

from zenfed.cli import main
from zenfed.errors import SpecError
from zenfed.site.probe import measure, write_measured
from zenfed.spec import load_site_policy

POLICY_TEXT = """# zenfed site policy for site-1: edited by site IT, never leaves the site.
site: site-1
allowed_jobs: ['demo-*']
enrollment:
  domain_tags: [cardiology]
"""


def test_the_probe_times_real_training_steps(tiny_model_dir):
    measured = measure(model=str(tiny_model_dir), steps=2, threads=1)
    assert measured["device"] == "cpu" and measured["device_count"] == 1 and measured["memory_gib"] > 0
    assert measured["steps_per_minute"] > 0 and measured["probed_at"].endswith("+00:00")


def test_the_cli_writes_the_measurement_keeping_the_policy_and_its_header(tiny_model_dir, tmp_path, capsys):
    # Prepare: a site kit's policy
    (tmp_path / "local").mkdir()
    path = tmp_path / "local" / "zenfed_site.yaml"
    path.write_text(POLICY_TEXT)

    # Execute
    code = main(["site", "probe", str(tmp_path), "--model", str(tiny_model_dir), "--steps", "1"])

    # Assert: site IT's fields and comment stay; the measurement is added; the file stays private
    assert code == 0 and "wrote them under enrollment" in capsys.readouterr().out
    text = path.read_text()
    assert text.startswith("# zenfed site policy for site-1")
    policy = load_site_policy(path)
    assert policy.allowed_jobs == ("demo-*",) and policy.enrollment.domain_tags == ("cardiology",)
    assert policy.enrollment.steps_per_minute and policy.enrollment.steps_per_minute > 0
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_a_dry_run_writes_nothing(tiny_model_dir, tmp_path):
    path = tmp_path / "site.yaml"
    path.write_text(POLICY_TEXT)
    assert main(["site", "probe", str(path), "--model", str(tiny_model_dir), "--steps", "1", "--dry-run"]) == 0
    assert path.read_text() == POLICY_TEXT


def test_a_broken_policy_is_left_as_it_was(tmp_path):
    # Prepare: a policy with a misspelt field
    path = tmp_path / "site.yaml"
    path.write_text("site: site-1\nallowd_jobs: ['x']\n")

    # Execute / Assert
    with pytest.raises(SpecError, match="allowd_jobs"):
        write_measured(path, {"steps_per_minute": 3.0})
    assert yaml.safe_load(path.read_text()) == {"site": "site-1", "allowd_jobs": ["x"]}


def test_no_policy_at_the_path_is_one_clear_line(tmp_path, capsys):
    assert main(["site", "probe", str(tmp_path)]) == 2
    assert "no site policy at" in capsys.readouterr().err
