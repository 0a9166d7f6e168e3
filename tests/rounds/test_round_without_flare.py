"""A whole job without FLARE: three SiteSessions and the ServerSession in one process.

Real CKKS (a fresh secret context at the sites, the public one at the server),
real DP-SGD on the tiny model, and the server's encrypted sum checked against
plaintext FedAvg of what the sites sent.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import shutil
from collections.abc import Callable
from functools import partial
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml

from _pki import make_ca, make_kit
from zenfed import protocol as P
from zenfed.answer_auth import sign_answer
from zenfed.digest import sha256_hex
from zenfed.jobs.in_process import SessionPerTask, run_in_process
from zenfed.jobs.simulate import builtin_policies
from zenfed.kit_files import SHARED_SITE_DIR, KitFolders
from zenfed.privacy.he import (
    SITE_CONTEXT_FILE,
    UpdateLayout,
    decrypt_sum,
    load_context,
    packing_for,
    read_envelope,
)
from zenfed.server import transport as server_transport
from zenfed.server.aggregation import EncryptedGlobal
from zenfed.server.result import RESULT_FILE
from zenfed.server.session import ServerSession
from zenfed.server.transport import InProcessTransport
from zenfed.site.session import SiteSession
from zenfed.spec import DatasetLocation, JobSpec
from zenfed.task_auth import sign_task, task_statement
from zenfed.update_auth import UpdateSigner
from zenfed.wire import decode_adapter

SITES = ("site-1", "site-2", "site-3")


def run_job(spec: JobSpec, data: Path, root: Path, *, encrypted: bool, release: bool = True,
            unreachable: tuple[str, ...] = (), refusing: tuple[str, ...] = (), rank_caps: dict | None = None):
    """Run ``spec`` on three in-process sites sharing one simulator-style local/ folder."""
    assert encrypted == spec.encryption.enabled
    policies = builtin_policies(data, sites=3, dataset="builtin", allow_any_model=True)
    policies = {
        name: policy.model_copy(update={"allow_plaintext_release": release,
                                        "allowed_jobs": ("none-*",) if name in refusing else ("*",),
                                        "max_lora_rank": (rank_caps or {}).get(name)})
        for name, policy in policies.items()
    }
    run = run_in_process(spec, workspace=root, policies=policies, unreachable=unreachable)
    return run.server, run.transport


def train_answers(transport: InProcessTransport, round_index: int) -> dict[str, P.Message]:
    return {site: answer for task, site, answer in transport.answers
            if task == P.TASK_TRAIN and answer.header.get(P.H_ROUND) == round_index and answer.payload}


def test_encrypted_dp_job_sums_to_plaintext_fedavg_of_what_sites_sent(tiny_job_spec, three_site_data, tmp_path):
    # Prepare
    spec = tiny_job_spec(
        "in-process", encryption={"enabled": True},
        privacy={"level": "record", "noise_multiplier": 0.8, "clip_norm": 1.0},
        federation={"rounds": 2, "min_sites": 3},
    )

    # Execute
    server, transport = run_job(spec, three_site_data, tmp_path, encrypted=True)

    # Assert: every site sent an encrypted, DP-accounted update in both rounds
    assert transport.stopped is None
    for rnd in (1, 2):
        answers = train_answers(transport, rnd)
        assert sorted(answers) == list(SITES)
        for answer in answers.values():
            assert answer.header[P.H_DP_SPENT]["epsilon"] > 0
            assert P.H_TRAIN_LOSS not in answer.header  # withheld under DP
            assert read_envelope(answer.payload)[0].round == rnd

    # Assert: decrypting the server's sum gives plaintext FedAvg of the sites' own updates
    secret = load_context(tmp_path / "local" / SHARED_SITE_DIR / SITE_CONTEXT_FILE, require_secret=True)
    packing = packing_for(spec.encryption)
    answers = train_answers(transport, 2)
    first = next(iter(answers.values()))
    template = decode_adapter(json_adapter_template(server))
    layout = UpdateLayout.from_update(template)
    weighted_sum = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in template.items()}
    total = 0.0
    for answer in answers.values():
        weight = float(answer.header[P.H_WEIGHT])
        _, ciphertext = read_envelope(answer.payload)
        own = decrypt_sum(ciphertext, context=secret, packing=packing, layout=layout, total_weight=weight)
        for name, tensor in own.items():
            weighted_sum[name] += weight * tensor.double()
        total += weight
    assert first is not None
    final = server.aggregation.from_checkpoint(*server_checkpoint(server))
    assert isinstance(final, EncryptedGlobal) and final.total_weight == pytest.approx(total)
    decrypted = decrypt_sum(final.ciphertext, context=secret, packing=packing, layout=layout,
                            total_weight=final.total_weight)
    step = 2 * spec.encryption.clip / (2 ** spec.encryption.quant_bits)  # one quantisation step
    for name, tensor in decrypted.items():
        expected = (weighted_sum[name] / total).float()
        assert torch.allclose(tensor, expected, atol=3 * step), name

    # Assert: the released adapter is that same mean, and the result file names every site
    result = json.loads((tmp_path / "server" / "run" / RESULT_FILE).read_text())
    assert sorted(result["final"]["sites"]) == list(SITES)
    assert [r["contributors"] for r in result["rounds"]] == [list(SITES), list(SITES)]
    released = decode_adapter(adapter_bytes(tmp_path / "server" / "run" / result["final"]["adapter_dir"]))
    for name, tensor in decrypted.items():
        assert torch.allclose(released[name], tensor, atol=1e-6), name


def test_plaintext_job_equals_weighted_mean_of_decoded_updates(tiny_job_spec, three_site_data, tmp_path):
    # Prepare
    spec = tiny_job_spec("in-process-plain", federation={"rounds": 1, "min_sites": 3})

    # Execute
    server, transport = run_job(spec, three_site_data, tmp_path, encrypted=False)

    # Assert
    answers = train_answers(transport, 1)
    total = sum(float(a.header[P.H_NUM_EXAMPLES]) for a in answers.values())
    adapters = {site: decode_adapter(a.payload) for site, a in answers.items()}
    final = server.aggregation.from_checkpoint(*server_checkpoint(server))
    for name, tensor in final.items():
        expected = sum(float(answers[s].header[P.H_NUM_EXAMPLES]) * adapters[s][name].double() for s in answers)
        assert torch.allclose(tensor, (expected / total).float(), atol=1e-6), name
    assert all(P.H_TRAIN_LOSS in a.header for a in answers.values())  # no DP: the loss is shown


def test_a_refusing_and_a_silent_site_leave_the_round_to_the_others(tiny_job_spec, three_site_data, tmp_path):
    # Prepare: site-2 refuses the job by policy, site-3 never answers; min_sites 1 still holds
    spec = tiny_job_spec("in-process-faults", federation={"rounds": 1, "min_sites": 1})

    # Execute
    server, transport = run_job(spec, three_site_data, tmp_path, encrypted=False,
                                refusing=("site-2",), unreachable=("site-3",))

    # Assert
    refusals = [a.refusal for task, site, a in transport.answers if site == "site-2"]
    assert refusals and all("not in this site's allowed_jobs" in r for r in refusals)
    result = json.loads((tmp_path / "server" / "run" / RESULT_FILE).read_text())
    assert result["rounds"][0]["contributors"] == ["site-1"]


def test_too_few_sites_stops_the_job_with_the_reason(tiny_job_spec, three_site_data, tmp_path):
    # Prepare
    spec = tiny_job_spec("in-process-quorum", federation={"rounds": 1, "min_sites": 3})

    # Execute
    server, transport = run_job(spec, three_site_data, tmp_path, encrypted=False, unreachable=("site-3",))

    # Assert
    assert transport.stopped is not None and "fewer than 3" in transport.stopped
    assert not (tmp_path / "server" / "run" / RESULT_FILE).exists()


class Site3LostInRound2(InProcessTransport):
    """FLARE's dead-job report, in-process: site-3's job process is gone during round 2."""

    REASON = "site-3 is lost: its job process is gone (crashed, killed or cut off)"

    def broadcast(self, *, task, message, **kwargs) -> bool:
        if task == P.TASK_TRAIN and message.header.get(P.H_ROUND) == 2:
            self.unreachable.add("site-3")
            self.lost_sites["site-3"] = self.REASON
        return super().broadcast(task=task, message=message, **kwargs)


def test_a_lost_site_is_named_with_its_reason_and_left_out_of_later_rounds(tiny_job_spec, three_site_data,
                                                                            tmp_path):
    # Prepare
    spec = tiny_job_spec("in-process-lost", federation={"rounds": 3, "min_sites": 2})

    # Execute
    server, _ = signed_job(spec, three_site_data, tmp_path, Site3LostInRound2)

    # Assert: round 2 went on without site-3 and said why; round 3 did not ask it
    log = server.folders.run / "audit" / "server.jsonl"
    silent = [r["fields"] for r in audit_records(log, "error") if r["fields"]["kind"] == "no_answer"]
    assert [(e["site"], e["round"]) for e in silent] == [("site-3", 2)]
    assert Site3LostInRound2.REASON in silent[0]["message"]
    started = {r["fields"]["round"]: r["fields"]["sites"] for r in audit_records(log, "round_started")
               if r["fields"]["task"] == P.TASK_TRAIN}
    assert started == {1: list(SITES), 2: list(SITES), 3: ["site-1", "site-2"]}
    result = json.loads((server.folders.run / RESULT_FILE).read_text())
    assert [r["contributors"] for r in result["rounds"]] == [list(SITES), ["site-1", "site-2"], ["site-1", "site-2"]]


def test_losing_a_site_below_min_sites_records_why_the_job_stops(tiny_job_spec, tmp_path):
    # Prepare
    spec = tiny_job_spec("lost-below-quorum", federation={"rounds": 2, "min_sites": 3})
    startup = make_kit(tmp_path, "server", make_ca(), stem="server")
    server = ServerSession(spec_data=spec.model_dump(mode="json"), job_id="job-1", identity="server",
                           folders=KitFolders(startup=startup, local=None, root=tmp_path, run=tmp_path / "run"))
    server.start(sites=list(SITES))

    # Execute
    server.site_lost("site-2", "site-2 is lost: its job process is gone", remaining=2)
    server.site_lost("site-3", "site-3 is lost: its job process is gone", remaining=3)
    server.close()

    # Assert: both losses recorded; only the one that broke the quorum says the job stops
    errors = [r["fields"] for r in audit_records(tmp_path / "run" / "audit" / "server.jsonl", "error")]
    assert [(e["kind"], e.get("site")) for e in errors] == [
        ("site_lost", "site-2"), ("too_few_sites", None), ("site_lost", "site-3")]
    assert "only 2 site(s) remain, fewer than min_sites=3" in errors[1]["message"]


# -- helpers -----------------------------------------------------------------------------------
def server_checkpoint(server: ServerSession) -> tuple[bytes, dict]:
    state = server._checkpoints.load()
    assert state is not None and state.global_payload is not None
    return state.global_payload, state.global_meta


def json_adapter_template(server: ServerSession) -> bytes:
    """The job's initial adapter, as the sites build it (names and shapes of every update)."""
    from zenfed.engines import make_engine
    from zenfed.engines.base_model import resolve_base_model
    from zenfed.wire import encode_adapter

    engine = make_engine(server.spec, model_dir=resolve_base_model(server.spec.model.base), threads=1)
    return encode_adapter(engine.initial_adapter())


