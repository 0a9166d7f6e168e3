"""A relay between the server and the sites cannot alter or replay what passes: tasks down, the released model up."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch
from test_round_without_flare import audit_records, signed_job

from zenfed import protocol as P
from zenfed.audit.verify import verify_result
from zenfed.digest import sha256_hex
from zenfed.server.result import RESULT_FILE
from zenfed.server.transport import InProcessTransport
from zenfed.wire import decode_adapter, encode_adapter


class MeddlingRelay(InProcessTransport):
    """A relay without the server's key.

    It strips the signature off site-3's enrollment task and inflates site-1's declared record count
    on its way up; in round 2 it replays round 1's task to site-2 after the real one and alters
    site-3's; it delivers the final evaluation to site-1 twice, as FLARE re-sends a task whose answer
    it did not get.
    """

    def broadcast(self, *, task, message, targets, on_result, **kwargs) -> bool:
        send = super().broadcast
        if task == P.TASK_ENROLL:
            def inflate(site: str, answer: P.Message) -> None:
                if site == "site-1":
                    answer.header[P.H_PROFILE]["records"] = 10**6
                on_result(site, answer)

            stripped = copy.deepcopy(message)
            del stripped.header[P.H_SERVER_SIGNATURE]
            return (send(task=task, message=message, targets=["site-1", "site-2"], on_result=inflate, **kwargs)
                    and send(task=task, message=stripped, targets=["site-3"], on_result=on_result, **kwargs))
        if task == P.TASK_EVALUATE:
            return (send(task=task, message=message, targets=targets, on_result=on_result, **kwargs)
                    and send(task=task, message=message, targets=["site-1"], on_result=on_result, **kwargs))
        if task != P.TASK_TRAIN:
            return send(task=task, message=message, targets=targets, on_result=on_result, **kwargs)
        if message.header[P.H_ROUND] == 1:
            self.round_one = copy.deepcopy(message)
            return send(task=task, message=message, targets=targets, on_result=on_result, **kwargs)
        altered = copy.deepcopy(message)
        altered.header[P.H_COHORT] = ["site-3"]  # e.g. to make site-3 mask for a cohort of one
        return (send(task=task, message=message, targets=["site-1", "site-2"], on_result=on_result, **kwargs)
                and send(task=task, message=self.round_one, targets=["site-2"], on_result=on_result, **kwargs)
                and send(task=task, message=altered, targets=["site-3"], on_result=on_result, **kwargs))


def _server_errors(root: Path) -> list[dict]:
    return [r["fields"] for r in audit_records(root / "server" / "run" / "audit" / "server.jsonl", "error")]


def test_a_replayed_altered_or_unsigned_task_is_refused_with_its_reason_and_a_resend_declined(
        tiny_job_spec, three_site_data, tmp_path):
    # Prepare
    spec = tiny_job_spec("in-process-relay", federation={"rounds": 2, "min_sites": 1})

    # Execute
    _, transport = signed_job(spec, three_site_data, tmp_path, MeddlingRelay)

    # Assert: round 2 holds site-1's and site-2's updates; each refusal reached the server's log with its reason
    result = json.loads((tmp_path / "server" / "run" / RESULT_FILE).read_text())
    assert [r["contributors"] for r in result["rounds"]] == [["site-1", "site-2", "site-3"], ["site-1", "site-2"]]
    errors = _server_errors(tmp_path)
    round_two = {e["site"]: e["message"] for e in errors if e.get("round") == 2 and e["kind"] == "result_rejected"}
    assert "TaskAuthError" in round_two["site-2"] and "is a replay: its sequence number 2 is not above 3" in round_two[
        "site-2"]
    assert "TaskAuthError" in round_two["site-3"] and "changed on the way" in round_two["site-3"]
    # The first task's failures reach the server's log too: site-1's answer, its profile altered, is refused
    # (the server keeps no profile), site-3 sent none, each with why; site-2's profile stands
    site_1, site_3 = [e["message"] for e in errors if e.get("task") == P.TASK_ENROLL]
    assert site_1 == ("site-1 sent no enrollment profile: the server refused the site's answer: AnswerAuthError: the "
                      "signature on the answer of site-1 to the zenfed_enroll task does not match what arrived: the "
                      "answer was changed on the way; the server does not act on it")
    assert site_3.startswith("site-3 sent no enrollment profile: the server refused the site's answer: "
                             "AnswerToAnotherTask: site-3 answered a zenfed_enroll task it could not verify")
    assert "(it said: TaskAuthError: the zenfed_enroll task is not signed by the server;" in site_3
    enrolled = audit_records(tmp_path / "server" / "run" / "audit" / "server.jsonl", "sites_enrolled")[0]["fields"]
    assert sorted(enrolled["profiles"]) == ["site-2"] and enrolled["silent"] == ["site-1", "site-3"]
    # No site trained on what it refused: site-2 ran round 1 once, site-3 never ran round 2
    trained = [(s, a.header.get(P.H_ROUND)) for t, s, a in transport.answers if t == P.TASK_TRAIN and a.payload]
    assert sorted(trained) == [("site-1", 1), ("site-1", 2), ("site-2", 1), ("site-2", 2), ("site-3", 1)]
    # Each site's own log records its refusal; both took the server's next task, the final evaluation
    for site, reason in (("site-2", "is a replay"), ("site-3", "changed on the way")):
        own = audit_records(tmp_path / site / "run" / "audit" / f"{site}.jsonl", "error")
        assert any(r["fields"]["kind"] == "TaskAuthError" and reason in r["fields"]["message"] for r in own)
    # site-1 evaluated once and declined the resend as such, not as an attack
    evaluations = [a for t, s, a in transport.answers if t == P.TASK_EVALUATE and s == "site-1"]
    assert evaluations[0].status == P.STATUS_OK and "FLARE does when it did not receive" in evaluations[1].refusal
    assert {s for t, s, a in transport.answers if t == P.TASK_EVALUATE and a.status == P.STATUS_OK
            and not a.refusal} == {"site-1", "site-2", "site-3"}


class SubstitutesTheRelease(InProcessTransport):
    """A relay that swaps the adapter a site releases for its own, and recomputes the hash in the header."""

    def broadcast(self, *, task, on_result, **kwargs) -> bool:
        def substitute(site: str, answer: P.Message) -> None:
            if task == P.TASK_RELEASE and answer.payload:
                forged = {name: torch.ones_like(t) for name, t in decode_adapter(answer.payload).items()}
                answer.payload = encode_adapter(forged)
                answer.header[P.H_PAYLOAD_SHA256] = sha256_hex(answer.payload)
                answer.header[P.H_PAYLOAD_BYTES] = len(answer.payload)
            on_result(site, answer)

        return super().broadcast(task=task, on_result=substitute, **kwargs)


def test_a_released_adapter_substituted_on_its_way_to_the_server_is_refused(tiny_job_spec, three_site_data,
                                                                            tmp_path):
    # Prepare: an encrypted job, so the final adapter reaches the server only as one site's release
    spec = tiny_job_spec("in-process-release", encryption={"enabled": True}, federation={"rounds": 1, "min_sites": 3})

    # Execute
    signed_job(spec, three_site_data, tmp_path, SubstitutesTheRelease)

    # Assert: no adapter is released, and the server's log says why
    result = json.loads((tmp_path / "server" / "run" / RESULT_FILE).read_text())
    assert result["final"].get("adapter_dir") is None
    assert not (tmp_path / "server" / "run" / "adapter").exists()
    errors = [r["fields"]["message"] for r in audit_records(tmp_path / "server" / "run" / "audit" / "server.jsonl",
                                                            "error")]
    assert any("the signature on the answer of site-1 to the zenfed_release task does not match" in e
               for e in errors), errors


class ChangesAMetric(InProcessTransport):
    """A relay that flatters site-2's validation loss in its round-2 answer."""

    def broadcast(self, *, task, on_result, **kwargs) -> bool:
        def flatter(site: str, answer: P.Message) -> None:
            if task == P.TASK_TRAIN and site == "site-2" and answer.header.get(P.H_ROUND) == 2:
                answer.header[P.H_EVAL_LOSS] = 0.125
            on_result(site, answer)

        return super().broadcast(task=task, on_result=flatter, **kwargs)


