"""Server components: jobs a crash left RUNNING are ended and resumed; a hung site's outcome is waited for briefly."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey, ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.job_def import RunStatus

from zenfed import protocol as P
from zenfed.controllers.interrupted_jobs import InterruptedJobRecovery
from zenfed.controllers.site_outcomes import SiteOutcomeWait
from zenfed.server.result import RESULT_FILE


class JobStore:
    """FLARE's job manager as the component uses it, in memory."""

    def __init__(self, jobs: dict[str, dict]) -> None:
        self.meta = jobs

    def get_all_jobs(self, fl_ctx):
        return [SimpleNamespace(job_id=jid, meta=dict(meta)) for jid, meta in self.meta.items()]

    def get_jobs_by_status(self, statuses, fl_ctx):
        wanted = {s.value for s in statuses}
        return [SimpleNamespace(job_id=jid, meta=dict(meta)) for jid, meta in self.meta.items()
                if meta["status"] in wanted]

    def clone(self, from_jid, meta, fl_ctx):
        jid = f"{from_jid}-again"
        self.meta[jid] = {**meta, "job_id": jid, "status": RunStatus.SUBMITTED.value}
        return self.meta[jid]

    def update_meta(self, jid, meta, fl_ctx):
        self.meta[jid].update(meta)

    def set_status(self, jid, status, fl_ctx):
        self.meta[jid]["status"] = status.value


def _context(store: JobStore, root: Path, started: tuple[str, ...] = (), finished: tuple[str, ...] = ()):
    """FLARE's context in the server process: the job store and the server's workspace (run folders)."""
    for job_id in started + finished:
        (root / job_id / "zenfed").mkdir(parents=True)
    for job_id in finished:
        (root / job_id / "zenfed" / RESULT_FILE).write_text("{}")
    fl_ctx = FLContext()
    engine = SimpleNamespace(get_component=lambda name: store, fire_event=lambda *args, **kwargs: None)
    fl_ctx.set_prop(ReservedKey.ENGINE, engine, private=True)
    fl_ctx.set_prop(FLContextKey.WORKSPACE_OBJECT, SimpleNamespace(get_run_dir=lambda job_id: str(root / job_id)),
                    private=True)
    return fl_ctx


def test_a_job_left_running_is_ended_with_the_reason_and_resumed_by_its_submitter(tmp_path):
    # Prepare
    store = JobStore({
        "j1": {"status": RunStatus.RUNNING.value, "name": "demo", "min_clients": 2, "submitter_name": "admin@x"},
        "j2": {"status": RunStatus.FINISHED_COMPLETED.value, "name": "done"},
    })

    # Execute
    done = InterruptedJobRecovery().recover(_context(store, tmp_path, started=("j1",)))

    # Assert
    assert done == [("j1", "j1-again")]
    assert store.meta["j1"]["status"] == RunStatus.FINISHED_ABNORMAL.value
    assert "the server stopped while this job ran" in store.meta["j1"][P.META_INTERRUPTED]
    assert store.meta["j1"][P.META_RESUMED_AS] == "j1-again"
    clone = store.meta["j1-again"]
    assert clone["status"] == RunStatus.SUBMITTED.value and clone["cloned_from"] == "j1"
    assert clone["submitter_name"] == "admin@x" and clone["min_clients"] == 2 and clone[P.META_RESUMES] == 1
    assert store.meta["j2"]["status"] == RunStatus.FINISHED_COMPLETED.value


def test_a_job_interrupted_again_and_again_is_ended_but_not_resumed(tmp_path):
    # Prepare: the third resumed run of a job was interrupted too
    store = JobStore({"j3": {"status": RunStatus.DISPATCHED.value, P.META_RESUMES: 3}})

    # Execute
    done = InterruptedJobRecovery(max_resumes=3).recover(_context(store, tmp_path, started=("j3",)))

    # Assert
    assert done == [("j3", None)]
    assert store.meta["j3"]["status"] == RunStatus.FINISHED_ABNORMAL.value
    assert "not resumed: it was resumed 3 times and interrupted again" in store.meta["j3"][P.META_INTERRUPTED]
    assert P.META_RESUMED_AS not in store.meta["j3"]


def test_resuming_can_be_turned_off(tmp_path):
    store = JobStore({"j4": {"status": RunStatus.RUNNING.value}})
    assert InterruptedJobRecovery(resume=False).recover(_context(store, tmp_path, started=("j4",))) == [("j4", None)]
    assert set(store.meta) == {"j4"} and store.meta["j4"]["status"] == RunStatus.FINISHED_ABNORMAL.value


def test_a_finished_job_is_not_trained_again_and_a_job_that_never_started_is_not_resumed(tmp_path):
    # Prepare: j5 wrote its result before the crash (FLARE had not archived it); j6 never started
    store = JobStore({"j5": {"status": RunStatus.RUNNING.value}, "j6": {"status": RunStatus.DISPATCHED.value}})

    # Execute
    done = InterruptedJobRecovery().recover(_context(store, tmp_path, finished=("j5",)))

    # Assert
    assert done == [("j5", None), ("j6", None)] and set(store.meta) == {"j5", "j6"}
    assert "it had finished: its result is in" in store.meta["j5"][P.META_INTERRUPTED]
    assert "not a zenfed job that started" in store.meta["j6"][P.META_INTERRUPTED]


def test_a_clone_from_a_recovery_cut_short_is_reused_not_made_twice(tmp_path):
    # Prepare: an earlier recovery cloned j7, then the server died before it marked j7
    store = JobStore({"j7": {"status": RunStatus.RUNNING.value},
                      "j7-first": {"status": RunStatus.SUBMITTED.value, "cloned_from": "j7", P.META_RESUMES: 1}})

    # Execute
    done = InterruptedJobRecovery().recover(_context(store, tmp_path, started=("j7",)))

    # Assert
    assert done == [("j7", "j7-first")] and set(store.meta) == {"j7", "j7-first"}


def test_one_jobs_trouble_does_not_leave_the_others_running(tmp_path):
    # Prepare: the store refuses to clone j8
    class CannotCloneJ8(JobStore):
        def clone(self, from_jid, meta, fl_ctx):
            if from_jid == "j8":
                raise OSError("disk full")
            return super().clone(from_jid, meta, fl_ctx)

    store = CannotCloneJ8({"j8": {"status": RunStatus.RUNNING.value}, "j9": {"status": RunStatus.RUNNING.value}})

    # Execute
    done = InterruptedJobRecovery().recover(_context(store, tmp_path, started=("j8", "j9")))

    # Assert
    assert done == [("j9", "j9-again")]
    assert store.meta["j9"]["status"] == RunStatus.FINISHED_ABNORMAL.value
    assert store.meta["j8"]["status"] == RunStatus.FINISHED_ABNORMAL.value
    assert "could not be resumed (OSError: disk full)" in store.meta["j8"][P.META_INTERRUPTED]


def test_the_server_waits_the_configured_time_for_site_outcomes():
    # Prepare
    runner = SimpleNamespace(client_outcome_wait_timeout=900.0)
    fl_ctx = FLContext()
    fl_ctx.set_prop(ReservedKey.ENGINE, SimpleNamespace(job_runner=runner), private=True)

    # Execute
    SiteOutcomeWait(wait_s=30).handle_event(EventType.SYSTEM_START, fl_ctx)

    # Assert
    assert runner.client_outcome_wait_timeout == 30.0
    with pytest.raises(ValueError, match="positive"):
        SiteOutcomeWait(wait_s=0)
