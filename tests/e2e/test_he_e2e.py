"""Encrypted aggregation end to end: simulator parity with plaintext, and key separation on a deployment.

The deployment routes one site through a FLARE relay: ciphertexts cross it unread.
"""

from __future__ import annotations

import json
from pathlib import Path

import psutil
import pytest
from safetensors.torch import load_file

from zenfed.data import make_builtin
from zenfed.demo import free_port, loopback_project
from zenfed.engines.tiny import build_tiny_model
from zenfed.jobs import export_job
from zenfed.jobs.simulate import builtin_policies, run_simulation
from zenfed.jobs.submit import load_result, submit
from zenfed.privacy.he.context import context_has_secret_key, load_context
from zenfed.provisioning.deploy import down, up
from zenfed.provisioning.project import provision
from zenfed.spec import JobSpec, ProjectSpec

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("he_e2e")
    model = build_tiny_model(root / "tiny")
    data = root / "data"
    make_builtin(data, sites=2, train_per_site=120, valid_per_site=16, test_per_task=4)
    return model, data


def _spec(model: Path, *, encrypted: bool, name: str, strategy: str = "fedavg") -> JobSpec:
    return JobSpec.model_validate(
        {
            "name": name,
            "model": {"base": str(model)},
            "lora": {"rank": 4, "alpha": 8},
            "training": {"local_steps": 6, "batch_size": 8, "seq_len": 128, "learning_rate": 0.01},
            "federation": {"rounds": 2, "min_sites": 2, "strategy": strategy},
            "evaluation": {"max_examples": 8, "max_new_tokens": 4},
            "encryption": {"enabled": encrypted},
        }
    )


