"""Attestation on a loopback deployment: a site with a wrong measurement is excluded, a site that
cannot verify the server sends it nothing, the job completes with the rest, and the logs say why."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from zenfed.demo import loopback_project
from zenfed.jobs import export_job
from zenfed.jobs.submit import load_result, submit
from zenfed.provisioning.deploy import down, up
from zenfed.provisioning.project import provision

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


def _records(path: Path, event: str) -> list[dict]:
    return [r for r in (json.loads(line) for line in path.open()) if r["event"] == event]


def test_attestation_excludes_and_refuses_with_reasons(tmp_path, tiny_job_spec, small_builtin_data):
    # Prepare: three sites. site-3's configuration changes after provisioning (wrong measurement);
    # site-1 was told to accept only a server measurement the real server does not have.
    data = tmp_path / "data"
    import shutil

    shutil.copytree(small_builtin_data, data)
    shutil.copytree(data / "site-2", data / "site-3")
    deployment = provision(loopback_project("e2e-attest", data_dir=data, sites=3), out=tmp_path / "ws")
    site3_policy = Path(deployment.site_kits["site-3"]) / "local" / "zenfed_site.yaml"
    site3_policy.write_text(site3_policy.read_text() + "# edited after provisioning\n")
    site1_attestation = Path(deployment.site_kits["site-1"]) / "startup" / "attestation.json"
    config = json.loads(site1_attestation.read_text())
    config["peers"][deployment.server]["per_kind"]["emulated"]["allowed_measurements"] = ["0" * 64]
    site1_attestation.write_text(json.dumps(config))
    spec = tiny_job_spec("attest-e2e", federation={"rounds": 2, "min_sites": 1, "task_timeout_s": 300},
                         attestation={"mode": "required"})
    job_dir = export_job(spec, out=tmp_path / "jobs" / spec.name)

    # Execute
    up(deployment, progress=False)
    try:
        outcome = submit(job_dir, admin_kit=deployment.admin_kit(), results_root=tmp_path / "results",
                         timeout_s=480, progress=False)
    finally:
        down(deployment, progress=False)

    # Assert: the job completed with site-2 alone.
    result = load_result(outcome.result_dir)
    assert outcome.status.startswith("FINISHED:COMPLETED")
    assert [r["contributors"] for r in result["rounds"]] == [["site-2"], ["site-2"]]
    audit = outcome.result_dir / "audit"
    server_log = next(p for p in audit.glob("*.jsonl") if not p.stem.startswith("site-"))
    verdicts = {r["fields"]["peer"]: r["fields"] for r in _records(server_log, "attestation")}
    assert verdicts["site-3"]["verdict"] == "fail" and verdicts["site-3"]["decision"] == "excluded"
    assert "measurement" in verdicts["site-3"]["reason"]
    assert verdicts["site-1"]["verdict"] == "pass" and verdicts["site-2"]["verdict"] == "pass"
    # site-1 refused the server: its own log says why, and the server received nothing from it.
    site1 = _records(audit / "site-1.jsonl", "attestation")
    assert site1 and site1[0]["fields"]["verdict"] == "fail" and site1[0]["fields"]["decision"] == "refused"
    assert "measurement" in site1[0]["fields"]["reason"]
    assert not _records(audit / "site-1.jsonl", "update_sent")
    received = {r["fields"]["site"] for r in _records(server_log, "update_received")}
    assert received == {"site-2"}
    # Every log is intact and accounted for.
    from zenfed.audit.verify import verify_result

    verdict = verify_result(outcome.result_dir)
    assert verdict.ok, verdict.describe()
