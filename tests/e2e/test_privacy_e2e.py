"""Privacy budgets on a loopback deployment: a site refuses a job over its per-job limit, another
stops contributing when its budget runs out mid-job, and the job goes on with the rest."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pytest
import yaml

from zenfed.demo import loopback_project
from zenfed.jobs import export_job
from zenfed.jobs.submit import load_result, submit
from zenfed.provisioning.deploy import down, up
from zenfed.provisioning.project import provision
from zenfed.spec import SitePrivacyPolicy

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


def _records(path: Path, event: str) -> list[dict]:
    return [r for r in (json.loads(line) for line in path.open()) if r["event"] == event]


def test_budget_refusal_and_mid_job_exhaustion(tmp_path, tiny_job_spec, small_builtin_data):
    # Prepare: the job plans epsilon 8 over 3 rounds; site-2 starts with room for it.
    data = tmp_path / "data"
    shutil.copytree(small_builtin_data, data)
    shutil.copytree(data / "site-2", data / "site-3")
    project = loopback_project("e2e-privacy", data_dir=data, sites=3)
    budgets = {"site-2": SitePrivacyPolicy(lifetime_epsilon=20.0), "site-3": SitePrivacyPolicy(max_epsilon_per_job=2.0)}
    project = project.model_copy(update={"sites": tuple(
        s.model_copy(update={"privacy": budgets.get(s.name, s.privacy)}) for s in project.sites
    )})
    deployment = provision(project, out=tmp_path / "ws")
    spec = tiny_job_spec("privacy-e2e", federation={"rounds": 3, "min_sites": 1, "task_timeout_s": 300},
                         privacy={"level": "record", "target_epsilon": 8.0, "clip_norm": 1.0})
    job_dir = export_job(spec, out=tmp_path / "jobs" / spec.name)

    site2_policy = Path(deployment.site_kits["site-2"]) / "local" / "zenfed_site.yaml"
    server_kit = Path(deployment.server_kit)

    def lower_budget_after_round_1() -> None:
        # Site IT lowers site-2's lifetime budget below what the job still needs, mid-job.
        deadline = time.time() + 300
        while time.time() < deadline and not any(
            json.loads(p.read_text()).get("completed_round", 0) >= 1
            for p in server_kit.glob("zenfed-checkpoints/*/state.json")
        ):
            time.sleep(0.2)
        policy = yaml.safe_load(site2_policy.read_text())
        policy["privacy"]["lifetime_epsilon"] = 6.5
        site2_policy.write_text(yaml.safe_dump(policy))

    # Execute
    up(deployment, progress=False)
    editor = threading.Thread(target=lower_budget_after_round_1, daemon=True)
    editor.start()
    try:
        outcome = submit(job_dir, admin_kit=deployment.admin_kit(), results_root=tmp_path / "results",
                         timeout_s=480, progress=False)
    finally:
        down(deployment, progress=False)

    # Assert: site-3 never trained; site-2 trained round 1, then stopped; site-1 did every round.
    result = load_result(outcome.result_dir)
    assert outcome.status.startswith("FINISHED:COMPLETED")
    contributors = [r["contributors"] for r in result["rounds"]]
    assert contributors[0] == ["site-1", "site-2"] and contributors[-1] == ["site-1"]
    audit = outcome.result_dir / "audit"
    refusals3 = [r["fields"] for r in _records(audit / "site-3.jsonl", "policy_decision")
                 if r["fields"]["decision"] == "refused"]
    assert refusals3 and "above this site's maximum per job of 2" in refusals3[0]["reason"]
    refusals2 = [r["fields"] for r in _records(audit / "site-2.jsonl", "policy_decision")
                 if r["fields"]["decision"] == "refused"]
    assert refusals2 and "stops contributing" in refusals2[0]["reason"]
    # Epsilon is on the record: per round in the result and the audit log, and in the site's own ledger.
    spent = _records(audit / "site-1.jsonl", "dp_spent")
    assert [r["fields"]["round"] for r in spent] == [1, 2, 3]
    assert spent[-1]["fields"]["epsilon"] <= 8.0 + 1e-9
    eps = [r["sites"]["site-1"]["privacy"]["epsilon"] for r in result["rounds"]]
    # Under DP no site sends its training loss: it comes from the training records without noise.
    assert all("train_loss" not in m for r in result["rounds"] for m in r["sites"].values())
    assert all(r["train_loss"] is None for r in result["rounds"])
    assert eps == pytest.approx([r["fields"]["epsilon"] for r in spent])
    ledger = Path(deployment.site_kits["site-2"]) / "local" / "privacy_ledger.json"
    assert ledger.is_file() and oct(ledger.stat().st_mode & 0o777) == "0o600"
    from zenfed.audit.verify import verify_result

    assert verify_result(outcome.result_dir).ok