def adapter_bytes(folder: Path) -> bytes:
    from safetensors.torch import load_file, save

    return bytes(save(load_file(str(folder / "adapter_model.safetensors"))))


class TamperingTransport(InProcessTransport):
    """A network attacker without keys: flips a bit of site-2's update and recomputes every hash.

    With ``resign_with`` (a kit's startup/), it then re-signs the whole answer with that kit's key.
    """

    def __init__(self, handlers, *, resign_with: Path | None = None, **kwargs) -> None:
        super().__init__(handlers, **kwargs)
        self.resign_with = resign_with

    def broadcast(self, *, task, on_result, **kwargs) -> bool:
        def tamper(site: str, answer: P.Message) -> None:
            if site == "site-2" and answer.payload and P.H_SIGNATURE in answer.header:
                forged = bytearray(answer.payload)
                forged[len(forged) // 2] ^= 0x01
                answer.payload = bytes(forged)
                answer.header[P.H_PAYLOAD_SHA256] = sha256_hex(answer.payload)
                if self.resign_with is not None:
                    answer = sign_answer(UpdateSigner.from_kit(self.resign_with), job_id="job-1", task=task,
                                         site=site, answer=answer, answer_to=answer.header[P.H_ANSWER_TO])
            on_result(site, answer)

        return super().broadcast(task=task, on_result=tamper, **kwargs)



def signed_job(spec: JobSpec, data: Path, root: Path,
               transport_class: Callable[..., InProcessTransport] = InProcessTransport, *,
               corrupt: tuple[str, ...] = (), unreachable: tuple[str, ...] = (),
               policy_updates: dict[str, dict] | None = None, session_per_task: bool = False):
    """Run ``spec`` with provisioned-style kits: site and server keys issued by one root CA, all audited.

    Sites in ``corrupt`` get a training file with a line that is not UTF-8; ``policy_updates`` changes
    fields of a site's policy; ``session_per_task`` runs each site task in a new session, as in a new process.
    """
    ca = make_ca()
    policies = builtin_policies(data, sites=3, dataset="builtin", allow_any_model=True)
    sessions = {}
    for site in SITES:
        startup = make_kit(root, site, ca)
        local = startup.parent / "local"
        local.mkdir()
        policy = policies[site].model_copy(update=(policy_updates or {}).get(site, {}))
        if site in corrupt:
            copy = root / site / "data"
            shutil.copytree(data / site, copy)
            (copy / "train.jsonl").write_bytes((copy / "train.jsonl").read_bytes() + b'{"instruction": "\xff"}\n')
            policy = policy.model_copy(update={"datasets": {"builtin": DatasetLocation(path=copy)}})
        (local / "zenfed_site.yaml").write_text(yaml.safe_dump(policy.model_dump(mode="json")))
        make = partial(SiteSession, spec_data=spec.model_dump(mode="json"), site=site, job_id="job-1",
                       folders=KitFolders(startup=startup, local=local, root=startup.parent,
                                          run=startup.parent / "run"))
        sessions[site] = SessionPerTask(make) if session_per_task else make()
    server_startup = make_kit(root, "server", ca, stem="server")
    if spec.encryption.enabled:  # one CKKS key pair: the secret in every site's kit, the public one in the server's
        from zenfed.privacy.he import SERVER_CONTEXT_FILE, make_public_context, make_secret_context, save_context

        secret = make_secret_context()
        for site in SITES:
            save_context(secret, root / site / "startup" / SITE_CONTEXT_FILE)
        save_context(make_public_context(secret), server_startup / SERVER_CONTEXT_FILE)
    server = ServerSession(spec_data=spec.model_dump(mode="json"), job_id="job-1", identity="server",
                           folders=KitFolders(startup=server_startup, local=None, root=root / "server",
                                              run=root / "server" / "run"))
    transport = transport_class({site: s.handle for site, s in sessions.items()}, unreachable=unreachable)
    transport.server_startup = server_startup  # for a transport standing for a deviating server (it signs)
    server.start(sites=list(SITES))
    with transport.accepting_its_forgeries() if isinstance(transport, DeviatingServer) else contextlib.nullcontext():
        server.run(transport)
    server.close()
    return server, transport


def audit_records(path: Path, event: str) -> list[dict]:
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r.get("event") == event]


