"""Why a job stopped, read back from the server's audit log in its downloaded result."""

from __future__ import annotations

import json

from zenfed.jobs.submit import why_it_stopped


def _log(folder, *records) -> None:
    (folder / "audit").mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"event": event, "fields": fields}) for event, fields in records]
    (folder / "audit" / "server.jsonl").write_text("\n".join(lines) + "\nnot json\n")


def test_the_stop_reason_comes_first_then_what_led_to_it(tmp_path):
    # Prepare
    _log(tmp_path,
         ("round_started", {"round": 2}),
         ("error", {"kind": "site_lost", "site": "site-2", "message": "site-2 is lost"}),
         ("error", {"kind": "too_few_sites", "message": "only 1 site(s) remain"}),
         ("error", {"kind": "policy_reload", "message": "not a reason to stop"}))

    # Execute / Assert
    assert why_it_stopped(tmp_path) == "only 1 site(s) remain; site-2 is lost"


def test_a_result_without_logs_gives_no_reason(tmp_path):
    assert why_it_stopped(tmp_path) == ""
