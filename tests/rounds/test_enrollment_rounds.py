"""Enrollment and matched cohorts through a whole job: what sites declare, who trains, and the report."""

from __future__ import annotations

import json

from test_round_without_flare import SITES, audit_records, signed_job

from zenfed import protocol as P
from zenfed.audit.evidence import collect
from zenfed.server.result import RESULT_FILE
from zenfed.server.transport import InProcessTransport
from zenfed.spec import SiteEnrollment


class RecordsTrainTasks(InProcessTransport):
    """Keeps every training task it carries, to check what the server announced."""

    sent_train: list[P.Message]

    def broadcast(self, *, task, message, **kwargs) -> bool:
        if task == P.TASK_TRAIN:
            self.sent_train = [*getattr(self, "sent_train", []), message]
        return super().broadcast(task=task, message=message, **kwargs)


def test_a_matched_cohort_trains_only_the_sites_that_declare_what_the_job_needs(tiny_job_spec, three_site_data,
                                                                                tmp_path):
    # Prepare: site-1 and site-2 declare the tag and a measured speed; site-3 keeps its profile to itself
    spec = tiny_job_spec("in-process-matched", federation={
        "rounds": 2, "min_sites": 2,
        "cohort_requirements": {"domain_tags": ["cardiology"], "min_records": 10, "min_steps_per_minute": 5}})
    declared = SiteEnrollment(domain_tags=("cardiology", "oncology"), device="cpu", steps_per_minute=30.0)
    updates = {"site-1": {"enrollment": declared}, "site-2": {"enrollment": declared},
               "site-3": {"enrollment": SiteEnrollment(disclose=False)}}

    # Execute
    server, transport = signed_job(spec, three_site_data, tmp_path, RecordsTrainTasks, policy_updates=updates)

    # Assert: every site was asked once; only the matching ones trained, every round
    log = server.folders.run / "audit" / "server.jsonl"
    enrolled = audit_records(log, "sites_enrolled")
    assert len(enrolled) == 1
    profiles = enrolled[0]["fields"]["profiles"]
    assert profiles["site-3"] == {"withheld": True}
    assert profiles["site-1"]["domain_tags"] == ["cardiology", "oncology"] and profiles["site-1"]["records"] > 10
    matched = audit_records(log, "cohort_matched")
    assert [m["fields"]["eligible"] for m in matched] == [["site-1", "site-2"]]
    assert matched[0]["fields"]["excluded"] == {"site-3": "its policy withholds its enrollment profile"}
    trained = {site for task, site, _ in transport.answers if task == P.TASK_TRAIN}
    assert trained == {"site-1", "site-2"}
    assert all(m.header[P.H_COHORT] == ["site-1", "site-2"] for m in transport.sent_train)  # announced in the task
    result = json.loads((server.folders.run / RESULT_FILE).read_text())
    assert [r["contributors"] for r in result["rounds"]] == [["site-1", "site-2"]] * 2
    # Each site recorded what it disclosed, in its own log
    sent = audit_records(tmp_path / "site-3" / "run" / "audit" / "site-3.jsonl", "enrollment_sent")
    assert [r["fields"]["profile"] for r in sent] == [{"withheld": True}]

    # Assert: the compliance report shows each profile and why site-3 did not train
    report, _ = collect(server.folders.run)
    by_site = {p["name"]: p for p in report["participants"] if p["name"] in SITES}
    assert by_site["site-1"]["profile"]["steps_per_minute"] == 30.0 and by_site["site-1"]["cohort_excluded"] is None
    assert by_site["site-3"]["cohort_excluded"] == "its policy withholds its enrollment profile"


def test_too_few_matching_sites_stop_the_job_with_the_reason(tiny_job_spec, three_site_data, tmp_path):
    # Prepare: the job needs a GPU; no site declares one
    spec = tiny_job_spec("in-process-no-match", federation={
        "rounds": 1, "min_sites": 2, "cohort_requirements": {"device": "cuda"}})
    updates = {site: {"enrollment": SiteEnrollment(device="cpu")} for site in SITES}

    # Execute
    server, transport = signed_job(spec, three_site_data, tmp_path, policy_updates=updates)

    # Assert
    assert transport.stopped is not None and "only 0 site(s) meet the job's cohort requirements" in transport.stopped
    assert "site-1: it trains on cpu, not cuda" in transport.stopped
    assert not (server.folders.run / RESULT_FILE).exists()


def test_over_selection_keeps_the_first_answers_and_recovers_the_stragglers_masks(tiny_job_spec, three_site_data,
                                                                                   tmp_path):
    # Prepare: three sites asked, two kept, under pairwise masks
    spec = tiny_job_spec("in-process-over", federation={"rounds": 2, "min_sites": 2, "over_selection": 1},
                         encryption={"enabled": True, "secure_aggregation": "pairwise", "quant_bits": 16})

    # Execute
    server, _ = signed_job(spec, three_site_data, tmp_path)

    # Assert: the third answer each round is a straggler, its masks recovered; the logs verify
    from zenfed.audit.verify import verify_result

    log = server.folders.run / "audit" / "server.jsonl"
    stragglers = [(r["fields"]["site"], r["fields"]["round"]) for r in audit_records(log, "error")
                  if r["fields"]["kind"] == "straggler"]
    assert stragglers == [("site-3", 1), ("site-3", 2)]
    assert [r["fields"]["dropped"] for r in audit_records(log, "masks_recovered")] == [["site-3"]] * 2
    result = json.loads((server.folders.run / RESULT_FILE).read_text())
    assert [r["contributors"] for r in result["rounds"]] == [["site-1", "site-2"]] * 2
    verdict = verify_result(server.folders.run)
    assert verdict.ok, verdict.describe()
