"""A site whose every task runs in a new process (FLARE's simulator with more sites than workers).

Each test runs real jobs of the tiny model in one process, once with one site
session per job and once with a new session for every task, and checks that
the second decides exactly as the first: masks corrected after a dropout, the
privacy accountant going on counting, one release, and no second correction or
release for a replayed request.
"""

from __future__ import annotations

import json
import stat

import pytest
from test_pairwise_rounds import Site3CrashesInRound2
from test_round_without_flare import SITES, audit_records, released_adapter, signed_job

from zenfed import protocol as P
from zenfed.errors import PolicyError
from zenfed.jobs.in_process import SessionPerTask, run_in_process
from zenfed.jobs.simulate import builtin_policies
from zenfed.server.result import RESULT_FILE
from zenfed.site.run_state import RUN_STATE_FILE, SiteRunState

PAIRWISE = {"enabled": True, "secure_aggregation": "pairwise", "max_sites": 8}


class ReplaysCorrectionsAndReleases(Site3CrashesInRound2):
    """site-3 drops out of round 2; every mask correction and release request then reaches each site twice."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.replayed: dict[tuple[str, str], P.Message] = {}

    def broadcast(self, *, task, message, on_result, **kwargs) -> bool:
        carried = super().broadcast(task=task, message=message, on_result=on_result, **kwargs)
        if task in (P.TASK_UNMASK, P.TASK_RELEASE):
            for site in kwargs["targets"]:
                self.replayed[(task, site)] = self.handlers[site](task, message)
        return carried


def _simulator_layout(spec, data, root, *, per_task: bool, transport=None):
    policies = builtin_policies(data, sites=3, dataset="builtin", allow_any_model=True)
    extra = {"transport": transport} if transport else {}
    run = run_in_process(spec, workspace=root, policies=policies, session_per_task=per_task, **extra)
    return run, json.loads((run.result_dir / RESULT_FILE).read_text())


def _spent(transport) -> dict[str, list[float]]:
    """Each site's job epsilon as it reported it after each round."""
    spent: dict[str, list[float]] = {}
    for task, site, answer in transport.answers:
        if task == P.TASK_TRAIN and answer.payload:
            spent.setdefault(site, []).append(round(answer.header[P.H_DP_SPENT]["epsilon"], 9))
    return spent


def test_masks_are_corrected_and_the_adapter_released_as_with_one_session(tiny_job_spec, three_site_data, tmp_path):
    # Prepare: masks, site-3 lost in round 2 (its masks must be corrected by the survivors), a release at the end
    spec = tiny_job_spec("per-task-masks", encryption=PAIRWISE, federation={"rounds": 2, "min_sites": 2})

    # Execute
    _, one = _simulator_layout(spec, three_site_data, tmp_path / "one", per_task=False,
                               transport=Site3CrashesInRound2)
    run, per_task = _simulator_layout(spec, three_site_data, tmp_path / "per-task", per_task=True,
                                      transport=ReplaysCorrectionsAndReleases)

    # Assert: every task ran in a session of its own, and the job went as with one session per site
    assert all(isinstance(s, SessionPerTask) and s.sessions >= 4 for s in run.sites.values())
    assert [r["contributors"] for r in per_task["rounds"]] == [list(SITES), ["site-1", "site-2"]]
    assert [r["contributors"] for r in one["rounds"]] == [r["contributors"] for r in per_task["rounds"]]
    a, b = released_adapter(tmp_path / "one"), released_adapter(tmp_path / "per-task")
    step = spec.encryption.clip / (2 ** (spec.encryption.quant_bits - 1) - 1)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 4 * step

    # Assert: a replayed correction or release, in yet another session, is refused with the reason
    replayed = run.transport.replayed
    assert {site for task, site in replayed if task == P.TASK_UNMASK} == {"site-1", "site-2"}
    for (task, site), answer in replayed.items():
        expected = "second mask correction" if task == P.TASK_UNMASK else "only once"
        assert expected in str(answer.refusal), (task, site, answer.refusal)

    # Assert: what the sessions kept is a 0600 file of public facts
    kept = tmp_path / "per-task" / "site-1" / "run" / RUN_STATE_FILE
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    facts = json.loads(kept.read_text())
    assert facts["released"] is True and facts["masked_round"]["corrected"] is True
    masked = facts["masked_round"]
    assert masked["cohort"] == list(SITES) and set(masked["peers"]) == {"site-2", "site-3"}


def test_the_privacy_accountant_goes_on_counting_without_a_ledger(tiny_job_spec, three_site_data, tmp_path):
    # Prepare: record DP in the simulator layout, where no kit holds a ledger
    spec = tiny_job_spec("per-task-dp", privacy={"level": "record", "noise_multiplier": 0.9, "clip_norm": 1.0},
                         federation={"rounds": 3, "min_sites": 3})

    # Execute
    one, _ = _simulator_layout(spec, three_site_data, tmp_path / "one", per_task=False)
    per_task, result = _simulator_layout(spec, three_site_data, tmp_path / "per-task", per_task=True)

    # Assert: every site reports the same growing job epsilon, round by round, as with one session
    expected = _spent(one.transport)
    assert sorted(expected) == list(SITES)
    assert all(len(e) == 3 and e[0] < e[1] < e[2] for e in expected.values())
    assert _spent(per_task.transport) == expected
    assert result["final"]["adapter_dir"] is not None


def test_signed_kits_keep_one_audit_chain_across_sessions(tiny_job_spec, three_site_data, tmp_path):
    # Prepare: provisioned-style kits, audited, masks and record DP (the signed ledger), site-3 lost in round 2
    spec = tiny_job_spec("per-task-signed", encryption=PAIRWISE,
                         privacy={"level": "record", "noise_multiplier": 0.9, "clip_norm": 1.0},
                         federation={"rounds": 2, "min_sites": 2})

    # Execute
    _, transport = signed_job(spec, three_site_data, tmp_path, Site3CrashesInRound2, session_per_task=True)

    # Assert: recovered round, growing spend, and each site's log one chain that says where a process took over
    from zenfed.audit.verify import verify_result

    out = tmp_path / "server" / "run"
    result = json.loads((out / RESULT_FILE).read_text())
    assert transport.stopped is None and result["rounds"][1]["contributors"] == ["site-1", "site-2"]
    assert verify_result(out).ok
    spent = _spent(transport)
    assert spent["site-1"][0] < spent["site-1"][1]
    log = tmp_path / "site-1" / "run" / "audit" / "site-1.jsonl"
    started = audit_records(log, "job_started")
    assert not started[0]["fields"].get("continued") and all(r["fields"]["continued"] for r in started[1:])
    assert len(started) >= 4
    assert [r["fields"]["round"] for r in audit_records(log, "masks_corrected") if "survivors" in r["fields"]] == [2]


def test_a_damaged_session_file_is_refused_with_what_to_do(tmp_path):
    # Prepare
    (tmp_path / RUN_STATE_FILE).write_text("{not json")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / RUN_STATE_FILE).write_text(json.dumps({"format": "something-else"}))

    # Execute / Assert
    with pytest.raises(PolicyError, match="cannot be read.*restart the job"):
        SiteRunState(tmp_path)
    with pytest.raises(PolicyError, match="not a zenfed site session file"):
        SiteRunState(tmp_path / "other")
    fresh = SiteRunState(tmp_path / "new")
    assert not fresh.resumed
    fresh.set(last_sent_values=7)
    assert SiteRunState(tmp_path / "new").get("last_sent_values") == 7
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o700
