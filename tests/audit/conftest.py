"""Fixtures: a really provisioned FLARE project, and a job result written with its kit keys."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from zenfed.audit import AuditLog, events

NVFLARE_CLI = [sys.executable, "-c", "import sys; from nvflare.cli import main; sys.exit(main())"]
SERVER, SITES, ADMIN = "server1", ("site-1", "site-2"), "admin@example.com"

PROJECT_YML = """\
api_version: 3
name: {name}
description: audit tests
participants:
  - name: server1
    type: server
    org: hospital
    fed_learn_port: 18002
    admin_port: 18003
  - name: site-1
    type: client
    org: hospital
  - name: site-2
    type: client
    org: bank
  - name: admin@example.com
    type: admin
    org: hospital
    role: project_admin
builders:
  - path: nvflare.lighter.impl.workspace.WorkspaceBuilder
  - path: nvflare.lighter.impl.static_file.StaticFileBuilder
    args:
      config_folder: config
  - path: nvflare.lighter.impl.cert.CertBuilder
"""


@dataclass(frozen=True)
class Project:
    """Startup folders of a provisioned project, by participant name."""

    startup: dict[str, Path]

    @property
    def root_ca(self) -> Path:
        return self.startup[SERVER] / "rootCA.pem"

    def key(self, name: str) -> Path:
        stem = "server" if name == SERVER else "client"
        return self.startup[name] / f"{stem}.key"

    def cert(self, name: str) -> Path:
        stem = "server" if name == SERVER else "client"
        return self.startup[name] / f"{stem}.crt"


def _provision(base: Path, name: str) -> Project:
    if importlib.util.find_spec("nvflare") is None:
        pytest.skip("nvflare provisions the test kits and is not installed; install the project")
    base.mkdir(parents=True, exist_ok=True)
    (base / "project.yml").write_text(PROJECT_YML.format(name=name))
    subprocess.run([*NVFLARE_CLI, "provision", "-p", "project.yml", "-w", "ws"], cwd=base,
                   check=True, capture_output=True, timeout=120)
    prod = base / "ws" / name / "prod_00"
    return Project({p.name: p / "startup" for p in prod.iterdir() if (p / "startup").is_dir()})


@pytest.fixture(scope="session")
def project(tmp_path_factory: pytest.TempPathFactory) -> Project:
    return _provision(tmp_path_factory.mktemp("prov"), "zenfedaudit")


@pytest.fixture(scope="session")
def foreign_project(tmp_path_factory: pytest.TempPathFactory) -> Project:
    return _provision(tmp_path_factory.mktemp("prov_foreign"), "otherproject")


def _payload(site: str, rnd: int) -> bytes:
    # Stand-in for a serialized ciphertext: its size differs per site and round.
    return hashlib.sha256(f"{site}/{rnd}".encode()).digest() * (1000 + 37 * rnd + 5 * len(site)
                                                                 + 3 * int(site[-1]))


def write_result(project: Project, out: Path, *, rounds: int = 3, server_errors: tuple[dict, ...] = (),
                 substituted: tuple[str, int] | None = None) -> Path:
    """Write a job result as the server controller and the site executors would.

    Site logs are written as the sites would; the server log receives the same
    updates and anchors each site log's head; zenfed_result.json repeats the numbers.
    """
    audit = out / "audit"
    audit.mkdir(parents=True)
    shutil.copy(project.root_ca, audit / "rootCA.pem")
    spec = {"name": "demo", "federation": {"rounds": rounds, "min_sites": 2},
            "privacy": {"dp": {"epsilon": 8.0, "delta": 1e-5, "clip_norm": 1.0}}}
    spec_hash = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
    job_id = "4f1c-job"
    server = AuditLog.for_kit(project.startup[SERVER], log_path=audit / f"{SERVER}.jsonl")
    server.append(events.JOB_SUBMITTED, job="demo", job_id=job_id, submitter=ADMIN,
                  spec_sha256=spec_hash)
    server.append(events.JOB_DEPLOYED, job_id=job_id, sites=list(SITES))
    server.append(events.JOB_STARTED, job_id=job_id)
    site_logs = {s: AuditLog.for_kit(project.startup[s], log_path=audit / f"{s}.jsonl")
                 for s in SITES}
    for log in site_logs.values():
        log.append(events.POLICY_DECISION, decision="accepted", job_id=job_id,
                   reason="model and dataset allowed by the site policy")
        log.append(events.ATTESTATION, peer=SERVER, tee_kind="mock", verdict="trusted")
    result_rounds = []
    global_sha = None
    for rnd in range(1, rounds + 1):
        server.append(events.ROUND_STARTED, round=rnd, sites=list(SITES))
        site_entries = {}
        inputs = []
        for i, (s, log) in enumerate(site_logs.items()):
            payload = _payload(s, rnd)
            sha, size = hashlib.sha256(payload).hexdigest(), len(payload)
            train_loss = 2.5 - 0.3 * rnd - 0.1 * i
            log.append(events.DP_SPENT, round=rnd, epsilon=0.5 * rnd, delta=1e-5,
                       noise_multiplier=1.1, clip_norm=1.0)
            log.append(events.UPDATE_SENT, round=rnd, sha256=sha, size=size,
                       kind="encrypted_adapter_update")
            metrics = {"eval_loss": train_loss + 0.2, "accuracy": 0.2 + 0.1 * rnd + 0.05 * i}
            log.append(events.EVALUATED, round=rnd, metrics=metrics)
            got = hashlib.sha256(b"swapped" + payload).hexdigest() if substituted == (s, rnd) else sha
            server.append(events.UPDATE_RECEIVED, site=s, round=rnd, sha256=got, size=size,
                          kind="encrypted_adapter_update")
            inputs.append(sha)
            site_entries[s] = {"train_loss": train_loss, "num_examples": 100 + 50 * i,
                               "update_sha256": sha, "update_bytes": size, **metrics}
        global_sha = hashlib.sha256("".join(inputs).encode()).hexdigest()
        eval_loss = sum(e["eval_loss"] for e in site_entries.values()) / len(SITES)
        accuracy = sum(e["accuracy"] for e in site_entries.values()) / len(SITES)
        server.append(events.AGGREGATED, round=rnd, inputs=inputs, output=global_sha)
        server.append(events.EVALUATED, round=rnd,
                      metrics={"eval_loss": eval_loss, "accuracy": accuracy})
        server.append(events.ROUND_ENDED, round=rnd)
        result_rounds.append({"round": rnd, "eval_loss": eval_loss, "accuracy": accuracy,
                              "global_adapter_sha256": global_sha, "sites": site_entries})
    final_sha = hashlib.sha256(b"final" + str(global_sha).encode()).hexdigest()
    for s, log in site_logs.items():
        log.append(events.POLICY_DECISION, decision="accepted", subject="model_release",
                   reason="release allowed")
        seq, head = log.head
        server.append(events.LOG_ANCHORED, participant=s, seq=seq, sha256=head)
        log.close()
    for fields in server_errors:
        server.append(events.ERROR, **fields)
    server.append(events.MODEL_RELEASED, adapter_sha256=final_sha, released_to=ADMIN,
                  decided_by=list(SITES))
    server.close()
    last = result_rounds[-1]
    result = {
        "job": {"name": "demo", "job_id": job_id, "spec_hash": spec_hash, "spec": spec},
        "base_model": {"name": "SmolLM2-135M-Instruct", "sha256": "ab" * 32},
        "privacy": {"mechanisms": [
            {"name": "differential_privacy", "params": {"epsilon": 8.0, "delta": 1e-5,
                                                        "clip_norm": 1.0,
                                                        "noise_multiplier": 1.1}},
            {"name": "homomorphic_encryption", "params": {"scheme": "CKKS",
                                                          "poly_modulus_degree": 4096}},
        ]},
        "rounds": result_rounds,
        "final": {"adapter_dir": "adapter", "adapter_sha256": final_sha,
                  "eval_loss": last["eval_loss"], "accuracy": last["accuracy"]},
    }
    (out / "zenfed_result.json").write_text(json.dumps(result, indent=2))
    # The closing record, after the result is written (as the server session does).
    server = AuditLog.for_kit(project.startup[SERVER], log_path=audit / f"{SERVER}.jsonl")
    server.append(events.JOB_FINISHED, job_id=job_id, rounds=rounds,
                  result_sha256=hashlib.sha256((out / "zenfed_result.json").read_bytes()).hexdigest())
    server.close()
    return out


@pytest.fixture(scope="session")
def pristine_result(project: Project, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_result(project, tmp_path_factory.mktemp("pristine") / "result")


@pytest.fixture
def result_dir(pristine_result: Path, tmp_path: Path) -> Path:
    """A fresh copy of the session's job result, free to tamper with."""
    return Path(shutil.copytree(pristine_result, tmp_path / "result"))


@pytest.fixture
def make_result(project: Project, tmp_path: Path):
    """Return a function writing a fresh result under tmp_path: make_result(name, rounds=3)."""

    def make(name: str = "result2", *, rounds: int = 3, server_errors: tuple[dict, ...] = (),
             substituted: tuple[str, int] | None = None) -> Path:
        return write_result(project, tmp_path / name, rounds=rounds, server_errors=server_errors,
                            substituted=substituted)

    return make