@pytest.mark.parametrize(("resign", "caught_by"), [
    (False, "the signature on the answer of site-2 to the zenfed_train task does not match"),
    # With site-2's kit key the whole answer is signed again: the update's own signature still holds.
    (True, "the signature on the update from site-2 does not match"),
], ids=["relay", "answer-re-signed"])
def test_a_tampered_rehashed_update_is_rejected_and_the_round_goes_on(tiny_job_spec, three_site_data, tmp_path,
                                                                      resign, caught_by):
    # Prepare
    spec = tiny_job_spec("in-process-signed", federation={"rounds": 1, "min_sites": 2})
    tamperer = partial(TamperingTransport, resign_with=tmp_path / "site-2" / "startup" if resign else None)

    # Execute
    server, transport = signed_job(spec, three_site_data, tmp_path, tamperer)

    # Assert: site-2's forged update was rejected with the reason; the sum holds exactly the two honest updates
    result = json.loads((tmp_path / "server" / "run" / RESULT_FILE).read_text())
    assert result["rounds"][0]["contributors"] == ["site-1", "site-3"]
    rejected = audit_records(tmp_path / "server" / "run" / "audit" / "server.jsonl", "error")
    assert any(r["fields"].get("site") == "site-2" and caught_by in r["fields"]["message"] for r in rejected)
    honest = {site: decode_adapter(a.payload) for site, a in train_answers(transport, 1).items() if site != "site-2"}
    weights = {site: float(transport_header(transport, site)[P.H_NUM_EXAMPLES]) for site in honest}
    final = server.aggregation.from_checkpoint(*server_checkpoint(server))
    for name, tensor in final.items():
        expected = sum(weights[s] * honest[s][name].double() for s in honest) / sum(weights.values())
        assert torch.allclose(tensor, expected.float(), atol=1e-6), name


