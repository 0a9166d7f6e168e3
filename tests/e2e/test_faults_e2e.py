"""Faults on real loopback deployments (tiny model, CKKS with pairwise masks), as an operator would meet them.

- a site's job process killed mid-round (``kill -9``): dropped, masks recovered, job finishes;
  with too few sites left the job stops and says why, keeping its checkpoint;
- in one job, a site's job process frozen (``SIGSTOP``) and another site cut off (its own network
  namespace, the link's bytes dropped): both left behind after the straggler grace;
- an update changed after signing at a site (bit flipped, hash recomputed): rejected, the round goes on;
- the server and everything under it killed mid-job, then ``zenfed up`` again: the job resumes by itself;
- another project's admin and site: refused, with the reason;
- a copy of a result with records cut from the end of the server's log: ``audit verify`` catches it.

Each asserts that nothing was lost: every round's records are present and ``audit verify`` passes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
import pytest
from netlink import HostEnd, Namespace, namespaces_usable
from safetensors.torch import load_file

from zenfed import protocol as P
from zenfed.audit.evidence import collect
from zenfed.audit.verify import verify_result
from zenfed.data import make_builtin
from zenfed.demo import loopback_project
from zenfed.engines import make_engine
from zenfed.engines.tiny import build_tiny_model
from zenfed.errors import DeploymentError, JobError
from zenfed.jobs import export_job
from zenfed.jobs.in_process import run_in_process
from zenfed.jobs.simulate import builtin_policies
from zenfed.jobs.submit import SubmitResult, load_result, open_session, submit
from zenfed.privacy.he import packing_for
from zenfed.provisioning.deploy import _env, _start, _tracked, down, up
from zenfed.provisioning.link_check import diagnose_link
from zenfed.provisioning.project import Deployment, provision
from zenfed.spec import JobSpec

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

VICTIM = "site-3"  # the site whose job process the three-site test kills


def _records(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _server_shows(server_kit: Path, event: str, rnd: int) -> bool:
    """Whether the server's log (in its run folder) holds ``event`` for training round ``rnd``."""
    return any(r["event"] == event and r["fields"].get("round") == rnd and r["fields"].get("task") == P.TASK_TRAIN
               for log in server_kit.glob("*/zenfed/audit/*.jsonl") for r in _records(log))


def _wait_for(server_kit: Path, event: str, rnd: int, submitter: threading.Thread) -> None:
    """Wait until the server records ``event`` for round ``rnd``; fail if the job ends or stalls first."""
    deadline = time.time() + 300
    while not _server_shows(server_kit, event, rnd):
        assert submitter.is_alive(), f"the job ended before {event} of round {rnd}"
        assert time.time() < deadline, f"no {event} of round {rnd} within 300 s"
        time.sleep(0.05)


def _end_with_descendants(process: subprocess.Popen) -> None:
    """SIGKILL a process this test started and every process under it (FLARE puts jobs in their own sessions)."""
    try:
        family = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    for proc in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    process.wait()


def _cutting_the_server_log_is_caught(result_dir: Path, server: str | None, scratch: Path) -> None:
    """Cut the last 1 and 5 records from a copy of the server's log: ``audit verify`` must say so."""
    for cut in (1, 5):
        copy = scratch / f"cut-{cut}"
        shutil.copytree(result_dir, copy)
        log = copy / "audit" / f"{server}.jsonl"
        lines = log.read_bytes().rstrip(b"\n").split(b"\n")
        log.write_bytes(b"\n".join(lines[:-cut]) + b"\n")
        verdict = verify_result(copy)
        assert not verdict.ok and any("cut from its end" in p for p in verdict.problems), verdict.describe()


def _job_process(site_pid: int) -> psutil.Process:
    """The site's job process: the child of the site process ``up`` started that runs FLARE's worker."""
    for proc in psutil.Process(site_pid).children(recursive=True):
        if any("worker_process" in part for part in proc.cmdline()):
            return proc
    raise AssertionError(f"no job process under site pid {site_pid}")


