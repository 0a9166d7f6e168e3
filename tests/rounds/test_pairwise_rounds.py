"""Pairwise masks in whole jobs without FLARE: signed keys, masked sums, a dropped site, a lying server.

Sites hold provisioned-style kits (keys and certificates from one root CA) and
one CKKS key; the server holds the public context. Each test runs a real job of
the tiny model in one process.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_round_without_flare import (
    SITES,
    DeviatingServer,
    audit_records,
    json_adapter_template,
    released_adapter,
    run_job,
    signed_job,
    train_answers,
)

from zenfed import protocol as P
from zenfed.audit.replay import replay_result
from zenfed.audit.verify import verify_result
from zenfed.privacy.he import (
    SITE_CONTEXT_FILE,
    HEDecodeError,
    UpdateLayout,
    decrypt_sum,
    load_context,
    packing_for,
    read_envelope,
)
from zenfed.server.result import RESULT_FILE
from zenfed.server.transport import InProcessTransport
from zenfed.wire import decode_adapter

PAIRWISE = {"enabled": True, "secure_aggregation": "pairwise", "max_sites": 8}


class Site3CrashesInRound2(InProcessTransport):
    """site-3 is in round 2's cohort (it got the task and masked) but its answer never arrives."""

    def broadcast(self, *, task, message, on_result, **kwargs) -> bool:
        def drop(site: str, answer: P.Message) -> None:
            if not (task == P.TASK_TRAIN and site == "site-3" and message.header.get(P.H_ROUND) == 2):
                on_result(site, answer)

        return super().broadcast(task=task, message=message, on_result=drop, **kwargs)


class SubstitutesSite2Key(DeviatingServer):
    """A server that swaps site-2's announced key for one of its own in the train task (and signs the task)."""

    def broadcast(self, *, task, message, **kwargs) -> bool:
        if task == P.TASK_TRAIN:
            from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

            from zenfed.privacy.pairwise import public_key_text

            message.header[P.H_PEER_KEYS]["site-2"][P.H_PAIRWISE_KEY] = public_key_text(X25519PrivateKey.generate())
            message = self.resign(task, message)
        return super().broadcast(task=task, message=message, **kwargs)


def _server_log(root: Path) -> Path:
    return root / "server" / "run" / "audit" / "server.jsonl"


def test_a_masked_job_sums_to_the_unmasked_one_and_hides_sizes_and_weights(tiny_job_spec, three_site_data, tmp_path):
    # Prepare: the same job (no DP, so training is deterministic) without and with pairwise masks
    plain = tiny_job_spec("masked-vs-plain", encryption={"enabled": True, "max_sites": 8},
                          federation={"rounds": 2, "min_sites": 3})
    masked = plain.model_copy(update={"encryption": plain.encryption.model_copy(
        update={"secure_aggregation": "pairwise"})})

    # Execute
    signed_job(plain, three_site_data, tmp_path / "plain")
    server, transport = signed_job(masked, three_site_data, tmp_path / "masked")

    # Assert: the released adapters agree to the quantisation of the sums
    a, b = released_adapter(tmp_path / "plain"), released_adapter(tmp_path / "masked")
    step = masked.encryption.clip / (2 ** (masked.encryption.quant_bits - 1) - 1)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 4 * step

    # Assert: no weight and no record count left a site; each signed its key, and every site masked with all three
    answers = train_answers(transport, 2)
    assert sorted(answers) == list(SITES)
    for answer in answers.values():
        assert P.H_WEIGHT not in answer.header and P.H_NUM_EXAMPLES not in answer.header
    keys = audit_records(_server_log(tmp_path / "masked"), "pairwise_keys")
    assert len(keys) == 1 and sorted(keys[0]["fields"]["announced"]) == list(SITES) and not keys[0]["fields"]["refused"]
    for site in SITES:
        applied = audit_records(tmp_path / "masked" / site / "run" / "audit" / f"{site}.jsonl", "masks_applied")
        assert [r["fields"]["cohort"] for r in applied] == [list(SITES)] * 2
        assert all(r["fields"]["announcements_signed"] for r in applied)

    # Assert: the CKKS key holder opening one site's ciphertext gets noise, not the update
    secret = load_context(tmp_path / "masked" / "site-1" / "startup" / SITE_CONTEXT_FILE, require_secret=True)
    layout = UpdateLayout.from_update(decode_adapter(json_adapter_template(server)))
    _, ciphertext = read_envelope(answers["site-1"].payload)
    with pytest.raises(HEDecodeError, match="masks did not cancel"):
        decrypt_sum(ciphertext, context=secret, packing=packing_for(masked.encryption), layout=layout,
                    total_weight=None)

    # Assert: the audit trail verifies and every kept sum re-adds; the report says the record counts were withheld
    out = tmp_path / "masked" / "server" / "run"
    assert verify_result(out).ok
    assert replay_result(out).ok
    from zenfed.audit.controls import controls_table
    from zenfed.audit.evidence import collect

    rows = controls_table(collect(out)[0])
    governance = [r for r in rows if "Training examples per site" in r["evidence"]]
    assert governance and "withheld (pairwise masks" in governance[0]["evidence"]
    assert governance[0]["status"] == "evidenced"