def test_a_site_failure_reaches_the_server_with_its_reason(tiny_job_spec, three_site_data, tmp_path):
    # Prepare: site-3's training file holds a line that is not UTF-8
    spec = tiny_job_spec("in-process-failure", federation={"rounds": 1, "min_sites": 2})

    # Execute
    server, transport = signed_job(spec, three_site_data, tmp_path, corrupt=("site-3",))

    # Assert: the typed error and its message reach the server's audit log; the others finish the round
    failed = [a for task, site, a in transport.answers if site == "site-3" and task == P.TASK_TRAIN]
    assert failed and failed[0].status == P.STATUS_ERROR and failed[0].error["kind"] == "DataError"
    rejected = audit_records(tmp_path / "server" / "run" / "audit" / "server.jsonl", "error")
    reasons = [r["fields"]["message"] for r in rejected if r["fields"].get("site") == "site-3"]
    assert reasons and "DataError" in reasons[0] and "not valid UTF-8" in reasons[0] and "line" in reasons[0]
    result = json.loads((tmp_path / "server" / "run" / RESULT_FILE).read_text())
    assert result["rounds"][0]["contributors"] == ["site-1", "site-2"]


def test_fp32_bf16_and_a_site_without_its_gpu_in_one_job(tiny_job_spec, three_site_data, tmp_path):
    # Prepare: site-1 fp32, site-2 bf16 with checkpointing, site-3 asks for a GPU this machine lacks.
    spec = tiny_job_spec("mixed-hardware", federation={"rounds": 1, "min_sites": 2})
    updates = {"site-2": {"precision": "bf16", "gradient_checkpointing": True}, "site-3": {"device": "cuda"}}

    # Execute
    server, transport = signed_job(spec, three_site_data, tmp_path, policy_updates=updates)

    # Assert: the two updates are interchangeable; site-3's reason reached the server's audit log;
    # site-2 recorded the hardware it trained on.
    result = json.loads((tmp_path / "server" / "run" / RESULT_FILE).read_text())
    assert result["rounds"][0]["contributors"] == ["site-1", "site-2"]
    sent = {site: decode_adapter(a.payload) for task, site, a in transport.answers
            if task == P.TASK_TRAIN and a.payload}
    layout = {site: {k: (tuple(v.shape), v.dtype) for k, v in update.items()} for site, update in sent.items()}
    assert layout["site-1"] == layout["site-2"]
    rejected = audit_records(tmp_path / "server" / "run" / "audit" / "server.jsonl", "error")
    reasons = [r["fields"]["message"] for r in rejected if r["fields"].get("site") == "site-3"]
    assert reasons and "HardwareError" in reasons[0] and "torch sees no CUDA device" in reasons[0]
    site_log = next((tmp_path / "site-2").rglob("site-2.jsonl"))
    accepted = [r["fields"] for r in audit_records(site_log, "policy_decision") if r["fields"].get("hardware")]
    assert accepted[0]["hardware"] == {"device": "cpu", "precision": "bf16", "gradient_checkpointing": True,
                                       "base_quantization": "none"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)")
def test_a_cpu_site_and_a_gpu_site_train_one_job(tiny_job_spec, three_site_data, tmp_path):
    # Prepare
    spec = tiny_job_spec("cpu-and-gpu", federation={"rounds": 2, "min_sites": 3})
    updates = {"site-2": {"device": "cuda", "precision": "bf16"}, "site-3": {"device": "cuda"}}

    # Execute
    server, transport = signed_job(spec, three_site_data, tmp_path, policy_updates=updates)

    # Assert
    result = json.loads((tmp_path / "server" / "run" / RESULT_FILE).read_text())
    assert [r["contributors"] for r in result["rounds"]] == [list(SITES)] * 2
    assert result["final"]["adapter_dir"] is not None


def transport_header(transport: InProcessTransport, site: str) -> dict:
    return next(a.header for task, s, a in transport.answers if s == site and task == P.TASK_TRAIN)


def test_fedprox_runs_under_encryption_and_record_dp(tiny_job_spec, three_site_data, tmp_path):
    # Prepare
    spec = tiny_job_spec(
        "in-process-fedprox", encryption={"enabled": True},
        privacy={"level": "record", "noise_multiplier": 0.8, "clip_norm": 1.0},
        federation={"rounds": 1, "min_sites": 3, "strategy": "fedprox", "proximal_mu": 0.1},
    )

    # Execute
    server, transport = run_job(spec, three_site_data, tmp_path, encrypted=True)

    # Assert
    result = json.loads((tmp_path / "server" / "run" / RESULT_FILE).read_text())
    assert result["aggregation"] == "fedprox-ckks"
    assert result["rounds"][0]["contributors"] == list(SITES)
    assert result["final"]["adapter_dir"] is not None


def released_adapter(root: Path) -> dict[str, torch.Tensor]:
    result = json.loads((root / "server" / "run" / RESULT_FILE).read_text())
    return decode_adapter(adapter_bytes(root / "server" / "run" / result["final"]["adapter_dir"]))


def test_fedadam_gives_the_same_adapter_in_the_clear_and_under_encryption(tiny_job_spec, three_site_data, tmp_path):
    # Prepare: the sites run the server optimizer on the mean they decode or decrypt
    spec = tiny_job_spec("in-process-fedadam", federation={
        "rounds": 3, "min_sites": 3, "strategy": "fedadam", "server_optimizer": {"learning_rate": 0.05}})

    # Execute
    run_job(spec, three_site_data, tmp_path / "clear", encrypted=False)
    run_job(spec.model_copy(update={"encryption": spec.encryption.model_copy(update={"enabled": True})}),
            three_site_data, tmp_path / "ckks", encrypted=True)

    # Assert: the released adapters agree, and differ from the initial one
    clear, ckks = released_adapter(tmp_path / "clear"), released_adapter(tmp_path / "ckks")
    worst = max(float((clear[k] - ckks[k]).abs().max()) for k in clear)
    moved = max(float(v.abs().max()) for k, v in clear.items() if "lora_B" in k)
    assert worst < 0.05 * moved, (worst, moved)  # quantisation of the sums, through Adam


