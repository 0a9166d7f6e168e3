"""One NeMo site and two PEFT sites in one job: their adapters aggregate into the exact weighted mean."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from zenfed.data import make_builtin
from zenfed.jobs.simulate import builtin_policies, run_simulation
from zenfed.wire import decode_adapter

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


def test_nemo_and_peft_sites_aggregate_to_the_weighted_mean(tmp_path, tiny_job_spec):
    # Prepare: three sites of unequal size; site-1 trains with NeMo whatever the job says.
    data = tmp_path / "data"
    make_builtin(data, sites=3, train_per_site=48, valid_per_site=8, test_per_task=2)
    for site, keep in (("site-2", 30), ("site-3", 20)):
        train = data / site / "train.jsonl"
        train.write_text("".join(train.read_text().splitlines(keepends=True)[:keep]))
    policies = builtin_policies(data, sites=3, dataset="builtin", allow_any_model=True)
    policies["site-1"] = policies["site-1"].model_copy(update={"engine": "nemo"})
    spec = tiny_job_spec("mixed-engines", federation={"rounds": 2, "min_sites": 3})

    # Execute
    result_dir = run_simulation(spec, workspace=tmp_path / "run", policies=policies)

    # Assert: the NeMo site really ran NeMo (its log says so) and FedAvg is exact.
    sim = tmp_path / "run" / "sim"
    result = json.loads((result_dir / "zenfed_result.json").read_text())
    last = result["rounds"][-1]
    engines = {site: m["engine"] for site, m in last["sites"].items()}
    assert engines == {"site-1": "nemo", "site-2": "peft", "site-3": "peft"}
    weights = {site: float(m["num_examples"]) for site, m in last["sites"].items()}
    assert weights == {"site-1": 48.0, "site-2": 30.0, "site-3": 20.0}
    updates = {
        site: decode_adapter(next((sim / site / "simulate_job").rglob("sent/round-0002.*")).read_bytes())
        for site in weights
    }
    final = load_file(str(result_dir / spec.output.adapter_dir / "adapter_model.safetensors"))
    total = sum(weights.values())
    for name, tensor in final.items():
        expected = sum(updates[s][name].double() * w for s, w in weights.items()) / total
        assert torch.allclose(tensor.double(), expected, atol=1e-6, rtol=0), name
    # The engines produced different updates (different data), so the check is not vacuous.
    assert not torch.allclose(updates["site-1"][name], updates["site-2"][name])
