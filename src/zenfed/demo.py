"""``zenfed demo``: the main job on the embedded default, end to end on this machine.

Provisions a loopback federation (one server, three sites, one admin), starts
it, submits the demo job through the Flare API, prints the per-round table,
shows a generation from the final adapter, and stops everything again.
"""

from __future__ import annotations

import socket
import time
from importlib import resources
from pathlib import Path
from typing import Any

from zenfed.data import load_jsonl, make_builtin
from zenfed.jobs.simulate import builtin_locations
from zenfed.spec import AdminSpec, JobSpec, ProjectSpec, ServerSpec, SiteSpec, load_job_spec

DEMO_SITES = 3
DEMO_ADMIN = "admin@zenfed.local"


def demo_spec_path() -> Path:
    """Return the packaged demo job spec."""
    return Path(str(resources.files("zenfed.jobs") / "specs" / "demo-lora.yaml"))


def free_port() -> int:
    """Return a TCP port on localhost that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def loopback_project(name: str, *, data_dir: Path, sites: int, threads: int = 1) -> ProjectSpec:
    """Return a project of one server on localhost, ``sites`` sites on the built-in data, one admin."""
    fl_port = free_port()
    admin_port = free_port()
    while admin_port == fl_port:
        admin_port = free_port()
    return ProjectSpec(
        name=name,
        server=ServerSpec(name="localhost", fl_port=fl_port, admin_port=admin_port),
        sites=tuple(
            SiteSpec(
                name=f"site-{k}", org=f"org_{k}",
                datasets=builtin_locations(data_dir / f"site-{k}"),
                allowed_base_models=("*",), torch_threads=threads,
            )
            for k in range(1, sites + 1)
        ),
        admins=(AdminSpec(name=DEMO_ADMIN, org="zenfed"),),
    )


def _fmt(value: Any, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "-"


def print_round_table(result: dict[str, Any]) -> None:
    """Print federated eval loss and accuracy per round (round 0 is the starting adapter).

    Per site: its local training loss (sites under DP withhold it, and its columns are left
    out) and, with differential privacy, the epsilon it has spent so far.
    """
    rows: list[tuple[str, dict[str, Any], dict[str, Any]]] = [("0", result.get("baseline", {}), {})]
    rows += [(str(r["round"]), r, r.get("sites", {})) for r in result.get("rounds", [])]
    site_names = sorted({s for _, _, sites in rows for s in sites})
    with_dp = any("privacy" in m for _, _, sites in rows for m in sites.values())
    with_loss = any(m.get("train_loss") is not None for _, _, sites in rows for m in sites.values())
    with_preferences = any(row.get("preference_accuracy") is not None for _, row, _ in rows)
    columns = [f"{'round':>5}", f"{'eval loss':>9}", f"{'accuracy':>8}"]
    if with_preferences:
        columns += [f"{'trained':>7}", f"{'pref acc':>8}", f"{'margin':>7}"]
    if with_loss:
        columns += [f"{'train loss':>10}", *(f"{'loss ' + s:>12}" for s in site_names)]
    columns += [f"{'eps ' + s:>10}" for s in site_names] if with_dp else []
    header = "  ".join(columns)
    print(header)
    print("-" * len(header))
    for label, row, sites in rows:
        cells = [f"{label:>5}", f"{_fmt(row.get('eval_loss'), '9.4f'):>9}", f"{_fmt(row.get('accuracy'), '8.1%'):>8}"]
        if with_preferences:
            cells += [f"{row.get('objective', '-').upper():>7}", f"{_fmt(row.get('preference_accuracy'), '8.1%'):>8}",
                      f"{_fmt(row.get('reward_margin'), '7.3f'):>7}"]
        if with_loss:
            cells += [f"{_fmt(row.get('train_loss'), '10.4f'):>10}"]
            cells += [f"{_fmt(sites.get(s, {}).get('train_loss'), '12.4f'):>12}" for s in site_names]
        if with_dp:
            cells += [f"{_fmt(sites.get(s, {}).get('privacy', {}).get('epsilon'), '10.3f'):>10}" for s in site_names]
        print("  ".join(cells))
    legend = ["eval loss / accuracy: federated evaluation of the global adapter after that round, weighted by "
              "validation examples"]
    if with_preferences:
        legend += ["trained: the round's objective; pref acc / margin: share of held-out preference pairs whose "
                   "chosen answer the adapter prefers (against the base model), and the mean reward margin"]
    legend += ["loss SITE: local training loss"] if with_loss else []
    legend += ["eps SITE: epsilon spent by that site so far"] if with_dp else []
    print(f"({'; '.join(legend)})")
    if with_dp and not with_loss:
        print("(sites under DP keep their training loss: epsilon does not cover it)")


def show_generation(adapter_dir: Path, *, spec: JobSpec, test_file: Path, count: int = 3) -> None:
    """Load the base model plus the final adapter with PEFT and print a few answers."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from zenfed.data.tokenize import prompt_ids
    from zenfed.engines.base_model import resolve_base_model

    model_dir = resolve_base_model(spec.model.base)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    examples = load_jsonl(test_file)
    picked = [examples[i * len(examples) // count] for i in range(count)]
    for example in picked:
        ids = torch.tensor([prompt_ids(tokenizer, example)])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=spec.evaluation.max_new_tokens, do_sample=False,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
        prompt = example.prompt[-1].content.replace("\n\n", " | ")
        print(f"  prompt:   {prompt}\n  answer:   {answer}   (expected {example.response})")


def run_demo(*, workspace: Path, keep_up: bool = False) -> Path:
    """Run the demo end to end and return the downloaded result folder."""
    from zenfed.engines.base_model import prepare_default_model
    from zenfed.jobs import export_job
    from zenfed.jobs.submit import load_result, submit
    from zenfed.provisioning.deploy import down, up
    from zenfed.provisioning.project import provision

    started = time.time()
    ws = workspace.resolve()
    ws.mkdir(parents=True, exist_ok=True)
    print("zenfed demo: 1/5 base model", flush=True)
    prepare_default_model()
    print("zenfed demo: 2/5 built-in data for 3 sites", flush=True)
    spec = load_job_spec(demo_spec_path())
    data_dir = ws / "data"
    make_builtin(data_dir, sites=DEMO_SITES, seed=spec.training.seed)
    print("zenfed demo: 3/5 provisioning a loopback federation (1 server, 3 sites, 1 admin)", flush=True)
    deployment = provision(loopback_project("zenfed-demo", data_dir=data_dir, sites=DEMO_SITES), out=ws)
    job_dir = export_job(spec, out=ws / "jobs" / spec.name, overwrite=True)
    print("zenfed demo: 4/5 starting the deployment", flush=True)
    up(deployment)
    try:
        print(f"zenfed demo: 5/5 submitting {job_dir.name} as {DEMO_ADMIN}", flush=True)
        outcome = submit(job_dir, admin_kit=deployment.admin_kit(DEMO_ADMIN), results_root=ws / "results")
    finally:
        if not keep_up:
            down(deployment)
    result = load_result(outcome.result_dir)
    print()
    print_round_table(result)
    adapter_dir = outcome.result_dir / spec.output.adapter_dir
    print(f"\nfinal adapter (PEFT folder): {adapter_dir}")
    print("a generation from it (base model + adapter, loaded with PeftModel.from_pretrained):")
    show_generation(adapter_dir, spec=spec, test_file=data_dir / "test.jsonl")
    from zenfed.audit.report import build_report
    from zenfed.audit.verify import verify_result

    verdict = verify_result(outcome.result_dir)
    print(f"\naudit chain: {'intact' if verdict.ok else 'DAMAGED'} "
          f"({len(verdict.logs)} signed logs; `zenfed audit verify {outcome.result_dir}`)")
    report = build_report(outcome.result_dir, out_dir=outcome.result_dir / "report")
    print(f"compliance report: {report.html}\n                   {report.pdf}\n                   {report.json}")
    print(f"\nzenfed demo: done in {time.time() - started:.0f} s; job result in {outcome.result_dir}")
    return outcome.result_dir