def test_a_metric_changed_on_its_way_is_refused_and_one_changed_at_the_server_is_caught(tiny_job_spec,
                                                                                         three_site_data, tmp_path):
    # Prepare
    spec = tiny_job_spec("in-process-metric", federation={"rounds": 2, "min_sites": 2})

    # Execute: a relay flatters site-2's answer; in an honest run, the server then flatters the result it writes
    signed_job(spec, three_site_data, tmp_path / "relayed", ChangesAMetric)
    signed_job(spec, three_site_data, tmp_path / "honest")
    lying = tmp_path / "lying-server"
    shutil.copytree(tmp_path / "honest" / "server" / "run", lying)
    result = json.loads((lying / RESULT_FILE).read_text())
    result["rounds"][1]["sites"]["site-2"]["eval_loss"] = 0.125
    (lying / RESULT_FILE).write_text(json.dumps(result))

    # Assert: the relayed answer is refused with why, round 2 goes on without it, and the figure is nowhere
    relayed = tmp_path / "relayed" / "server" / "run"
    rejected = [e["message"] for e in _server_errors(tmp_path / "relayed") if e.get("round") == 2
                and e.get("site") == "site-2"]
    assert rejected and "the answer of site-2 to the zenfed_train task does not match" in rejected[0]
    assert [r["contributors"] for r in json.loads((relayed / RESULT_FILE).read_text())["rounds"]] == [
        ["site-1", "site-2", "site-3"], ["site-1", "site-3"]]
    assert "0.125" not in (relayed / RESULT_FILE).read_text()
    assert verify_result(relayed).ok and verify_result(tmp_path / "honest" / "server" / "run").ok
    # Assert: the server's own change is caught against site-2's signed log
    changed = [p for p in verify_result(lying).problems if "the metric was changed" in p]
    assert len(changed) == 1 and changed[0].startswith(
        "the result reports eval_loss 0.125 for site-2 on the global of round 2, but site-2's own log records ")
