"""FLARE's ``CCAuthorizer`` seam, backed by zenfed's attestation core.

Configure it as a component in the kit's ``local/resources.json`` and name it in
``CCManager``'s ``cc_issuers_conf`` and ``cc_verifier_ids``::

    {"id": "zenfed_cc", "path": "zenfed.executors.cc_authorizer.ZenfedCCAuthorizer",
     "args": {"kind": "emulated"}}

FLARE's flow has no verifier nonce: the attester picks one, so freshness here
rests on the evidence's signed age (at most the policy's nonce TTL) and a replay
window. The per-job gate uses ``AttestationService.issue_nonce``/``verify_peer``
for nonce-bound checks; this adapter is the registration-time and periodic check.
"""

from __future__ import annotations

import base64
import binascii
import collections
import os
import threading
from pathlib import Path
from typing import Any

from nvflare.apis.event_type import EventType
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_opt.confidential_computing.cc_authorizer import CCAuthorizer

from zenfed.attestation import AttestationError, AttestationService
from zenfed.attestation.policy import KNOWN_KINDS

WORKSPACE_ENV = "ZENFED_WORKSPACE"
NAMESPACE_PREFIX = "x-zenfed-"


class ZenfedCCAuthorizer(CCAuthorizer, FLComponent):
    """A ``CCAuthorizer`` for one zenfed TEE kind; fails closed whenever it cannot check.

    Args:
        kind: TEE kind this authorizer generates and verifies (e.g. "emulated").
        workspace_dir: The participant's kit root; if "", the workspace FLARE reports at
            system bootstrap, else the ``ZENFED_WORKSPACE`` environment variable.
        max_records: Most recent verification records kept for ``records()``.
        package_dir: Package folder to measure; "" for the installed zenfed.

    """

    def __init__(
        self,
        kind: str = "emulated",
        workspace_dir: str = "",
        max_records: int = 1000,
        package_dir: str = "",
    ):
        FLComponent.__init__(self)
        if kind not in KNOWN_KINDS:
            raise AttestationError(
                f"unknown TEE kind {kind!r}; use one of {', '.join(KNOWN_KINDS)}"
            )
        self.kind = kind
        self._workspace = workspace_dir
        self._package_dir = Path(package_dir) if package_dir else None
        self._service: AttestationService | None = None
        self._records: collections.deque[dict[str, Any]] = collections.deque(maxlen=max_records)
        self._lock = threading.Lock()

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        """Learn the workspace root at system bootstrap, if it was not given."""
        if event_type == EventType.SYSTEM_BOOTSTRAP and not self._workspace:
            root = fl_ctx.get_prop(FLContextKey.WORKSPACE_ROOT)
            if root:
                self._workspace = str(root)

    def get_namespace(self) -> str:
        """Return ``x-zenfed-<kind>``: CCManager routes tokens to verifiers by namespace."""
        return NAMESPACE_PREFIX + self.kind

    def generate(self) -> str:
        """Return this participant's evidence (base64 JSON) under a self-picked nonce.

        Returns "" when no evidence can be produced (FLARE treats it as a failed token).
        """
        try:
            evidence = self._get_service().unsolicited_evidence()
        except AttestationError as err:
            self.logger.error(f"zenfed attestation: cannot generate {self.kind} evidence: {err}")
            return ""
        return base64.b64encode(evidence).decode("ascii")

    def verify(self, token: str) -> bool:
        """Verify a peer's token against this participant's policy; False on any doubt."""
        try:
            service = self._get_service()
            raw = base64.b64decode(token, validate=True)
        except AttestationError as err:
            self.logger.error(f"zenfed attestation: cannot verify: {err}")
            return False
        except (binascii.Error, ValueError, TypeError):
            self.logger.error("zenfed attestation: token is not base64 evidence")
            return False
        record = service.verify_unsolicited(raw)
        with self._lock:
            self._records.append(record.to_dict())
        log = self.logger.info if record.passed else self.logger.error
        log(f"zenfed attestation: {record.to_json()}")
        return record.passed and self.kind in record.kind.split("+")

    def records(self) -> list[dict[str, Any]]:
        """Return the recent verification records (audit-log dicts), oldest first."""
        with self._lock:
            return list(self._records)

    def _get_service(self) -> AttestationService:
        with self._lock:
            if self._service is None:
                workspace = self._workspace or os.environ.get(WORKSPACE_ENV, "")
                if not workspace:
                    raise AttestationError(
                        f"the kit's workspace is unknown; pass workspace_dir or set {WORKSPACE_ENV}"
                    )
                self._service = AttestationService.from_workspace(
                    Path(workspace), package_dir=self._package_dir
                )
            return self._service