@dataclass
class KillRun:
    """What a deployment run with one site's job process killed left."""

    result: SubmitResult | None
    error: BaseException | None
    killed_at: float
    finished_at: float
    site_still_up: bool


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny model and built-in data for up to four sites."""
    root = tmp_path_factory.mktemp("faults")
    model = build_tiny_model(root / "tiny")
    data = root / "data"
    make_builtin(data, sites=4, train_per_site=60, valid_per_site=8, test_per_task=4)
    return model, data


def _spec(model: Path, name: str, *, rounds: int = 3, min_sites: int = 2, **federation: Any) -> JobSpec:
    """A short masked job on the tiny model."""
    return JobSpec.model_validate({
        "name": name, "model": {"base": str(model)}, "lora": {"rank": 4, "alpha": 8},
        "training": {"local_steps": 3, "batch_size": 8, "seq_len": 128, "learning_rate": 0.01},
        "federation": {"rounds": rounds, "min_sites": min_sites, "lost_site_grace_s": 5, **federation},
        "evaluation": {"max_examples": 4, "max_new_tokens": 2},
        "encryption": {"enabled": True, "secure_aggregation": "pairwise", "max_sites": 4},
    })


def _set_outcome_wait(server_kit: Path, seconds: int) -> None:
    """Shorten the server's wait for a hung site's outcome, as an operator would in resources.json."""
    path = server_kit / "local" / "resources.json"
    resources = json.loads(path.read_text())
    for component in resources["components"]:
        if component["id"] == "zenfed_site_outcome_wait":
            component["args"]["wait_s"] = seconds
    path.write_text(json.dumps(resources))


class BackgroundSubmit:
    """``zenfed submit`` of a job in a thread, so that the test can inject a fault while it runs."""

    def __init__(self, job: Path, deployment: Deployment, results: Path) -> None:
        self.result: SubmitResult | None = None
        self.error: BaseException | None = None

        def run() -> None:
            try:
                self.result = submit(job, admin_kit=deployment.admin_kit(), results_root=results, progress=False,
                                     timeout_s=600)
            except BaseException as err:  # noqa: BLE001 - handed to the test thread
                self.error = err

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def join(self) -> float:
        """Wait for the submit to end; return when it did."""
        self.thread.join(timeout=600)
        return time.time()


def _kill_in_round_2(tmp_path: Path, model: Path, data: Path, *, sites: int, rounds: int = 3) -> KillRun:
    """Run a masked job (``min_sites`` 2) on ``sites`` sites; kill the last site's job process in round 2."""
    victim = f"site-{sites}"
    deployment = provision(loopback_project("faults-e2e", data_dir=data, sites=sites), out=tmp_path / "ws")
    job = export_job(_spec(model, "site-killed", rounds=rounds), out=tmp_path / "jobs" / "site-killed")
    server_kit = Path(deployment.server_kit)
    up(deployment, progress=False)
    try:
        submitting = BackgroundSubmit(job, deployment, tmp_path / "results")
        site_pid = int(_tracked(deployment)[victim]["pid"])
        # Frozen as round 1 ends, the victim cannot answer round 2 before the kill lands mid-round.
        _wait_for(server_kit, "round_ended", 1, submitting.thread)
        victim_process = _job_process(site_pid)
        victim_process.send_signal(signal.SIGSTOP)
        _wait_for(server_kit, "round_started", 2, submitting.thread)
        victim_process.send_signal(signal.SIGKILL)
        killed_at = time.time()
        finished_at = submitting.join()
        still_up = psutil.pid_exists(site_pid)
    finally:
        down(deployment, progress=False)
    return KillRun(result=submitting.result, error=submitting.error, killed_at=killed_at, finished_at=finished_at,
                   site_still_up=still_up)