def test_a_site_lost_after_the_cohort_is_fixed_is_unmasked_by_the_survivors(tiny_job_spec, three_site_data,
                                                                               tmp_path):
    # Prepare: site-3 masks round 2 but its update never arrives; compare with the unmasked job losing it too
    plain = tiny_job_spec("masked-dropout", encryption={"enabled": True, "max_sites": 8},
                          federation={"rounds": 2, "min_sites": 2})
    masked = plain.model_copy(update={"encryption": plain.encryption.model_copy(
        update={"secure_aggregation": "pairwise"})})

    # Execute
    signed_job(plain, three_site_data, tmp_path / "plain", Site3CrashesInRound2)
    signed_job(masked, three_site_data, tmp_path / "masked", Site3CrashesInRound2)

    # Assert: round 2 completed with the two survivors; the sum equals the survivors' unmasked sum
    out = tmp_path / "masked" / "server" / "run"
    result = json.loads((out / RESULT_FILE).read_text())
    assert result["rounds"][1]["contributors"] == ["site-1", "site-2"]
    a, b = released_adapter(tmp_path / "plain"), released_adapter(tmp_path / "masked")
    step = masked.encryption.clip / (2 ** (masked.encryption.quant_bits - 1) - 1)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 4 * step
    recovered = audit_records(_server_log(tmp_path / "masked"), "masks_recovered")
    assert [(r["fields"]["round"], r["fields"]["dropped"]) for r in recovered] == [(2, ["site-3"])]
    assert len(recovered[0]["fields"]["corrections"]) == 2
    assert (out / "updates" / "round-0002" / "corrections" / "site-1.bin").is_file()

    # Assert: replay re-adds the round with its corrections; a swapped correction is named
    assert replay_result(out).ok
    kept = out / "updates" / "round-0002" / "corrections"
    (kept / "site-1.bin").write_bytes((kept / "site-2.bin").read_bytes())
    verdict = replay_result(out)
    assert not verdict.ok and verdict.first_bad_round == 2


def test_a_substituted_key_is_refused_by_every_site(tiny_job_spec, three_site_data, tmp_path):
    # Prepare
    spec = tiny_job_spec("masked-bad-key", encryption=PAIRWISE, federation={"rounds": 1, "min_sites": 2})

    # Execute
    _, transport = signed_job(spec, three_site_data, tmp_path, SubstitutesSite2Key)

    # Assert: no site masked with the forged key; the job stopped with the reasons on record
    assert transport.stopped is not None and "fewer than 2" in transport.stopped
    refusals = [a.refusal for task, _, a in transport.answers if task == P.TASK_TRAIN]
    assert len(refusals) == 3
    assert any("substituted key" in str(r) for r in refusals)  # site-2 sees its own key replaced
    assert sum("signature on the pairwise key from site-2" in str(r) for r in refusals) == 2


@pytest.mark.parametrize(("privacy", "weighting"), [
    ({"level": "record", "noise_multiplier": 0.8, "clip_norm": 1.0}, "samples"),
    ({"level": "client", "noise_multiplier": 1.0, "clip_norm": 0.5, "client_mode": "distributed"}, "uniform"),
], ids=["record-dp", "distributed-client-dp"])
def test_pairwise_masks_run_in_the_simulator_layout_with_dp(tiny_job_spec, three_site_data, tmp_path, privacy,
                                                            weighting):
    # Prepare: no provisioned kits (keys travel unsigned there, and say so), DP on
    spec = tiny_job_spec("masked-sim-dp", encryption=PAIRWISE, privacy=privacy,
                         federation={"rounds": 2, "min_sites": 3, "weighting": weighting})

    # Execute
    server, transport = run_job(spec, three_site_data, tmp_path, encrypted=True)

    # Assert
    assert transport.stopped is None
    result = json.loads((tmp_path / "server" / "run" / RESULT_FILE).read_text())
    assert [r["contributors"] for r in result["rounds"]] == [list(SITES)] * 2
    assert all(r["total_weight"] is None for r in result["rounds"])  # the weights stayed inside the sum
    assert result["final"]["adapter_dir"] is not None
    moved = released_adapter(tmp_path)
    assert all(torch.isfinite(t).all() for t in moved.values())


def test_a_site_that_withholds_its_metrics_sends_none_and_the_job_goes_on(tiny_job_spec, three_site_data, tmp_path):
    # Prepare: site-3's policy keeps its metrics at the site
    from zenfed.jobs.in_process import run_in_process
    from zenfed.jobs.simulate import builtin_policies

    spec = tiny_job_spec("masked-quiet-site", encryption=PAIRWISE, federation={"rounds": 1, "min_sites": 3})
    policies = builtin_policies(three_site_data, sites=3, dataset="builtin", allow_any_model=True)
    policies["site-3"] = policies["site-3"].model_copy(update={"report_metrics": False})

    # Execute
    run = run_in_process(spec, workspace=tmp_path, policies=policies)

    # Assert: site-3 sent no loss or accuracy; the others' averages stand without it
    assert run.transport.stopped is None
    for task, site, answer in run.transport.answers:
        if task in (P.TASK_TRAIN, P.TASK_EVALUATE):
            quiet = site == "site-3"
            assert (answer.header[P.H_EVAL_LOSS] is None) == quiet
            assert (answer.header[P.H_EVAL_ACCURACY] is None) == quiet
            assert P.H_TRAIN_LOSS not in answer.header or not quiet
    result = json.loads((tmp_path / "server" / "run" / RESULT_FILE).read_text())
    assert result["final"]["sites"]["site-3"]["eval_loss"] is None
    assert isinstance(result["final"]["eval_loss"], float)
