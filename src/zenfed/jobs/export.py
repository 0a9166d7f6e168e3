"""Export a JobSpec as a FLARE job folder: configuration only, no custom code.

Sites run the installed, version-pinned ``zenfed`` package; the folder names
its classes by path. That is what FLARE requires once confidential computing is
on, and what a regulated site's change control wants.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from zenfed import protocol as P
from zenfed.atomic import staged_dir
from zenfed.errors import JobError
from zenfed.spec import DEFAULT_BASE_MODEL, JobSpec

# One app, deployed everywhere: its server config runs on the server and its
# client config on every site. FLARE's "@ALL" cannot be mixed with named sites.
APP = "app"
CONTROLLER_CLASS = "zenfed.controllers.round_controller.FedLoRAController"
EXECUTOR_CLASS = "zenfed.executors.lora_executor.LoRAExecutor"


def job_configs(spec: JobSpec) -> dict[str, dict[str, Any]]:
    """Return the job folder's files as data: relative path -> JSON content."""
    spec_data = spec.model_dump(mode="json")
    meta = {
        "name": spec.name,
        "resource_spec": {},
        "deploy_map": {APP: ["@ALL"]},
        "min_clients": spec.federation.min_sites,
    }
    server = {
        "format_version": 2,
        "workflows": [{"id": "zenfed_controller", "path": CONTROLLER_CLASS, "args": {"spec": spec_data}}],
        "components": [],
        # FLARE reads these from the server app's config: how soon a site whose job process is gone
        # counts as lost, and how long after a task starts FLARE may end it for lost sites.
        "dead_client_grace_period": spec.federation.lost_site_grace_s,
        "dead_client_check_lead_time": min(30, spec.federation.lost_site_grace_s),
    }
    site = {
        "format_version": 2,
        "executors": [{
            "tasks": list(P.SITE_TASKS),
            "executor": {"id": "zenfed_executor", "path": EXECUTOR_CLASS, "args": {"spec": spec_data}},
        }],
        "task_data_filters": [],
        "task_result_filters": [],
        "components": [],
    }
    return {
        "meta.json": meta,
        f"{APP}/config/config_fed_server.json": server,
        f"{APP}/config/config_fed_client.json": site,
    }


def export_job(spec: JobSpec, *, out: str | Path, overwrite: bool = False, require_pinned_base: bool = False) -> Path:
    """Write ``spec`` as a FLARE job folder at ``out``, atomically.

    Args:
        spec: A validated job spec.
        out: The job folder to create (e.g. ``jobs/demo-lora``).
        overwrite: Replace an existing folder.
        require_pinned_base: Refuse a base model folder without ``model.base_sha256`` (``zenfed job
            export`` sets it: sites on other machines must be able to check they hold the same model).

    Returns:
        The job folder.

    Raises:
        JobError: If ``out`` exists and ``overwrite`` is false, or the base model is not pinned.
    """
    if require_pinned_base and spec.model.base != DEFAULT_BASE_MODEL and spec.model.base_sha256 is None:
        raise JobError(
            f"model.base {spec.model.base!r} is a folder, and the job does not pin its content; run "
            f"`zenfed models hash {spec.model.base}` and put the value under model: as base_sha256, so that "
            f"every site can check it trains the same model"
        )
    target = Path(out)
    if target.exists() and not overwrite:
        raise JobError(f"{target} already exists; remove it or pass --force to replace it")
    with staged_dir(target) as staging:
        for relative, content in job_configs(spec).items():
            path = staging / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(content, indent=2, sort_keys=False) + "\n")
    return target