def test_a_site_killed_mid_round_is_dropped_and_the_masked_job_finishes(tiny_setup, tmp_path: Path) -> None:
    # Execute: three sites, min_sites 2; site-3's job process killed when round 2 starts
    run = _kill_in_round_2(tmp_path, *tiny_setup, sites=3)
    killed_at, finished_at = run.killed_at, run.finished_at

    # Assert: the job finished with site-1 and site-2, and says who was lost, when and why
    assert run.error is None and run.result is not None, run.error
    result_dir = run.result.result_dir
    result = load_result(result_dir)
    assert len(result["rounds"]) == 3
    assert (result_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert run.site_still_up  # only its job process died; the site process stayed up
    verdict = verify_result(result_dir)
    server = _records(result_dir / "audit" / f"{verdict.server}.jsonl")
    _cutting_the_server_log_is_caught(result_dir, verdict.server, tmp_path / "cut")
    ended = {r["fields"]["round"]: r["fields"].get("contributors") for r in server
             if r["event"] == "round_ended" and r["fields"].get("task") == P.TASK_TRAIN}
    lost_round = min(rnd for rnd, who in ended.items() if VICTIM not in who)
    assert lost_round == 2, ended
    assert ended[3] == ["site-1", "site-2"]
    errors = [r["fields"] for r in server if r["event"] == "error"]
    lost = [e for e in errors if e["kind"] == "site_lost"]
    assert [e["site"] for e in lost] == [VICTIM] and "job process is gone" in lost[0]["message"]
    silent = [e for e in errors if e["kind"] == "no_answer" and e["site"] == VICTIM]
    assert silent and silent[0]["round"] == 2 and "job process is gone" in silent[0]["message"]
    assert not [e for e in errors if e["kind"] == "too_few_sites"]
    report, _ = collect(result_dir)  # the compliance report names the loss too
    assert ("site_lost", VICTIM, 2) in {(f["kind"], f.get("site"), f.get("round")) for f in report["audit"]["failures"]}
    recovered = [r["fields"] for r in server if r["event"] == "masks_recovered"]
    assert recovered and recovered[0]["round"] == 2 and recovered[0]["dropped"] == [VICTIM]
    started_3 = [r["fields"]["sites"] for r in server if r["event"] == "round_started" and r["fields"]["round"] == 3
                 and r["fields"]["task"] == P.TASK_TRAIN]
    assert started_3 == [["site-1", "site-2"]]
    assert verdict.ok, verdict.describe()
    recovered_at = next(r["time"] for r in server if r["event"] == "round_ended" and r["fields"]["round"] == 2)
    print(f"site killed -> round 2 went on without it after "
          f"{datetime.fromisoformat(recovered_at.replace('Z', '+00:00')).timestamp() - killed_at:.1f} s; "
          f"job finished {finished_at - killed_at:.0f} s after the kill")


def test_a_site_killed_below_min_sites_stops_the_job_with_the_reason(tiny_setup, tmp_path: Path) -> None:
    # Execute: two sites, min_sites 2; site-2's job process killed when round 2 starts
    run = _kill_in_round_2(tmp_path, *tiny_setup, sites=2, rounds=2)

    # Assert: the submitter is told why, in one line; round 1 stays checkpointed for a resubmission
    assert run.result is None and isinstance(run.error, JobError)
    message = str(run.error)
    assert "site-2 was lost and only 1 site(s) remain, fewer than min_sites=2" in message
    assert "keeping the checkpoint after round 1" in message
    checkpoints = list((tmp_path / "ws").glob("faults-e2e/prod_*/*/zenfed-checkpoints/*/state.json"))
    assert checkpoints and json.loads(checkpoints[0].read_text())["completed_round"] == 1
    print(f"site killed -> job stopped {run.finished_at - run.killed_at:.0f} s after the kill: {message}")


def test_a_server_killed_mid_job_comes_back_and_the_job_resumes_from_its_checkpoint(tiny_setup,
                                                                                     tmp_path: Path) -> None:
    # Prepare: two sites, masks, three rounds
    model, data = tiny_setup
    deployment = provision(loopback_project("faults-e2e", data_dir=data, sites=2), out=tmp_path / "ws")
    job = export_job(_spec(model, "server-killed"), out=tmp_path / "jobs" / "server-killed")
    server_kit = Path(deployment.server_kit)

    # Execute: kill the server and everything under it (a crashed machine) once round 2 starts, then `up` again
    up(deployment, progress=False)
    try:
        submitting = BackgroundSubmit(job, deployment, tmp_path / "results")
        _wait_for(server_kit, "round_started", 2, submitting.thread)
        leader = psutil.Process(int(_tracked(deployment)[deployment.server]["pid"]))
        family = [leader, *leader.children(recursive=True)]
        for proc in family:
            proc.send_signal(signal.SIGKILL)
        psutil.wait_procs(family, timeout=30)
        killed_at = time.time()
        up(deployment, progress=False)  # starts the server only: the sites are still up
        restarted_at = time.time()
        finished_at = submitting.join()
        session = open_session(Path(deployment.admin_kit()), timeout_s=30)
        try:
            jobs = {j["job_id"]: session.get_job_meta(j["job_id"]) for j in session.list_jobs()}
        finally:
            session.close()
    finally:
        down(deployment, progress=False)

    # Assert: the interrupted job is ended with the reason and names the job that resumed it
    interrupted = [meta for meta in jobs.values() if meta.get(P.META_RESUMED_AS)]
    assert len(interrupted) == 1 and interrupted[0]["status"] == "FINISHED:ABNORMAL"
    assert "the server stopped while this job ran" in interrupted[0][P.META_INTERRUPTED]
    assert not [meta for meta in jobs.values() if meta["status"] == "RUNNING"]

    # Assert: the submitter followed the resumed job to its result, which holds every round's trail
    assert submitting.error is None and submitting.result is not None, submitting.error
    result_dir = submitting.result.result_dir
    result = load_result(result_dir)
    assert [r["round"] for r in result["rounds"]] == [1, 2, 3]
    assert submitting.result.job_id == interrupted[0][P.META_RESUMED_AS]
    verdict = verify_result(result_dir)
    assert verdict.ok, verdict.describe()
    server = _records(result_dir / "audit" / f"{verdict.server}.jsonl")
    resumed = [r["fields"] for r in server if r["event"] == "job_resumed"]
    kept = list((result_dir / "audit" / "previous").glob("*/*.jsonl"))
    before = sorted({r["fields"]["round"] for log in kept for r in _records(log)
                     if r["event"] == "round_ended" and r["fields"].get("task") == P.TASK_TRAIN})
    assert before and before[0] == 1  # the crashed run's rounds, kept in the result
    assert resumed and resumed[0]["after_round"] == before[-1] and resumed[0]["previous"]
    trained = [r["fields"]["round"] for r in server
               if r["event"] == "round_ended" and r["fields"]["task"] == P.TASK_TRAIN]
    assert trained == list(range(before[-1] + 1, 4))  # the checkpointed rounds were not trained again
    # Assert: nothing was lost: the resumed job's adapter is that of the same job run uninterrupted (the
    # same site and server code in one process, on the same data), within the packing's step
    spec = JobSpec.model_validate(result["job"]["spec"])
    clean = run_in_process(spec, workspace=tmp_path / "clean",
                           policies=builtin_policies(data, sites=2, dataset="builtin", allow_any_model=True))
    resumed_adapter = load_file(str(result_dir / "adapter" / "adapter_model.safetensors"))
    clean_adapter = load_file(str(clean.result_dir / "adapter" / "adapter_model.safetensors"))
    step = packing_for(spec.encryption).step
    assert set(resumed_adapter) == set(clean_adapter)
    worst = max(float((resumed_adapter[k] - clean_adapter[k]).abs().max()) for k in clean_adapter)
    assert worst <= 2 * step, f"resumed adapter differs from the uninterrupted run by {worst} (step {step})"
    initial = make_engine(spec, model_dir=model, threads=1).initial_adapter()
    trained = max(float((clean_adapter[k] - initial[k]).abs().max()) for k in initial)
    assert trained > 50 * step, f"the job moved the adapter by {trained} only (step {step}): nothing to compare"
    print(f"server killed -> back up in {restarted_at - killed_at:.0f} s; resumed job finished "
          f"{finished_at - killed_at:.0f} s after the kill")


def test_another_projects_admin_and_site_are_refused_with_the_reason(tiny_setup, tmp_path: Path) -> None:
    # Prepare: project B provisioned for the same host and ports as project A, whose deployment is up
    _, data = tiny_setup
    ours = loopback_project("faults-a", data_dir=data, sites=1)
    theirs = ours.model_copy(update={"name": "faults-b"})
    deployment = provision(ours, out=tmp_path / "ws-a")
    foreign = provision(theirs, out=tmp_path / "ws-b")
    up(deployment, progress=False)
    try:
        # Execute: B's admin opens a session; B's site process tries to join (started here, ended by its PID)
        with pytest.raises(DeploymentError) as refused:
            open_session(Path(foreign.admin_kit()), timeout_s=5)
        site_log = tmp_path / "foreign-site.log"
        site_pid = _start(foreign.site_kits["site-1"], site_log)  # as `zenfed up` starts a site
        try:
            deadline = time.time() + 60
            while "CERTIFICATE_VERIFY_FAILED" not in site_log.read_text(errors="replace") and time.time() < deadline:
                time.sleep(1)
        finally:
            os.killpg(site_pid, signal.SIGKILL)
            os.waitpid(site_pid, 0)
        session = open_session(Path(deployment.admin_kit()), timeout_s=30)
        try:
            connected = [c.name for c in session.get_system_info().client_info]
        finally:
            session.close()
        site_diagnosis = diagnose_link(Path(foreign.site_kits["site-1"]))  # what `zenfed up` says of such a site
    finally:
        down(deployment, progress=False)
    nobody = diagnose_link(Path(deployment.site_kits["site-1"]))

    # Assert: the admin is told it holds another project's kit; the site never joined
    assert "certificate that this kit's root CA did not issue" in str(refused.value)
    assert "another project" in str(refused.value)
    assert "CERTIFICATE_VERIFY_FAILED" in site_log.read_text(errors="replace")
    assert connected == ["site-1"]  # project A's own site, still the only one
    assert "root CA did not issue" in site_diagnosis and "another project" in site_diagnosis
    assert nobody.startswith("nothing answers at localhost:") and "zenfed up" in nobody


def test_a_frozen_site_and_a_cut_off_site_are_left_behind_and_the_job_finishes(tiny_setup, tmp_path: Path) -> None:
    # Prepare: four sites; site-4 in its own network namespace, linked to the server's port by a cuttable relay
    why_not = namespaces_usable()
    if why_not:
        pytest.skip(f"network namespaces are not available: {why_not}")
    model, data = tiny_setup
    deployment = provision(loopback_project("faults-e2e", data_dir=data, sites=4), out=tmp_path / "ws")
    job = export_job(_spec(model, "site-cut-off", straggler_grace_s=3), out=tmp_path / "jobs" / "site-cut-off")
    server_kit = Path(deployment.server_kit)
    _set_outcome_wait(server_kit, 5)
    frozen, cut_off = "site-3", "site-4"
    on_host = dataclasses.replace(deployment,
                                  site_kits={k: v for k, v in deployment.site_kits.items() if k != cut_off})
    with contextlib.ExitStack() as cleanup:  # undone in reverse, whatever fails
        link = HostEnd(tmp_path / "link.sock", deployment.fl_port).start()
        cleanup.callback(link.close)
        namespace = Namespace(f"zenfed-cut-{os.getpid()}", unix_path=tmp_path / "link.sock", port=deployment.fl_port)
        cleanup.callback(namespace.close)
        cleanup.callback(down, on_host, progress=False)
        up(on_host, progress=False)
        with (tmp_path / f"{cut_off}.log").open("wb") as out:
            site = subprocess.Popen(["ip", "netns", "exec", namespace.name, "bash", "startup/sub_start.sh", "--once"],
                                    cwd=deployment.site_kits[cut_off], env=_env(), stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        cleanup.callback(_end_with_descendants, site)
        session = open_session(Path(deployment.admin_kit()), timeout_s=30)
        try:
            deadline = time.time() + 90
            while cut_off not in {c.name for c in session.get_system_info().client_info}:
                assert time.time() < deadline, f"{cut_off} did not connect through the link"
                time.sleep(1)
        finally:
            session.close()

        # Execute: once round 1 ends, freeze site-3's job process (SIGSTOP) and cut site-4's link
        submitting = BackgroundSubmit(job, deployment, tmp_path / "results")
        _wait_for(server_kit, "round_ended", 1, submitting.thread)  # before round 2's task can reach them
        _job_process(int(_tracked(deployment)[frozen]["pid"])).send_signal(signal.SIGSTOP)
        link.cut()
        faulted_at = time.time()
        finished_at = submitting.join()

    # Assert: rounds 2 and 3 went on without both, said why each time, and the job's logs verify
    assert submitting.error is None and submitting.result is not None, submitting.error
    result_dir = submitting.result.result_dir
    verdict = verify_result(result_dir)
    assert verdict.ok, verdict.describe()
    server = _records(result_dir / "audit" / f"{verdict.server}.jsonl")
    ended = {r["fields"]["round"]: r["fields"]["contributors"] for r in server
             if r["event"] == "round_ended" and r["fields"]["task"] == P.TASK_TRAIN}
    assert ended == {1: ["site-1", "site-2", frozen, cut_off], 2: ["site-1", "site-2"], 3: ["site-1", "site-2"]}
    silent = [r["fields"] for r in server if r["event"] == "error" and r["fields"]["kind"] == "no_answer"]
    assert {(e["site"], e["round"], e["task"]) for e in silent} >= {
        (site, rnd, P.TASK_TRAIN) for site in (frozen, cut_off) for rnd in (2, 3)}
    assert "not within 3 s after 2 site(s) answered" in silent[0]["message"]
    print(f"site frozen and link cut -> job finished {finished_at - faulted_at:.0f} s after")


def test_an_update_changed_after_signing_is_rejected_and_the_masked_round_goes_on(tiny_setup,
                                                                                   tmp_path: Path) -> None:
    # Prepare: site-2's kit runs a result filter that flips a bit of each update and recomputes its hash
    model, data = tiny_setup
    deployment = provision(loopback_project("faults-e2e", data_dir=data, sites=3), out=tmp_path / "ws")
    kit = Path(deployment.site_kits["site-2"])
    (kit / "local" / "custom").mkdir(exist_ok=True)
    shutil.copyfile(Path(__file__).with_name("tamper_filter.py"), kit / "local" / "custom" / "tamper_filter.py")
    (kit / "local" / "privacy.json").write_text(json.dumps({
        "scopes": [{"name": "tampered", "task_result_filters": [
            {"path": "tamper_filter.FlipABitAndRehash", "args": {}}]}],
        "default_scope": "tampered",
    }))
    resources = json.loads((kit / "local" / "resources.json").read_text())
    resources["class_allow_list"].append("tamper_filter.")
    (kit / "local" / "resources.json").write_text(json.dumps(resources))
    job = export_job(_spec(model, "tampered", rounds=2), out=tmp_path / "jobs" / "tampered")

    # Execute
    up(deployment, progress=False)
    try:
        outcome = submit(job, admin_kit=deployment.admin_kit(), results_root=tmp_path / "results", progress=False,
                         timeout_s=600)
    finally:
        down(deployment, progress=False)

    # Assert: every round rejected site-2's update for its signature, summed the others, and says so
    verdict = verify_result(outcome.result_dir)
    server = _records(outcome.result_dir / "audit" / f"{verdict.server}.jsonl")
    rejected = [r["fields"] for r in server if r["event"] == "error" and r["fields"]["kind"] == "result_rejected"]
    assert [(e["site"], e["round"]) for e in rejected] == [("site-2", 1), ("site-2", 2)]
    assert all("signature" in e["message"] and "does not match" in e["message"] for e in rejected)
    ended = [r["fields"]["contributors"] for r in server
             if r["event"] == "round_ended" and r["fields"]["task"] == P.TASK_TRAIN]
    assert ended == [["site-1", "site-3"]] * 2
    recovered = [r["fields"]["dropped"] for r in server if r["event"] == "masks_recovered"]
    assert recovered == [["site-2"]] * 2
    assert verdict.ok, verdict.describe()