def test_every_site_holds_the_same_fedopt_state_each_round(tiny_job_spec, three_site_data, tmp_path):
    # Prepare
    spec = tiny_job_spec("in-process-fedavgm", federation={"rounds": 2, "min_sites": 3, "strategy": "fedavgm"})

    # Execute
    signed_job(spec, three_site_data, tmp_path)

    # Assert: one state hash per aggregated round, the same at every site
    hashes = {site: [(r["fields"]["round"], r["fields"]["sha256"])
                     for r in audit_records(tmp_path / site / "run" / "audit" / f"{site}.jsonl", "strategy_state")]
              for site in SITES}
    assert [rnd for rnd, _ in hashes["site-1"]] == [1, 2]
    assert hashes["site-1"] == hashes["site-2"] == hashes["site-3"]
    result = json.loads((tmp_path / "server" / "run" / RESULT_FILE).read_text())
    assert result["final"]["adapter_dir"] is not None  # released by a site, though the job ran in the clear


def test_ffa_lora_sends_half_and_keeps_the_shared_a_under_encryption_and_dp(tiny_job_spec, three_site_data, tmp_path):
    # Prepare
    common = {"encryption": {"enabled": True}, "privacy": {"level": "record", "noise_multiplier": 0.8}}
    ffa = tiny_job_spec("in-process-ffa", federation={"rounds": 2, "min_sites": 3, "strategy": "ffa_lora"}, **common)
    avg = tiny_job_spec("in-process-avg", federation={"rounds": 1, "min_sites": 3}, **common)

    # Execute
    _, ffa_transport = run_job(ffa, three_site_data, tmp_path / "ffa", encrypted=True)
    _, avg_transport = run_job(avg, three_site_data, tmp_path / "avg", encrypted=True)

    # Assert: only B's values travel (the tiny adapter fits one ciphertext either way, so the bytes are
    # equal here; they shrink once an adapter fills several), the released adapter keeps the initial A
    initial = decode_adapter(json_adapter_template_of(ffa))
    ffa_values = read_envelope(train_answers(ffa_transport, 1)["site-1"].payload)[0].n_values
    avg_values = read_envelope(train_answers(avg_transport, 1)["site-1"].payload)[0].n_values
    assert ffa_values == sum(v.numel() for k, v in initial.items() if ".lora_B." in k)
    assert avg_values == sum(v.numel() for v in initial.values())
    released = released_adapter(tmp_path / "ffa")
    assert all(torch.equal(released[k], initial[k]) for k in initial if ".lora_A." in k)
    assert any(not torch.allclose(released[k], initial[k]) for k in initial if ".lora_B." in k)


def json_adapter_template_of(spec: JobSpec) -> bytes:
    from zenfed.engines import make_engine
    from zenfed.engines.base_model import resolve_base_model
    from zenfed.wire import encode_adapter

    return encode_adapter(make_engine(spec, model_dir=resolve_base_model(spec.model.base), threads=1).initial_adapter())


def test_personal_layers_never_leave_a_site_and_are_released_at_their_initial_values(
        tiny_job_spec, three_site_data, tmp_path):
    # Prepare: the tiny model has two decoder layers; layer 1's LoRA is personal
    spec = tiny_job_spec("in-process-personal", lora={"personal_layers": [1]},
                         federation={"rounds": 2, "min_sites": 3})

    # Execute
    _, transport = run_job(spec, three_site_data, tmp_path, encrypted=False)

    # Assert: no update carries layer 1; each site trained its own; the release holds layer 1 as initialised
    sent_names = {name for rnd in (1, 2) for a in train_answers(transport, rnd).values()
                  for name in decode_adapter(a.payload)}
    assert sent_names and not any(".layers.1." in name for name in sent_names)
    initial = decode_adapter(json_adapter_template_of(spec))
    kept = {site: transport.handlers[site].__self__._personal.kept for site in SITES}
    personal = [name for name in initial if ".layers.1." in name and ".lora_B." in name]
    assert all(not torch.equal(kept[site][name], initial[name]) for site in SITES for name in personal)
    assert not torch.equal(kept["site-1"][personal[0]], kept["site-2"][personal[0]])
    released = released_adapter(tmp_path)
    assert all(torch.equal(released[name], initial[name]) for name in initial if ".layers.1." in name)
    assert any(not torch.equal(released[name], initial[name])
               for name in initial if ".layers.0." in name and ".lora_B." in name)


@pytest.mark.parametrize("strategy", ["fedavg", "ffa_lora"])
def test_sites_with_rank_caps_train_their_leading_ranks_of_one_job(tiny_job_spec, three_site_data, tmp_path,
                                                                    strategy):
    # Prepare: the job's rank is 4; site-1 can train rank 1, site-2 rank 2, site-3 all 4
    spec = tiny_job_spec(f"in-process-ranks-{strategy}", encryption={"enabled": True},
                         federation={"rounds": 2, "min_sites": 3, "strategy": strategy})
    caps = {"site-1": 1, "site-2": 2}

    # Execute
    run_job(spec, three_site_data, tmp_path, encrypted=True, rank_caps=caps)

    # Assert: every site took part; the released adapter has the job's rank, and its top rank (trained
    # by site-3 alone) moved
    result = json.loads((tmp_path / "server" / "run" / RESULT_FILE).read_text())
    assert [r["contributors"] for r in result["rounds"]] == [list(SITES), list(SITES)]
    released, initial = released_adapter(tmp_path), decode_adapter(json_adapter_template_of(spec))
    b_names = [k for k in initial if ".lora_B." in k]
    assert all(released[k].shape == initial[k].shape and initial[k].shape[1] == 4 for k in b_names)
    assert any(float(released[k][:, 3].abs().max()) > 0 for k in b_names)


