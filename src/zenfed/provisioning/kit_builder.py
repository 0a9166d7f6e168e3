"""FLARE provisioning builder: zenfed's additions to every kit.

- Server and sites: ``local/resources.json`` whose class allow-list admits
  ``zenfed.`` (jobs carry no code, so FLARE builds zenfed's classes from the
  installed package) and, on the server, a job store and snapshot store inside
  the kit instead of ``/tmp/nvflare``; the component that ends and resumes
  the jobs a server crash interrupted (``zenfed.controllers.interrupted_jobs``)
  and the one that bounds the wait for a hung site after a job
  (``zenfed.controllers.site_outcomes``).
- Sites: ``local/zenfed_site.yaml``, the site policy, which site IT may edit,
  and zenfed's job launcher in ``resources.json``, so a site whose job process
  dies is dropped from the job instead of failing it
  (``zenfed.executors.site_launcher``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml
from nvflare.lighter.constants import CtxKey
from nvflare.lighter.ctx import ProvisionContext
from nvflare.lighter.entity import Project
from nvflare.lighter.spec import Builder

from zenfed.jobs.allow_list import ZENFED_PREFIX
from zenfed.site.policy import POLICY_FILE
from zenfed.spec import SitePolicy, parse_model

RESOURCES = "resources.json"
RESOURCES_DEFAULT = "resources.json.default"
SITE_LAUNCHER = "zenfed.executors.site_launcher.SiteJobLauncher"
# Server components zenfed adds to FLARE's server process (not to a job): id -> (class, default args).
SERVER_COMPONENTS: dict[str, tuple[str, dict[str, Any]]] = {
    "zenfed_interrupted_jobs": ("zenfed.controllers.interrupted_jobs.InterruptedJobRecovery", {"resume": True}),
    "zenfed_site_outcome_wait": ("zenfed.controllers.site_outcomes.SiteOutcomeWait", {"wait_s": 120}),
}
FLARE_SITE_LAUNCHER = "nvflare.app_common.job_launcher.client_process_launcher.ClientProcessJobLauncher"


class ZenfedKitBuilder(Builder):
    """Writes zenfed's resources and site policies into the kits ``nvflare provision`` builds."""

    def __init__(self, site_policies: dict[str, dict[str, Any]] | None = None):
        """Create the builder.

        Args:
            site_policies: Site name -> site policy data (see ``zenfed.spec.SitePolicy``).
        """
        self.site_policies = {
            name: parse_model(SitePolicy, data, kind="site policy", source=f"project, site {name}")
            for name, data in (site_policies or {}).items()
        }

    def build(self, project: Project, ctx: ProvisionContext) -> None:
        """Add zenfed's files to the server and every client kit."""
        server = project.get_server()
        if server is not None:
            kit = Path(ctx.get_ws_dir(server))
            self._write_resources(kit, server_stores=True, final_kit=self._final_kit_dir(ctx, server.name))
        for client in project.get_clients():
            kit = Path(ctx.get_ws_dir(client))
            self._write_resources(kit, server_stores=False, final_kit=None)
            policy = self.site_policies.get(client.name) or SitePolicy(site=client.name)
            text = yaml.safe_dump(policy.model_dump(mode="json"), sort_keys=False)
            path = kit / "local" / POLICY_FILE
            note = f"# zenfed site policy for {client.name}: edited by site IT, never leaves the site.\n"
            path.write_text(note + text)
            os.chmod(path, 0o600)

    @staticmethod
    def _final_kit_dir(ctx: ProvisionContext, name: str) -> Path:
        """Where a kit will live once the workspace builder moves ``wip`` to the next ``prod_NN``."""
        stage = int(ctx.get(CtxKey.LAST_PROD_STAGE, -1)) + 1
        return Path(ctx.get_workspace()).resolve() / f"prod_{stage:02d}" / name

    @staticmethod
    def _write_resources(kit: Path, *, server_stores: bool, final_kit: Path | None) -> None:
        local = kit / "local"
        default = local / RESOURCES_DEFAULT
        resources: dict[str, Any] = json.loads(default.read_text()) if default.is_file() else {}
        allow = list(resources.get("class_allow_list") or [])
        if ZENFED_PREFIX not in allow:
            allow.append(ZENFED_PREFIX)
        resources["class_allow_list"] = allow
        resources.setdefault("class_list_enforcement_mode", "enforce")
        if not server_stores:
            for component in resources.get("components", []):
                if component.get("path") == FLARE_SITE_LAUNCHER:
                    component["path"] = SITE_LAUNCHER
        if server_stores:
            components = resources.setdefault("components", [])
            present = {c.get("id") for c in components}
            for component_id, (path, args) in SERVER_COMPONENTS.items():
                if component_id not in present:
                    components.append({"id": component_id, "path": path, "args": dict(args)})
        if server_stores and final_kit is not None:
            root = final_kit
            for component in resources.get("components", []):
                if component.get("id") == "job_manager":
                    component.setdefault("args", {})["uri_root"] = str(root / "jobs-storage")
            snapshot = resources.get("snapshot_persistor", {}).get("args", {}).get("storage", {}).get("args")
            if isinstance(snapshot, dict):
                snapshot["root_dir"] = str(root / "snapshot-storage")
        local.mkdir(parents=True, exist_ok=True)
        (local / RESOURCES).write_text(json.dumps(resources, indent=2) + "\n")

