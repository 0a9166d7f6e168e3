"""FLARE provisioning builder: emulated-TEE keys and attestation policies in every kit.

Add it to ``project.yml`` after the builders that write the measured
configuration files and before ``SignatureBuilder`` (so the new files are signed)::

    - path: zenfed.provisioning.attestation_builder.AttestationBuilder
      args:
        kinds: {default: [emulated]}          # or per participant: {site-1: [sev-snp]}
        measured_files: [local/zenfed_site.yaml]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from nvflare.lighter.constants import ParticipantType
from nvflare.lighter.ctx import ProvisionContext
from nvflare.lighter.entity import Participant, Project
from nvflare.lighter.spec import Builder

from zenfed.attestation.identity import AttestationRoot
from zenfed.attestation.kits import KitPlan, build_policies, write_kit
from zenfed.attestation.measure import combine, config_digest, package_digest
from zenfed.attestation.policy import KNOWN_KINDS
from zenfed.errors import SpecError

ROOT_KEY_STATE = "zenfed_attestation_root.key"
ROOT_CERT_STATE = "zenfed_attestation_root.pem"


class AttestationBuilder(Builder):
    """Issue attestation keys and write each participant's attestation policy.

    Args:
        kinds: Participant name (or "default") -> TEE kinds it must prove.
            Kinds: emulated, sev-snp, tdx, nvidia-gpu. An empty list exempts a participant.
        measured_files: Runtime configuration files (relative to a kit's root) in the
            emulated measurement; files a kit lacks at build time are left out of its list.
        accepted_measurements: Participant -> kind -> extra accepted measurements (hardware
            kinds need these: the launch measurement of the approved VM image).
        kind_settings: Kind -> tool settings written into every kit (e.g. sev-snp certs_dir).
        min_tcb: Kind -> TCB component -> minimum version.
        allow_debug: Accept TEEs in debug mode (development only).
        max_evidence_age_s: Evidence older than this is refused.
        nonce_ttl_s: Seconds an issued nonce stays valid.
        package_dir: Package folder whose digest sites must match; the installed zenfed if None.
        cert_valid_days: Validity of each participant's attestation certificate.

    """

    def __init__(
        self,
        kinds: Mapping[str, Sequence[str]] | None = None,
        measured_files: Sequence[str] = ("local/zenfed_site.yaml",),
        accepted_measurements: Mapping[str, Mapping[str, Sequence[str]]] | None = None,
        kind_settings: Mapping[str, Mapping[str, Any]] | None = None,
        min_tcb: Mapping[str, Mapping[str, int]] | None = None,
        allow_debug: bool = False,
        max_evidence_age_s: float = 300.0,
        nonce_ttl_s: float = 120.0,
        package_dir: str | None = None,
        cert_valid_days: int = 825,
    ) -> None:
        self.kinds = {k: tuple(v) for k, v in (kinds or {"default": ["emulated"]}).items()}
        for name, listed in self.kinds.items():
            unknown = [k for k in listed if k not in KNOWN_KINDS]
            if unknown:
                raise SpecError(
                    f"AttestationBuilder kinds.{name} lists unknown kind(s) {unknown}; "
                    f"use {', '.join(KNOWN_KINDS)}"
                )
        self.measured_files = tuple(measured_files)
        self.accepted = accepted_measurements or {}
        self.kind_settings = kind_settings or {}
        self.min_tcb = min_tcb or {}
        self.allow_debug = allow_debug
        self.max_evidence_age_s = max_evidence_age_s
        self.nonce_ttl_s = nonce_ttl_s
        self.package_dir = Path(package_dir) if package_dir else None
        self.cert_valid_days = cert_valid_days

    def build(self, project: Project, ctx: ProvisionContext) -> None:
        """Write keys, certificates and policies into the server's and clients' kits."""
        root = self._root(project, ctx)
        package = package_digest(package_dir=self.package_dir)
        participants = self._participants(project)
        plans = [self._plan(p, ctx, package) for p in participants]
        policies = build_policies(
            project=project.name,
            plans=plans,
            kind_settings=self.kind_settings,
            min_tcb=self.min_tcb,
            allow_debug=self.allow_debug,
            max_evidence_age_s=self.max_evidence_age_s,
            nonce_ttl_s=self.nonce_ttl_s,
        )
        for participant, plan in zip(participants, plans, strict=True):
            identity = None
            if "emulated" in plan.kinds:
                identity = root.issue(participant=plan.name, valid_days=self.cert_valid_days)
            write_kit(
                startup_dir=Path(ctx.get_kit_dir(participant)),
                policy=policies[plan.name],
                root_cert_pem=root.cert_pem(),
                identity=identity,
            )
        ctx.info(f"attestation: wrote keys and policies for {len(plans)} participants")

    @staticmethod
    def _participants(project: Project) -> list[Participant]:
        server = project.get_server()
        return ([server] if server else []) + list(project.get_clients())

    def _plan(self, participant: Participant, ctx: ProvisionContext, package: str) -> KitPlan:
        name = participant.name
        kinds = self.kinds.get(name, self.kinds.get("default", ()))
        workspace = Path(ctx.get_ws_dir(participant))
        present = tuple(f for f in self.measured_files if (workspace / f).is_file())
        missing = sorted(set(self.measured_files) - set(present))
        if missing and participant.type == ParticipantType.CLIENT:
            ctx.warning(f"attestation: {name} has no {', '.join(missing)}; not measured")
        accepted = {k: tuple(v) for k, v in self.accepted.get(name, {}).items()}
        if "emulated" in kinds:
            config = config_digest(workspace_dir=workspace, files=present)
            expected = combine(package=package, config=config).value
            accepted["emulated"] = (expected, *accepted.get("emulated", ()))
        return KitPlan(name=name, kinds=tuple(kinds), measured_files=present, accepted=accepted)

    def _root(self, project: Project, ctx: ProvisionContext) -> AttestationRoot:
        """Reuse the project's attestation root from the provisioning state, or create it."""
        state = Path(ctx.get_state_dir())
        key_path, cert_path = state / ROOT_KEY_STATE, state / ROOT_CERT_STATE
        if key_path.is_file() and cert_path.is_file():
            return AttestationRoot.load(key_path=key_path, cert_path=cert_path)
        root = AttestationRoot.create(project=project.name)
        state.mkdir(parents=True, exist_ok=True)
        root.save(key_path=key_path, cert_path=cert_path)
        return root