def test_flexlora_sums_products_and_every_capped_site_trains_the_leading_singular_ranks(
        tiny_job_spec, three_site_data, tmp_path):
    # Prepare: the job's rank is 4; site-1 trains rank 1, site-2 rank 2, site-3 all 4; record-level DP.
    spec = tiny_job_spec("in-process-flexlora", privacy={"level": "record", "noise_multiplier": 0.8},
                         federation={"rounds": 2, "min_sites": 3, "strategy": "flexlora"})

    # Execute
    _, transport = run_job(spec, three_site_data, tmp_path, encrypted=False, rank_caps={"site-1": 1, "site-2": 2})

    # Assert: products travel (d_out x d_in per module); the released rank-4 adapter's B·A is the SVD
    # truncation of round 2's mean product, which the server holds.
    result = json.loads((tmp_path / "server" / "run" / RESULT_FILE).read_text())
    assert [r["contributors"] for r in result["rounds"]] == [list(SITES), list(SITES)]
    updates = {site: decode_adapter(a.payload) for site, a in train_answers(transport, 2).items()}
    initial = decode_adapter(json_adapter_template_of(spec))
    a_names = [k for k in initial if ".lora_A." in k]
    for update in updates.values():
        assert sorted(update) == sorted(k.replace(".lora_A.", ".lora_BA.") for k in a_names)
    weights = {site: float(a.header[P.H_NUM_EXAMPLES]) for site, a in train_answers(transport, 2).items()}
    released = released_adapter(tmp_path)
    scale = spec.lora.alpha / spec.lora.rank
    for a_name in a_names:
        product = a_name.replace(".lora_A.", ".lora_BA.")
        mean = sum(weights[s] * updates[s][product].double() for s in updates) / sum(weights.values())
        u, sv, vh = torch.linalg.svd(mean, full_matrices=False)
        best = (u[:, :4] * sv[:4]) @ vh[:4]
        b_name = a_name.replace(".lora_A.", ".lora_B.")
        assert released[a_name].shape == initial[a_name].shape
        got = scale * released[b_name].double() @ released[a_name].double()
        assert torch.allclose(got, best, atol=1e-5), a_name


def test_a_capped_sites_update_leaves_the_ranks_it_cannot_train_at_the_global(tiny_job_spec, three_site_data,
                                                                               tmp_path):
    # Prepare
    spec = tiny_job_spec("in-process-rank-update", federation={"rounds": 1, "min_sites": 3})

    # Execute
    _, transport = run_job(spec, three_site_data, tmp_path, encrypted=False, rank_caps={"site-1": 1})

    # Assert: site-1's update differs from the start only in rank 0; site-3's in every rank
    initial = decode_adapter(json_adapter_template_of(spec))
    updates = {site: decode_adapter(a.payload) for site, a in train_answers(transport, 1).items()}
    for name, start in initial.items():
        capped, full = updates["site-1"][name], updates["site-3"][name]
        if ".lora_A." in name:
            assert torch.equal(capped[1:], start[1:]) and not torch.equal(full[1:], start[1:])
        else:
            assert torch.equal(capped[:, 1:], start[:, 1:]) and not torch.equal(full[:, 1:], start[:, 1:])


def test_scaffold_sums_control_variates_in_the_same_ciphertexts_under_dp(tiny_job_spec, three_site_data, tmp_path):
    # Prepare
    spec = tiny_job_spec("in-process-scaffold", encryption={"enabled": True},
                         privacy={"level": "record", "noise_multiplier": 0.8},
                         federation={"rounds": 2, "min_sites": 3, "strategy": "scaffold"})

    # Execute
    _, transport = run_job(spec, three_site_data, tmp_path, encrypted=True)

    # Assert: twice the values travel (adapter + control changes); every site holds the same c; the
    # released adapter is the adapter alone
    initial = decode_adapter(json_adapter_template_of(spec))
    values = read_envelope(train_answers(transport, 1)["site-1"].payload)[0].n_values
    assert values == 2 * sum(v.numel() for v in initial.values())
    controls = [transport.handlers[site].__self__._strategy.global_control for site in SITES]
    assert all(torch.allclose(controls[0][k], c[k], atol=1e-6) for c in controls for k in initial)
    assert any(float(controls[0][k].abs().max()) > 0 for k in initial)
    assert sorted(released_adapter(tmp_path)) == sorted(initial)


def test_a_silent_site_is_recorded_and_the_audit_still_verifies(tiny_job_spec, three_site_data, tmp_path):
    # Prepare: site-3 never answers (a crashed site); two sites are enough
    from zenfed.audit.verify import verify_result

    spec = tiny_job_spec("in-process-silent", federation={"rounds": 2, "min_sites": 2})

    # Execute
    signed_job(spec, three_site_data, tmp_path, unreachable=("site-3",))

    # Assert: the server recorded why site-3 is absent, each round; the chain verifies, the gap explained
    result_dir = tmp_path / "server" / "run"
    silent = [r["fields"] for r in audit_records(result_dir / "audit" / "server.jsonl", "error")
              if r["fields"].get("kind") == "no_answer"]
    assert {(f["site"], f["round"]) for f in silent} >= {("site-3", 1), ("site-3", 2)}
    verdict = verify_result(result_dir)
    assert verdict.ok, verdict.describe()
    assert any("site-3" in line for line in verdict.explained)


class CrashAtRound3(InProcessTransport):
    """The server dies when round 3 starts: rounds 1 and 2 are checkpointed, nothing after them."""

    def broadcast(self, *, task, message, **kwargs) -> bool:
        if task == P.TASK_TRAIN and message.header.get(P.H_ROUND) == 3:
            self.stop("the server process was killed")
            return False
        return super().broadcast(task=task, message=message, **kwargs)


