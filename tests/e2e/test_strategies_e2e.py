"""The federated algorithms through real FLARE: FFA-LoRA with a site's rank cap and record-level DP in the
simulator; FedAdam with personal layers, then SCAFFOLD with record-level DP, on one provisioned deployment.

All run under pairwise masks: signed key announcements and masked sums travel through FLARE.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from zenfed.data import make_builtin
from zenfed.demo import loopback_project
from zenfed.engines import make_engine
from zenfed.engines.tiny import build_tiny_model
from zenfed.jobs import export_job
from zenfed.jobs.simulate import builtin_policies, run_simulation
from zenfed.jobs.submit import load_result, submit
from zenfed.privacy.he import (
    SITE_CONTEXT_FILE,
    EncryptedSum,
    HEDecodeError,
    UpdateLayout,
    decrypt_sum,
    load_context,
    packing_for,
    read_envelope,
)
from zenfed.privacy.he.ckks import slot_count, split_chunks
from zenfed.privacy.he.params import slot_layout
from zenfed.privacy.he.seal import SealKit
from zenfed.privacy.he.wire import expand_ciphertexts
from zenfed.provisioning.deploy import down, up
from zenfed.provisioning.project import provision
from zenfed.site.personal import PERSONAL_FILE
from zenfed.site.state import SiteStateStore
from zenfed.spec import JobSpec

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("strategies_e2e")
    model = build_tiny_model(root / "tiny")
    data = root / "data"
    make_builtin(data, sites=2, train_per_site=120, valid_per_site=16, test_per_task=4)
    return model, data


def _spec(model: Path, *, name: str, federation: dict, dp: bool = False, lora: dict | None = None) -> JobSpec:
    return JobSpec.model_validate({
        "name": name, "model": {"base": str(model)}, "lora": {"rank": 4, "alpha": 8, **(lora or {})},
        "training": {"local_steps": 4, "batch_size": 8, "seq_len": 128, "learning_rate": 0.01},
        "federation": {"rounds": 2, "min_sites": 2, **federation},
        "evaluation": {"max_examples": 8, "max_new_tokens": 4},
        "encryption": {"enabled": True, "secure_aggregation": "pairwise", "max_sites": 8},
        "privacy": {"level": "record", "noise_multiplier": 0.8} if dp else {"level": "none"},
    })


def test_ffa_lora_in_the_simulator_keeps_the_shared_a(tiny_setup: tuple[Path, Path], tmp_path: Path) -> None:
    # Prepare: site-1's policy caps its rank at 2 of the job's 4
    model, data = tiny_setup
    spec = _spec(model, name="ffa-sim", federation={"strategy": "ffa_lora"}, dp=True)
    policies = builtin_policies(data, sites=2, dataset="builtin", allow_any_model=True)
    policies["site-1"] = policies["site-1"].model_copy(update={"max_lora_rank": 2})

    # Execute
    out = run_simulation(spec, workspace=tmp_path / "sim", policies=policies)

    # Assert: the job completed under CKKS and DP; the released adapter holds the initial A
    result = json.loads((out / "zenfed_result.json").read_text())
    assert result["aggregation"] == "ffa_lora-ckks" and len(result["rounds"]) == 2
    released = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    initial = make_engine(spec, model_dir=model, threads=1).initial_adapter()
    names = [k for k in initial if ".lora_A." in k]
    assert names and all(k in released for k in names)
    assert all(float((released[k] - initial[k]).abs().max()) == 0.0 for k in names)
    # B keeps the job's rank; ranks 2-3, which only site-2 trains, moved too
    b_names = [k for k in initial if ".lora_B." in k]
    assert all(released[k].shape == initial[k].shape == (released[k].shape[0], 4) for k in b_names)
    assert any(float((released[k][:, 2:] - initial[k][:, 2:]).abs().max()) > 0 for k in b_names)


def _audit(result_dir: Path, site: str, event: str) -> list[dict]:
    lines = (result_dir / "audit" / f"{site}.jsonl").read_text().splitlines()
    return [r["fields"] for r in map(json.loads, filter(str.strip, lines)) if r["event"] == event]


def test_fedadam_and_scaffold_on_a_deployment_step_identically_at_every_site(tiny_setup: tuple[Path, Path],
                                                                             tmp_path: Path) -> None:
    # Prepare
    model, data = tiny_setup
    deployment = provision(loopback_project("fedadam-e2e", data_dir=data, sites=2), out=tmp_path / "ws")
    fedadam_spec = _spec(model, name="fedadam-deploy", federation={
        "strategy": "fedadam", "server_optimizer": {"learning_rate": 0.05}}, lora={"personal_layers": [1]})
    job = export_job(fedadam_spec, out=tmp_path / "jobs" / "fedadam")
    scaffold_job = export_job(_spec(model, name="scaffold-deploy", federation={"strategy": "scaffold"}, dp=True),
                              out=tmp_path / "jobs" / "scaffold")

    # Execute: two jobs, one after the other, on the same running deployment
    up(deployment, progress=False)
    try:
        outcome = submit(job, admin_kit=deployment.admin_kit(), results_root=tmp_path / "results", progress=False)
        scaffold = submit(scaffold_job, admin_kit=deployment.admin_kit(), results_root=tmp_path / "results",
                          progress=False)
    finally:
        down(deployment, progress=False)

    # Assert: SCAFFOLD under masks and record DP: released, and each site spent epsilon every round
    result = load_result(scaffold.result_dir)
    assert result["aggregation"] == "scaffold-ckks"
    assert [r["contributors"] for r in result["rounds"]] == [["site-1", "site-2"]] * 2
    assert (scaffold.result_dir / "adapter" / "adapter_model.safetensors").is_file()
    for site in ("site-1", "site-2"):
        spent = [r["sites"][site]["privacy"]["epsilon"] for r in result["rounds"]]
        assert 0 < spent[0] < spent[1], (site, spent)
        assert [f["round"] for f in _audit(scaffold.result_dir, site, "strategy_state")] == [1, 2]
    # Both sites hold the same global control variate c (summed in the same masked ciphertext as the
    # update), and each its own c_i
    spec = JobSpec.model_validate(result["job"]["spec"])
    kept = {site: load_file(str(SiteStateStore(root=Path(deployment.site_kits[site]), spec=spec).path))
            for site in ("site-1", "site-2")}
    controls = [k for k in kept["site-1"] if k.startswith("c.")]
    assert controls and all(torch.equal(kept["site-1"][k], kept["site-2"][k]) for k in controls)
    assert any(not torch.equal(kept["site-1"][k], kept["site-2"][k]) for k in kept["site-1"] if k.startswith("ci."))

    # Assert: released through a site; both sites' logs show the same optimizer state each round
    result = load_result(outcome.result_dir)
    assert result["aggregation"] == "fedadam-ckks"
    assert (outcome.result_dir / "adapter" / "adapter_model.safetensors").is_file()
    states = {site: [(f["round"], f["sha256"]) for f in _audit(outcome.result_dir, site, "strategy_state")]
              for site in ("site-1", "site-2")}
    assert [rnd for rnd, _ in states["site-1"]] == [1, 2]
    assert states["site-1"] == states["site-2"]
    # Layer 1's LoRA is personal: released as initialised; each site keeps its own trained copy (0600)
    released = load_file(str(outcome.result_dir / "adapter" / "adapter_model.safetensors"))
    initial = make_engine(fedadam_spec, model_dir=model, threads=1).initial_adapter()
    personal = sorted(k for k in initial if ".layers.1." in k)
    assert personal and all(torch.equal(released[k], initial[k]) for k in personal)
    assert any(not torch.equal(released[k], initial[k]) for k in initial if ".layers.0." in k)
    store = {site: SiteStateStore(root=Path(deployment.site_kits[site]), spec=fedadam_spec).folder
             / PERSONAL_FILE for site in ("site-1", "site-2")}
    assert all(path.stat().st_mode & 0o777 == 0o600 for path in store.values())
    mine = {site: load_file(str(path)) for site, path in store.items()}
    assert all(sorted(tensors) == personal for tensors in mine.values())
    trained_b = [k for k in personal if ".lora_B." in k]
    assert any(not torch.equal(mine["site-1"][k], mine["site-2"][k]) for k in trained_b)
    # Each site masked both rounds with both sites' keys, checked against the project's root CA
    for site in ("site-1", "site-2"):
        lines = (outcome.result_dir / "audit" / f"{site}.jsonl").read_text().splitlines()
        applied = [json.loads(line)["fields"] for line in lines if '"masks_applied"' in line]
        assert [a["cohort"] for a in applied] == [["site-1", "site-2"]] * 2
        assert all(a["announcements_signed"] for a in applied)
    _attacker_reads_only_noise(deployment, outcome.result_dir)


def _attacker_reads_only_noise(deployment, result_dir: Path) -> None:
    """With site-1's kit (the CKKS key) and the server's kept ciphertexts, try to read site-2's round-1 update."""
    key = load_context(Path(deployment.site_kits["site-1"]) / "startup" / SITE_CONTEXT_FILE, require_secret=True)
    kept = result_dir / "updates" / "round-0001"
    spec = JobSpec.model_validate(load_result(result_dir)["job"]["spec"])
    layout = slot_layout(key.params, packing_for(spec.encryption))

    def slots(blob: bytes) -> np.ndarray:
        with SealKit(key) as kit:
            return np.rint(np.concatenate([kit.decrypt(expand_ciphertexts(c)[1]) for c in split_chunks(blob)]))

    theirs = read_envelope((kept / "site-2.bin").read_bytes())[1]
    total = EncryptedSum(context=key)
    for name in ("site-1.bin", "site-2.bin"):
        total.add(read_envelope((kept / name).read_bytes())[1])
    n = read_envelope((kept / "site-2.bin").read_bytes())[0].n_values
    used = slot_count(n, packing=packing_for(spec.encryption), layout=layout)  # the rest is padding
    seen, summed = slots(theirs)[:used], slots(total.to_bytes())[:used]
    modulus = layout.mask_modulus
    summed = np.where(np.mod(summed, modulus) >= modulus // 2, np.mod(summed, modulus) - modulus,
                      np.mod(summed, modulus))  # the round's (unmasked) sum, which the key holder may read
    assert seen.min() >= 0 and seen.max() < modulus and abs(seen.mean() / modulus - 0.5) < 0.1
    # With two sites the sum is half site-2's update: unmasked, the two would correlate strongly.
    corr = float(np.corrcoef(seen, summed)[0, 1])
    assert abs(corr) < 4 / np.sqrt(used), corr
    with pytest.raises(HEDecodeError, match="masks did not cancel"):
        decrypt_sum(theirs, context=key, packing=packing_for(spec.encryption),
                    layout=UpdateLayout((("u", (n,)),)), total_weight=None)
