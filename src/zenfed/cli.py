"""The ``zenfed`` command. Each subcommand is a thin call into the library."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from zenfed.errors import DeploymentError, ZenfedError

Handler = Callable[[argparse.Namespace], int]


def _models_prepare(args: argparse.Namespace) -> int:
    from zenfed.engines.base_model import prepare_default_model

    print(prepare_default_model(force=args.force))
    return 0


def _models_hash(args: argparse.Namespace) -> int:
    from zenfed.engines.base_model import model_files, model_fingerprint, resolve_base_model

    folder = resolve_base_model(args.folder)
    pin = model_fingerprint(folder)
    if args.json:
        print(json.dumps({"folder": str(folder), "base_sha256": pin,
                          "files": [path.relative_to(folder).as_posix() for path in model_files(folder)]}))
    else:
        print(pin)
        print(f"zenfed: put `base_sha256: {pin}` under model: in the job spec, or `sha256:{pin}` in a site's "
              "allowed_base_models", file=sys.stderr)
    return 0


def _data_make(args: argparse.Namespace) -> int:
    from zenfed.data import make_builtin

    manifest = make_builtin(args.out, sites=args.sites, seed=args.seed, skew=args.skew)
    print(f"wrote {len(manifest['sites'])} site folders (SFT data and preference pairs), test.jsonl and "  # type: ignore[arg-type]
          f"pref-test.jsonl to {args.out}")
    return 0


def _site_probe(args: argparse.Namespace) -> int:
    from zenfed.site.policy import site_hardware
    from zenfed.site.probe import measure, policy_file, write_measured
    from zenfed.spec import load_site_policy

    path = policy_file(Path(args.kit))
    policy = load_site_policy(path)
    measured = measure(model=args.model, steps=args.steps, threads=policy.torch_threads,
                       engine=policy.engine or "peft", hardware=site_hardware(policy),
                       say=lambda text: print(f"zenfed: probe: {text}", flush=True))
    print(json.dumps(measured, indent=2))
    if args.dry_run:
        return 0
    write_measured(path, measured)
    print(f"zenfed: wrote them under enrollment: in {path}; the site discloses them to jobs while "
          "enrollment.disclose is true")
    return 0


def _job_export(args: argparse.Namespace) -> int:
    from zenfed.jobs import export_job
    from zenfed.spec import load_job_spec

    spec = load_job_spec(args.spec)
    print(export_job(spec, out=args.out, overwrite=args.force, require_pinned_base=True))
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from zenfed.data import make_builtin
    from zenfed.demo import print_round_table
    from zenfed.jobs.simulate import builtin_policies, load_policies, run_simulation
    from zenfed.spec import load_job_spec

    spec = load_job_spec(args.spec)
    workspace = Path(args.workspace)
    if args.policies:
        policies = load_policies(Path(args.policies))
    else:
        data_dir = workspace.with_name(f"{workspace.name}-data")
        make_builtin(data_dir, sites=args.sites, seed=spec.training.seed)
        policies = builtin_policies(
            data_dir.resolve(), sites=args.sites, dataset=spec.data.dataset, allow_any_model=True
        )
    print(f"zenfed: simulating {spec.name} with {len(policies)} sites in {workspace} ...", flush=True)
    result_dir = run_simulation(spec, workspace=workspace, policies=policies, threads=args.workers)
    result = json.loads((result_dir / "zenfed_result.json").read_text())
    print_round_table(result)
    adapter = result["final"].get("adapter_dir")
    released = f"adapter: {result_dir / adapter}" if adapter else None
    print(released or "adapter: not released (a site policy refused a plaintext release)")
    return 0


def _provision(args: argparse.Namespace) -> int:
    from zenfed.provisioning.project import provision
    from zenfed.spec import load_project_spec

    spec = load_project_spec(args.project)
    deployment = provision(spec, out=args.out)
    print(f"provisioned {deployment.project}: server kit {deployment.server_kit}")
    # Dataset paths name folders on each site's machine; here they can only be hinted at.
    for site_spec in spec.sites:
        for name, location in site_spec.datasets.items():
            if not Path(location.path).is_dir():
                print(f"  warning: site {site_spec.name}'s dataset {name!r} path {location.path} does not exist on "
                      "this machine; make sure it exists on the site's, or fix it in the kit's "
                      "local/zenfed_site.yaml", file=sys.stderr)
    for site, kit in sorted(deployment.site_kits.items()):
        print(f"  site {site}: {kit}")
    for admin, kit in sorted(deployment.admin_kits.items()):
        print(f"  admin {admin}: {kit}")
    return 0


def _up(args: argparse.Namespace) -> int:
    from zenfed.provisioning.deploy import up
    from zenfed.provisioning.project import Deployment

    up(Deployment.load(args.workspace))
    return 0


def _down(args: argparse.Namespace) -> int:
    from zenfed.provisioning.deploy import down
    from zenfed.provisioning.project import Deployment

    down(Deployment.load(args.workspace))
    return 0


def _submit(args: argparse.Namespace) -> int:
    from zenfed.demo import print_round_table
    from zenfed.jobs.submit import load_result, submit

    kit = Path(args.kit)
    if not (kit / "startup" / "fed_admin.json").is_file():
        raise DeploymentError(f"{kit} is not an admin kit (no startup/fed_admin.json); pass --kit "
                              "WS/PROJECT/prod_NN/ADMIN from `zenfed provision`")
    # An admin kit lives at WS/PROJECT/prod_NN/ADMIN; results go to WS/results by default.
    parents = kit.resolve().parents
    results = Path(args.results) if args.results else (parents[2] if len(parents) > 2 else kit) / "results"
    outcome = submit(args.job, admin_kit=kit, results_root=results, timeout_s=args.timeout)
    print_round_table(load_result(outcome.result_dir))
    print(f"job {outcome.job_id}: {outcome.status}; result in {outcome.result_dir}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from zenfed.demo import run_demo

    run_demo(workspace=Path(args.workspace), keep_up=args.keep_up)
    return 0


def _report(args: argparse.Namespace) -> int:
    from zenfed.audit.report import build_report

    paths = build_report(Path(args.result_dir), out_dir=Path(args.out))
    for path in (paths.json, paths.html, paths.pdf):
        print(path)
    return 0


def _audit_replay(args: argparse.Namespace) -> int:
    from zenfed.audit.replay import main_replay

    return main_replay(Path(args.result_dir))


def _audit_verify(args: argparse.Namespace) -> int:
    from zenfed.audit.verify import main_verify

    return main_verify(Path(args.path), root_ca=Path(args.root_ca) if args.root_ca else None)


def _bench(args: argparse.Namespace) -> int:
    from zenfed.bench import run_benchmark

    result = run_benchmark(args.name, tiny=args.tiny)
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the ``zenfed`` command."""
    parser = argparse.ArgumentParser(prog="zenfed", description="Privacy-first federated LoRA on NVIDIA FLARE.")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(
        name: str, handler: Handler, help_text: str, parent: argparse._SubParsersAction = sub,  # type: ignore[type-arg]
    ) -> argparse.ArgumentParser:
        p = parent.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(handler=handler)
        return p

    models = sub.add_parser("models", help="base models").add_subparsers(dest="models_command", required=True)
    p = command("prepare", _models_prepare, "materialise the default base model into the local cache", models)
    p.add_argument("--force", action="store_true", help="rebuild even if the cache is intact")
    p = command("hash", _models_hash, "print the SHA-256 that pins a base model folder (model.base_sha256)", models)
    p.add_argument("folder", help="a Hugging Face model folder, or 'default'")
    p.add_argument("--json", action="store_true", help="print a JSON object with the files it covers")

    data = sub.add_parser("data", help="datasets").add_subparsers(dest="data_command", required=True)
    p = command("make", _data_make, "write the built-in non-IID benchmark, one folder per site", data)
    p.add_argument("--sites", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skew", type=float, default=0.9, help="share of a site's data from its own task")

    site = sub.add_parser("site", help="this site").add_subparsers(dest="site_command", required=True)
    p = command("probe", _site_probe, "measure this machine's training speed and write it into the site policy",
                site)
    p.add_argument("kit", help="the site's kit folder (or its local/zenfed_site.yaml)")
    p.add_argument("--model", default="default", help="base model to time (default: the embedded SmolLM2)")
    p.add_argument("--steps", type=int, default=4, help="timed training steps")
    p.add_argument("--dry-run", action="store_true", help="print the measurement; do not write it")

    job = sub.add_parser("job", help="job folders").add_subparsers(dest="job_command", required=True)
    p = command("export", _job_export, "write a FLARE job folder (configuration only) from a job spec", job)
    p.add_argument("spec")
    p.add_argument("--out", required=True)
    p.add_argument("--force", action="store_true", help="replace an existing folder")

    p = command("simulate", _simulate, "run a job spec in the FLARE simulator")
    p.add_argument("spec")
    p.add_argument("--workspace", default="workspace/simulate")
    p.add_argument("--sites", type=int, default=3, help="sites on the built-in data (without --policies)")
    p.add_argument("--policies", help="folder of SITE.yaml site policies (default: built-in data)")
    p.add_argument("--workers", type=int, default=None,
                   help="simulator worker processes (default: one per site); fewer saves memory with many sites, "
                        "each task then starting a process of its own")

    p = command("provision", _provision, "provision a project: kits with certificates and site policies")
    p.add_argument("project")
    p.add_argument("--out", required=True)

    p = command("up", _up, "start a provisioned deployment on this machine")
    p.add_argument("workspace")
    p = command("down", _down, "stop a deployment started with `zenfed up` (also after a crash)")
    p.add_argument("workspace")

    p = command("submit", _submit, "submit a job folder, follow it, download its result")
    p.add_argument("job")
    p.add_argument("--kit", required=True, help="the admin's startup kit folder")
    p.add_argument("--results", help="where results go (default: WS/results next to the kits)")
    p.add_argument("--timeout", type=float, default=3600.0)

    p = command("demo", _demo, "provision, start and run the main job on the embedded default")
    p.add_argument("--workspace", default="workspace/demo")
    p.add_argument("--keep-up", action="store_true", help="leave the deployment running afterwards")

    p = command("report", _report, "build the compliance report (JSON, HTML, PDF) from a job result")
    p.add_argument("result_dir")
    p.add_argument("--out", required=True)

    audit = sub.add_parser("audit", help="audit logs").add_subparsers(dest="audit_command", required=True)
    p = command("replay", _audit_replay, "re-add every kept encrypted sum and check it against the signed logs",
                audit)
    p.add_argument("result_dir", help="a downloaded job result folder")
    p = command("verify", _audit_verify, "verify audit log chains, signatures and cross-checks", audit)
    p.add_argument("path", help="a PARTICIPANT.jsonl log or a job result folder")
    p.add_argument("--root-ca", help="the project's rootCA.pem (default: found next to the logs)")

    p = command("bench", _bench, "run a benchmark and print one JSON object")
    p.add_argument("name", choices=["quality", "he", "privacy", "scale", "tiers", "engines", "algorithms", "gpu",
                                    "alignment"])
    p.add_argument("--json", action="store_true", help="print compact JSON")
    p.add_argument("--tiny", action="store_true", help="use the tiny random model (fast)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``zenfed`` command; typed errors become one clear line and exit code 2."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except ZenfedError as err:
        print(f"zenfed: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("zenfed: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