@pytest.mark.parametrize("variant", [
    {"federation": {"strategy": "fedavg"}},
    # state the sites keep between rounds: it must survive the new job id of a resumed job
    {"federation": {"strategy": "fedadam"}, "lora": {"personal_layers": [1]}},
])
def test_a_resumed_job_keeps_the_whole_audit_trail_and_its_lineage(tiny_job_spec, three_site_data, tmp_path,
                                                                    variant):
    # Prepare: provisioned-style kits; run folders laid out as FLARE's (RUN_ROOT/JOB_ID/zenfed)
    from zenfed.audit.evidence import collect
    from zenfed.audit.verify import verify_result

    spec = tiny_job_spec("in-process-resume", **{**variant, "federation": {
        "rounds": 3, "min_sites": 3, **variant["federation"]}})
    ca = make_ca()
    policies = builtin_policies(three_site_data, sites=3, dataset="builtin", allow_any_model=True)
    startups = {site: make_kit(tmp_path, site, ca) for site in SITES}
    for site, startup in startups.items():
        (startup.parent / "local").mkdir()
        policy = yaml.safe_dump(policies[site].model_dump(mode="json"))
        (startup.parent / "local" / "zenfed_site.yaml").write_text(policy)
    server_startup = make_kit(tmp_path, "server", ca, stem="server")

    def job(job_id: str, transport_class: type[InProcessTransport]) -> Path:
        sites = {site: SiteSession(spec_data=spec.model_dump(mode="json"), site=site, job_id=job_id,
                                   folders=KitFolders(startup=s, local=s.parent / "local", root=s.parent,
                                                      run=s.parent / job_id / "zenfed"))
                 for site, s in startups.items()}
        server = ServerSession(spec_data=spec.model_dump(mode="json"), job_id=job_id, identity="server",
                               folders=KitFolders(startup=server_startup, local=None, root=tmp_path / "server",
                                                  run=tmp_path / "server" / job_id / "zenfed"))
        server.start(sites=list(SITES))
        server.run(transport_class({site: s.handle for site, s in sites.items()}))
        server.close()
        return server.folders.run

    # Execute: the first run dies after round 2; the job is submitted again
    first = job("job-1", CrashAtRound3)
    second = job("job-2", InProcessTransport)

    # Assert: the second run trained round 3 only, kept the first run's server log, links to it, and verifies
    assert not (first / RESULT_FILE).exists()
    result = json.loads((second / RESULT_FILE).read_text())
    assert [r["round"] for r in result["rounds"]] == [1, 2, 3]
    assert [r["contributors"] for r in result["rounds"]] == [list(SITES)] * 3
    kept = second / "audit" / "previous" / "00-job-1" / "server.jsonl"
    assert kept.is_file()
    resumed = audit_records(second / "audit" / "server.jsonl", "job_resumed")
    assert resumed and resumed[0]["fields"]["after_round"] == 2
    verdict = verify_result(second)
    assert verdict.ok, verdict.describe()
    report, _ = collect(second)
    assert all(entry["inputs"] for entry in report["lineage"]["rounds"])  # rounds 1-2 from job-1's log

    # Assert: a record cut from the kept log is caught
    lines = kept.read_bytes().rstrip(b"\n").split(b"\n")
    kept.write_bytes(b"\n".join(lines[:-1]) + b"\n")
    assert any("does not end where" in p for p in verify_result(second).problems)


class ExtraTensorInTheGlobal(InProcessTransport):
    """A deviating server: the round-2 global carries a tensor the job does not have."""

    def broadcast(self, *, task, message, **kwargs) -> bool:
        if task == P.TASK_TRAIN and message.payload:
            from zenfed.wire import encode_adapter

            forged = decode_adapter(message.payload)
            forged["base_model.model.extra.lora_A.weight"] = torch.zeros(2, 2)
            message.payload = encode_adapter(forged)
            message.header[P.H_PAYLOAD_SHA256] = sha256_hex(message.payload)
        return super().broadcast(task=task, message=message, **kwargs)


class Site3OnAnotherModel(InProcessTransport):
    """site-3 reports another base model's hash, as a site with another copy of an unpinned model would."""

    def broadcast(self, *, task, message, targets, on_result, **kwargs) -> bool:
        def relay(site, answer):
            if site == "site-3" and answer.header.get(P.H_BASE_MODEL_SHA256):
                answer.header[P.H_BASE_MODEL_SHA256] = "f" * 64
            on_result(site, answer)

        return super().broadcast(task=task, message=message, targets=targets, on_result=relay, **kwargs)


def test_a_site_on_another_base_model_is_left_out(tiny_job_spec, three_site_data, tmp_path, caplog):
    # Prepare: no pin in the job, so each site trains whatever its folder holds.
    spec = tiny_job_spec("in-process-other-model", model={"base_sha256": None},
                         federation={"rounds": 1, "min_sites": 2})
    policies = builtin_policies(three_site_data, sites=3, dataset="builtin", allow_any_model=True)

    # Execute
    run = run_in_process(spec, workspace=tmp_path, policies=policies, transport=Site3OnAnotherModel)

    # Assert: site-3's update is not in the sum, with the reason naming both hashes; the others' are.
    result = json.loads((run.result_dir / RESULT_FILE).read_text())
    assert result["rounds"][0]["contributors"] == ["site-1", "site-2"]
    assert result["base_model"]["sha256"] != "f" * 64
    assert any(f"site-3 trains the base model {'f' * 64}, but this job's other sites train "
               f"{result['base_model']['sha256']}" in record.getMessage() for record in caplog.records)


def test_a_global_with_a_foreign_tensor_is_refused_with_the_reason(tiny_job_spec, three_site_data, tmp_path):
    # Prepare
    spec = tiny_job_spec("in-process-foreign-tensor", federation={"rounds": 2, "min_sites": 3})
    policies = builtin_policies(three_site_data, sites=3, dataset="builtin", allow_any_model=True)

    # Execute
    run = run_in_process(spec, workspace=tmp_path, policies=policies, transport=ExtraTensorInTheGlobal)

    # Assert: every site refused round 2 with the reason; the job stopped, no adapter released
    round_2 = [a for task, _, a in run.transport.answers if task == P.TASK_TRAIN and not a.payload]
    assert len(round_2) == 3 and all(a.error and "does not match this job's LoRA shape" in a.error["message"]
                                     for a in round_2)
    assert run.transport.stopped is not None and not (run.result_dir / RESULT_FILE).exists()


def test_anyone_can_re_add_the_kept_ciphertexts_and_a_swapped_one_is_named(tiny_job_spec, three_site_data, tmp_path):
    # Prepare: an encrypted, signed, audited job
    from zenfed.audit.replay import main_replay, replay_result

    spec = tiny_job_spec("in-process-replay", encryption={"enabled": True}, federation={"rounds": 2, "min_sites": 3})
    signed_job(spec, three_site_data, tmp_path)
    result_dir = tmp_path / "server" / "run"

    # Execute / Assert: the untouched result replays, with no secret key
    verdict = replay_result(result_dir)
    assert verdict.ok and verdict.rounds_checked == [1, 2], verdict.problems

    # Execute / Assert: round 2's kept update of site-1 swapped for its round-1 update is named, round 2 first
    kept = result_dir / "updates"
    (kept / "round-0002" / "site-1.bin").write_bytes((kept / "round-0001" / "site-1.bin").read_bytes())
    verdict = replay_result(result_dir)
    assert not verdict.ok and verdict.first_bad_round == 2
    assert any("site-1" in p and "not one the server recorded" in p for p in verdict.problems)
    assert main_replay(result_dir, out=io.StringIO()) == 1