def test_encrypted_run_matches_plaintext_eval_loss(
    tiny_setup: tuple[Path, Path], tmp_path: Path
) -> None:
    # Prepare
    model, data = tiny_setup
    policies = builtin_policies(data, sites=2, dataset="builtin", allow_any_model=True)
    # Execute
    plain = run_simulation(
        _spec(model, encrypted=False, name="plain"), workspace=tmp_path / "plain", policies=policies
    )
    sealed = run_simulation(
        _spec(model, encrypted=True, name="sealed"),
        workspace=tmp_path / "sealed",
        policies=policies,
    )
    # Assert
    plain_result = json.loads((plain / "zenfed_result.json").read_text())
    sealed_result = json.loads((sealed / "zenfed_result.json").read_text())
    assert sealed_result["aggregation"] == "fedavg-ckks"
    assert all(r["encrypted"] for r in sealed_result["rounds"])
    plain_loss, sealed_loss = (
        plain_result["final"]["eval_loss"],
        sealed_result["final"]["eval_loss"],
    )
    assert abs(sealed_loss - plain_loss) <= 0.01 * plain_loss
    assert sealed_loss < sealed_result["baseline"]["eval_loss"]
    # The released adapter is the decrypted FedAvg: within the quantisation step of the plaintext one.
    a = load_file(str(plain / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(sealed / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-3


def _dialled_ports(pid: int) -> set[int]:
    """The remote ports a process and its descendants hold TCP connections to."""
    root = psutil.Process(pid)
    ports = set()
    for proc in [root, *root.children(recursive=True)]:
        try:
            ports |= {c.raddr.port for c in proc.net_connections(kind="tcp") if c.raddr}
        except psutil.Error:
            continue
    return ports


def _ranks_moved(kept: Path, spec: JobSpec, deployment, weight: float) -> list[bool]:
    """Per LoRA rank, whether one site's round-1 adapter (decrypted here with a site's key) left the start."""
    from zenfed.engines import make_engine
    from zenfed.privacy.he import UpdateLayout, decrypt_sum, packing_for, read_envelope
    from zenfed.privacy.he.context import SITE_CONTEXT_FILE

    key = load_context(Path(deployment.site_kits["site-1"]) / "startup" / SITE_CONTEXT_FILE, require_secret=True)
    start = make_engine(spec, model_dir=Path(spec.model.base), threads=1).initial_adapter()
    # A site encrypts weight x its trained adapter; the server only adds such ciphertexts.
    sent = decrypt_sum(read_envelope(kept.read_bytes())[1], context=key, packing=packing_for(spec.encryption),
                       layout=UpdateLayout.from_update(start), total_weight=weight)
    change = {k: sent[k] - start[k] for k in start}
    step = spec.encryption.clip / (2 ** (spec.encryption.quant_bits - 1) - 1)
    moved = []
    for rank in range(spec.lora.rank):
        a = max(float(t[rank].abs().max()) for k, t in change.items() if ".lora_A." in k)
        b = max(float(t[:, rank].abs().max()) for k, t in change.items() if ".lora_B." in k)
        moved.append(max(a, b) > 4 * step / weight)  # the quantisation step, scaled back by the weight
    return moved


def test_deployment_server_never_holds_a_secret_key(
    tiny_setup: tuple[Path, Path], tmp_path: Path
) -> None:
    # Prepare: site-2 reaches the server through a FLARE relay, site-1 directly; site-2's policy caps
    # its LoRA rank at 2 of the job's 4; the job trains with FedProx
    model, data = tiny_setup
    project = loopback_project("he-e2e", data_dir=data, sites=2)
    relay_port = free_port()
    project = ProjectSpec.model_validate({
        **project.model_dump(), "relays": [{"name": "relay-1", "port": relay_port}],
        "sites": [project.sites[0].model_dump(),
                  {**project.sites[1].model_dump(), "relay": "relay-1", "max_lora_rank": 2}],
    })
    deployment = provision(project, out=tmp_path / "ws")
    spec = _spec(model, encrypted=True, name="sealed-deploy", strategy="fedprox")
    job = export_job(spec, out=tmp_path / "jobs" / "sealed")
    server_kit = Path(deployment.server_kit)
    # Execute
    pids = up(deployment, progress=False)
    try:
        dialled = {name: _dialled_ports(pids[name]) for name in ("site-1", "site-2")}
        outcome = submit(
            job, admin_kit=deployment.admin_kit(), results_root=tmp_path / "results", progress=False
        )
    finally:
        down(deployment, progress=False)
    # Assert: site-2's connections go to the relay, never to the server; site-1's to the server.
    assert relay_port in dialled["site-2"] and deployment.fl_port not in dialled["site-2"]
    assert deployment.fl_port in dialled["site-1"] and relay_port not in dialled["site-1"]
    # Assert: the job ran encrypted, with both sites in every round, and released the adapter through a site.
    result = load_result(outcome.result_dir)
    assert result["aggregation"] == "fedprox-ckks"
    assert [r["contributors"] for r in result["rounds"]] == [["site-1", "site-2"]] * 2
    assert (outcome.result_dir / "adapter" / "adapter_model.safetensors").is_file()
    # Every task reached each site signed by the server and numbered, through the relay too: enroll (1),
    # train (2, 3), evaluate (4) and, at site-1 alone, release (5). Each site kept the last number it took.
    for site, last in (("site-1", 5), ("site-2", 4)):
        sessions = list(Path(deployment.site_kits[site]).glob("*/zenfed/site-session.json"))
        assert len(sessions) == 1 and json.loads(sessions[0].read_text())["last_task_seq"] == last, sessions
    # The capped site trained only ranks 0-1 (the others left exactly as they started); site-1 all four.
    kept = outcome.result_dir / "updates" / "round-0001"
    moved = {site: _ranks_moved(kept / f"{site}.bin", spec, deployment, result["rounds"][0]["sites"][site]["weight"])
             for site in ("site-1", "site-2")}
    assert moved == {"site-1": [True] * 4, "site-2": [True, True, False, False]}
    # Anyone can re-add the kept ciphertexts with the public context and match the signed logs.
    from zenfed.audit.replay import replay_result

    replayed = replay_result(outcome.result_dir)
    assert replayed.ok and replayed.rounds_checked == [1, 2], replayed.problems
    # No file anywhere under the server's kit and workspace (jobs, checkpoints, logs) holds a secret key.
    server_files = [p for p in server_kit.rglob("*") if p.is_file()]
    assert server_files
    assert not [p for p in server_files if context_has_secret_key(p)]
    # The server's context cannot decrypt; a site's can.
    from zenfed.privacy.he.context import SERVER_CONTEXT_FILE, SITE_CONTEXT_FILE

    server_ctx = load_context(server_kit / "startup" / SERVER_CONTEXT_FILE, require_secret=False)
    assert not server_ctx.has_secret_key
    site_kit = Path(deployment.site_kits["site-1"])
    assert context_has_secret_key(site_kit / "startup" / SITE_CONTEXT_FILE)
