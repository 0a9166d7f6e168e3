"""The site job launcher: a job process ended by a signal is a lost site, any other ending is FLARE's."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time

import pytest
from nvflare.apis.job_launcher_spec import JobReturnCode
from nvflare.app_common.job_launcher.process_launcher import ProcessHandle

from zenfed.executors.site_launcher import LostSiteHandle, exit_code_after_signal, signal_name


@pytest.mark.parametrize(("raw", "expected"), [
    (None, None), (0, 0), (1, 1), (103, 103), (-9, JobReturnCode.UNKNOWN), (-11, JobReturnCode.UNKNOWN),
])
def test_only_a_signal_reads_as_unknown(raw, expected):
    assert exit_code_after_signal(raw) == expected


def test_signals_are_named():
    assert signal_name(-9) == "SIGKILL"
    assert signal_name(-200) == "signal 200"


def _handle(code: str, min_listed_s: float = 0.0) -> tuple[subprocess.Popen, LostSiteHandle]:
    process = subprocess.Popen([sys.executable, "-c", code])
    return process, LostSiteHandle(ProcessHandle(process=process), "job-1", min_listed_s=min_listed_s)


def test_a_killed_job_process_is_reported_as_unknown_not_as_a_failure():
    # Prepare: a job process that would run for a minute; the site log as a list
    process, handle = _handle("import time; time.sleep(60)")
    assert process.poll() is None
    said: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("zenfed.executors.site_launcher")
    saved = logger.disabled, logger.level  # other tests may have configured logging (FLARE does)
    logger.disabled = False
    logger.setLevel(logging.WARNING)
    logger.addHandler(handler)

    # Execute: kill -9 by the PID this test started
    try:
        process.send_signal(signal.SIGKILL)
        handle.wait()
        code = handle.poll()
    finally:
        logger.removeHandler(handler)
        logger.disabled, _ = saved
        logger.setLevel(saved[1])

    # Assert: FLARE's client then reports no failure, and the site log says why
    assert code == JobReturnCode.UNKNOWN
    assert any("ended by SIGKILL" in line for line in said)


@pytest.mark.parametrize(("code", "expected"), [
    ("raise SystemExit(0)", JobReturnCode.SUCCESS),
    ("raise SystemExit(1)", JobReturnCode.EXECUTION_ERROR),
])
def test_a_job_process_that_exits_keeps_flares_reading(code, expected):
    # Execute
    _, handle = _handle(code)
    handle.wait()

    # Assert: a deliberate exit (an error FLARE should act on) is not hidden
    assert handle.poll() == expected


def test_a_job_process_killed_early_stays_listed_until_the_server_can_have_seen_it():
    # Prepare
    process, handle = _handle("import time; time.sleep(60)", min_listed_s=1.5)
    started = time.monotonic()

    # Execute: killed at once, before any heartbeat could list it
    process.send_signal(signal.SIGKILL)
    handle.wait()

    # Assert
    assert time.monotonic() - started >= 1.4
    assert handle.poll() == JobReturnCode.UNKNOWN
