"""Whole two-stage jobs without FLARE: SFT rounds, then federated DPO from the SFT adapter.

Real CKKS sums, real DP-SGD with the preference pair as the unit, the tiny model,
three in-process sites on the built-in non-IID data and preference pairs.
"""

from __future__ import annotations

import json
import stat

import torch
from safetensors.torch import load_file
from test_round_without_flare import SITES, signed_job

from zenfed import protocol as P
from zenfed.audit.report import build_report
from zenfed.server.result import RESULT_FILE
from zenfed.site.state import REFERENCE_FILE, SiteStateStore


def audit(path, event):
    return [r["fields"] for r in map(json.loads, path.read_text().splitlines()) if r["event"] == event]


def test_sft_then_dpo_under_encryption_and_pair_level_dp(tiny_job_spec, three_site_data, tmp_path):
    # Prepare: one SFT round, then two DPO rounds, all summed under CKKS with record-level DP.
    spec = tiny_job_spec(
        "in-process-dpo", objective="dpo", dpo={"beta": 0.2, "sft_rounds": 1},
        federation={"rounds": 3, "min_sites": 3}, encryption={"enabled": True},
        privacy={"level": "record", "target_epsilon": 8.0, "clip_norm": 1.0},
    )

    # Execute
    server, transport = signed_job(spec, three_site_data, tmp_path)

    # Assert: the server announced each round's objective and recorded it.
    server_log = tmp_path / "server" / "run" / "audit" / "server.jsonl"
    started = [(r["round"], r["objective"]) for r in audit(server_log, "round_started") if r["task"] == "zenfed_train"]
    assert started == [(1, "sft"), (2, "dpo"), (3, "dpo")]
    # Every site trained every round, and the result names the stages and the unit of privacy.
    result = json.loads((server.folders.run / RESULT_FILE).read_text())
    assert [r["contributors"] for r in result["rounds"]] == [list(SITES)] * 3
    objective = result["job"]["objective"]
    assert [s["objective"] for s in objective["stages"]] == ["sft", "dpo"]
    assert objective["stages"][1]["rounds"] == [2, 3]
    assert "preference pair" in objective["privacy_unit"]
    # The reference is round 1's result, named by its hash (sites refuse a DPO round that names another).
    assert objective["stages"][1]["reference_sha256"] == result["rounds"][0]["global_adapter_sha256"]
    # Federated evaluation reports preference accuracy and reward margin next to the SFT metrics.
    for entry in result["rounds"]:
        assert 0.0 <= entry["preference_accuracy"] <= 1.0 and entry["accuracy"] is not None
    assert result["final"]["preference_accuracy"] is not None
    # The round-1 adapter (base model: every pair a tie) scores exactly 0.5; later ones have moved.
    first_eval = audit(tmp_path / "site-1" / "run" / "audit" / "site-1.jsonl", "evaluated")
    assert first_eval[0]["metrics"]["preference_accuracy"] == 0.5
    assert first_eval[0]["metrics"]["reward_margin"] == 0.0
    assert first_eval[-1]["metrics"]["reward_margin"] != 0.0
    for site in SITES:
        # Each site planned one epsilon over both stages, each stage at its own sampling rate.
        decisions = audit(tmp_path / site / "run" / "audit" / f"{site}.jsonl", "policy_decision")
        plan = next(d["plan"] for d in decisions if "plan" in d)
        assert set(plan["stage_sample_rates"]) == {"sft", "dpo"}
        assert plan["planned_epsilon"] <= 8.0
        assert "preference pair" in plan["unit"]
        spent = [a.header[P.H_DP_SPENT]["epsilon"] for t, s, a in transport.answers
                 if s == site and t == P.TASK_TRAIN and a.payload]
        assert len(spent) == 3 and spent == sorted(spent) and spent[-1] <= 8.0
        # The reference (the adapter round 2 started from, after SFT) is kept at the site, 0600 in a 0700 folder.
        folder = SiteStateStore(root=tmp_path / site, spec=spec).folder
        kept = folder / REFERENCE_FILE
        assert stat.S_IMODE(kept.stat().st_mode) == 0o600 and stat.S_IMODE(folder.stat().st_mode) == 0o700
        reference = load_file(str(kept))
        assert any(".lora_B." in k and v.abs().sum() > 0 for k, v in reference.items())  # SFT moved B
    # All sites kept the same reference: the decrypted mean of round 1.
    kept = [load_file(str(SiteStateStore(root=tmp_path / s, spec=spec).folder / REFERENCE_FILE)) for s in SITES]
    assert all(torch.equal(kept[0][k], other[k]) for other in kept[1:] for k in kept[0])
    # The compliance report names the objective, its stages and the unit of privacy, with the preference curve.
    paths = build_report(server.folders.run, out_dir=tmp_path / "report")
    report = json.loads(paths.json.read_text())
    assert report["summary"]["objective"].startswith("SFT in round 1 on builtin; DPO (beta 0.2) in rounds 2-3 "
                                                     "on builtin-preferences")
    assert "preference pair" in report["summary"]["privacy_unit"]
    assert report["summary"]["final_preference_accuracy"] == result["final"]["preference_accuracy"]
    assert [r["preference_accuracy"] for r in report["curves"]["rounds"]] == \
        [r["preference_accuracy"] for r in result["rounds"]]
    html = paths.html.read_text()
    assert "Unit of privacy" in html and "Preference accuracy" in html
    assert paths.pdf.read_bytes().startswith(b"%PDF")