def test_a_swap_between_two_sites_of_one_round_is_caught(tiny_job_spec, three_site_data, tmp_path):
    # Prepare
    from zenfed.audit.replay import replay_result

    spec = tiny_job_spec("in-process-replay-swap", encryption={"enabled": True},
                         federation={"rounds": 1, "min_sites": 3})
    signed_job(spec, three_site_data, tmp_path)
    kept = tmp_path / "server" / "run" / "updates" / "round-0001"
    one, two = (kept / "site-1.bin").read_bytes(), (kept / "site-2.bin").read_bytes()
    (kept / "site-1.bin").write_bytes(two)
    (kept / "site-2.bin").write_bytes(one)

    # Execute
    verdict = replay_result(tmp_path / "server" / "run")

    # Assert
    assert not verdict.ok and verdict.first_bad_round == 1


class DeviatingServer(InProcessTransport):
    """Stands for the server itself deviating: it holds the server's key, so it signs what it forges.

    :func:`signed_job` sets ``server_startup`` to the server kit's startup/ folder.
    """

    server_startup: Path

    def resign(self, task: str, message: P.Message) -> P.Message:
        """Sign ``message`` again with the server's key, keeping its sequence number."""
        signer = UpdateSigner.from_kit(self.server_startup, stem="server")
        assert signer is not None
        signed = sign_task(signer, job_id="job-1", task=task, message=message, seq=message.header[P.H_TASK_SEQ],
                           targets=message.header[P.H_TARGETS])
        self.__dict__.setdefault("forged", set()).add(sha256_hex(task_statement(job_id="job-1", task=task,
                                                                                message=signed)))
        return signed

    @contextlib.contextmanager
    def accepting_its_forgeries(self):
        """The server's own answer check takes the answers to the tasks it forged: it runs its own code."""
        original = server_transport.screen_answer

        def screen(verifier, *, answer, sent_task, **kwargs):
            named = answer.header.get(P.H_ANSWER_TO)
            forged = self.__dict__.get("forged", set())
            return original(verifier, answer=answer, sent_task=named if named in forged else sent_task, **kwargs)

        with mock.patch.object(server_transport, "screen_answer", screen):
            yield


class SendsSite2AnotherGlobal(DeviatingServer):
    """A deviating server: in round 2 it sends site-2 site-1's own round-1 update as the "global"."""

    def broadcast(self, *, task, message, targets, on_result, **kwargs) -> bool:
        if task != P.TASK_TRAIN or not message.payload:
            return super().broadcast(task=task, message=message, targets=targets, on_result=on_result, **kwargs)
        honest = [site for site in targets if site != "site-2"]
        ok = super().broadcast(task=task, message=message, targets=honest, on_result=on_result, **kwargs)
        forged = copy.deepcopy(message)
        forged.payload = next(a.payload for t, s, a in self.answers if s == "site-1" and t == task and a.payload)
        forged.header[P.H_PAYLOAD_SHA256] = sha256_hex(forged.payload)
        forged = self.resign(task, forged)
        return ok and super().broadcast(task=task, message=forged, targets=["site-2"], on_result=on_result, **kwargs)


def test_a_site_sent_another_global_than_the_recorded_sum_is_caught(tiny_job_spec, three_site_data, tmp_path):
    # Prepare
    from zenfed.audit.verify import verify_result

    spec = tiny_job_spec("in-process-equivocation", federation={"rounds": 2, "min_sites": 3})

    # Execute
    signed_job(spec, three_site_data, tmp_path, SendsSite2AnotherGlobal)

    # Assert: site-2's own signed log shows what it received; it is not the sum the server recorded
    verdict = verify_result(tmp_path / "server" / "run")
    assert not verdict.ok
    assert any(p.startswith("site-2 received a global in round 2") for p in verdict.problems), verdict.describe()
    assert not any(p.startswith("site-1 received") for p in verdict.problems)


def test_a_cohort_fraction_trains_a_seeded_share_of_the_sites_each_round(tiny_job_spec, three_site_data, tmp_path):
    # Prepare: 3 sites, half of them (at least min_sites 1, so 2) per round
    spec = tiny_job_spec("in-process-cohort", federation={"rounds": 4, "min_sites": 1, "cohort_fraction": 0.5})
    policies = builtin_policies(three_site_data, sites=3, dataset="builtin", allow_any_model=True)

    # Execute: the same job twice
    first = run_in_process(spec, workspace=tmp_path / "a", policies=policies)
    again = run_in_process(spec, workspace=tmp_path / "b", policies=policies)

    # Assert: two sites train each round, only they got the task, and the draw is the job's, not chance
    cohorts = [r["contributors"] for r in json.loads((first.result_dir / RESULT_FILE).read_text())["rounds"]]
    assert all(len(c) == 2 for c in cohorts) and len({tuple(c) for c in cohorts}) > 1
    asked = {r: sorted(s for t, s, a in first.transport.answers if t == P.TASK_TRAIN and a.header.get(P.H_ROUND) == r)
             for r in range(1, 5)}
    assert [asked[r] for r in range(1, 5)] == cohorts
    assert cohorts == [r["contributors"] for r in json.loads((again.result_dir / RESULT_FILE).read_text())["rounds"]]


def test_a_cohort_fraction_is_refused_with_a_strategy_whose_sites_must_see_every_round():
    # Execute / Assert
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="cohort_fraction 1"):
        JobSpec.model_validate({"name": "c", "federation": {"strategy": "fedadam", "cohort_fraction": 0.5}})
