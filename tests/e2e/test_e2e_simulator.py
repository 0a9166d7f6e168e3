"""The FLARE simulator end to end: tiny model, 2 sites, 2 rounds; FedAvg checked independently."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from zenfed.jobs.simulate import builtin_policies, run_simulation
from zenfed.wire import decode_adapter

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

ROUNDS = 2
SITE2_EXAMPLES = 25


@pytest.fixture(scope="module")
def simulation(tiny_model_dir, tiny_job_spec, small_builtin_data, tmp_path_factory):
    # Unequal sites (60 and 25 training examples), so sample weighting differs from a plain mean.
    root = tmp_path_factory.mktemp("simulate")
    data = root / "data"
    shutil.copytree(small_builtin_data, data)
    train = data / "site-2" / "train.jsonl"
    train.write_text("".join(train.read_text().splitlines(keepends=True)[:SITE2_EXAMPLES]))
    spec = tiny_job_spec("sim-e2e", federation={"rounds": ROUNDS, "min_sites": 2})
    policies = builtin_policies(data, sites=2, dataset="builtin", allow_any_model=True)
    workspace = root / "run"
    result_dir = run_simulation(spec, workspace=workspace, policies=policies)
    result = json.loads((result_dir / "zenfed_result.json").read_text())
    return spec, workspace, result_dir, result


def sent_file(workspace: Path, site: str, rnd: int) -> Path:
    """The copy a site keeps of the update it sent (its own record, in its own job folder)."""
    found = sorted((workspace / "sim" / site / "simulate_job").rglob(f"sent/round-{rnd:04d}.*"))
    assert len(found) == 1, f"{site} kept {len(found)} copies of its round-{rnd} update: {found}"
    return found[0]


def sent_update(workspace: Path, site: str, rnd: int) -> dict[str, torch.Tensor]:
    return decode_adapter(sent_file(workspace, site, rnd).read_bytes())


def test_the_final_adapter_is_the_sample_weighted_mean_of_the_sites_updates(simulation):
    # Prepare
    spec, workspace, result_dir, result = simulation
    final = load_file(str(result_dir / spec.output.adapter_dir / "adapter_model.safetensors"))
    last = result["rounds"][-1]
    weights = {site: float(m["num_examples"]) for site, m in last["sites"].items()}
    updates = {site: sent_update(workspace, site, ROUNDS) for site in weights}

    # Execute: recompute FedAvg here, in float64, from the sites' own copies.
    total = sum(weights.values())
    expected = {name: sum(updates[site][name].double() * w for site, w in weights.items()) / total for name in final}

    # Assert
    assert weights == {"site-1": 60.0, "site-2": float(SITE2_EXAMPLES)}
    assert set(updates["site-1"]) == set(final) == set(updates["site-2"])
    for name, tensor in final.items():
        assert tensor.dtype == torch.float32
        assert torch.allclose(tensor.double(), expected[name], atol=1e-6, rtol=0), name
    # The sites really differed, and the weighting mattered: the plain mean is measurably off.
    plain = {n: (updates["site-1"][n].double() + updates["site-2"][n].double()) / 2 for n in final}
    assert any(not torch.allclose(final[n].double(), plain[n], atol=1e-5) for n in final)


def test_each_site_update_matches_the_hash_the_server_recorded(simulation):
    # Prepare
    from zenfed.wire import sha256_hex

    _, workspace, _, result = simulation

    # Execute / Assert
    for entry in result["rounds"]:
        for site, metrics in entry["sites"].items():
            path = sent_file(workspace, site, entry["round"])
            assert sha256_hex(path.read_bytes()) == metrics["update_sha256"]


def test_eval_loss_falls_and_every_round_is_recorded(simulation):
    # Prepare
    _, _, _, result = simulation

    # Assert
    assert [r["round"] for r in result["rounds"]] == list(range(1, ROUNDS + 1))
    assert all(sorted(r["contributors"]) == ["site-1", "site-2"] for r in result["rounds"])
    baseline, final = result["baseline"]["eval_loss"], result["final"]["eval_loss"]
    assert final < baseline
    assert 0.0 <= result["final"]["accuracy"] <= 1.0
    assert result["job"]["spec"]["name"] == "sim-e2e"


def test_the_final_adapter_loads_with_peft_and_changes_the_logits(simulation, tiny_model_dir):
    # Prepare
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    spec, _, result_dir, _ = simulation
    adapter_dir = result_dir / spec.output.adapter_dir
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, torch_dtype=torch.float32).eval()
    ids = torch.tensor([[1, 50, 60, 70, 80, 2]])
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits.clone()

    # Execute
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    with torch.no_grad():
        tuned_logits = model(input_ids=ids).logits

    # Assert
    assert (adapter_dir / "adapter_config.json").is_file()
    assert not torch.allclose(base_logits, tuned_logits, atol=1e-4)
