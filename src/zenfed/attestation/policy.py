"""Attestation policy: what each participant requires of its peers, from provisioning.

Provisioning writes one ``attestation.json`` into every kit's ``startup/``. It
says which TEE kinds this participant produces evidence for, which files are
part of its measured runtime configuration, and for every peer which kinds it
requires and which measurements and TCB versions it accepts.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from zenfed.attestation.records import AttestationError
from zenfed.spec import parse_model

POLICY_FORMAT = "zenfed-attestation-policy/1"
POLICY_FILE = "attestation.json"
KNOWN_KINDS = ("emulated", "sev-snp", "tdx", "nvidia-gpu")
_HEX = re.compile(r"^[0-9a-f]{32,128}$")


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_kinds(kinds: tuple[str, ...]) -> tuple[str, ...]:
    for kind in kinds:
        if kind not in KNOWN_KINDS:
            raise ValueError(f"unknown TEE kind {kind!r}; use one of {', '.join(KNOWN_KINDS)}")
    if len(set(kinds)) != len(kinds):
        raise ValueError("lists a kind twice; list each kind once")
    return kinds


class KindPolicy(_Frozen):
    """What a verifier accepts from one TEE kind of one peer."""

    allowed_measurements: tuple[str, ...] = Field(
        (), description="lower-case hex measurements accepted; none means nothing is accepted"
    )
    min_tcb: dict[str, int] = Field(
        default_factory=dict,
        description="TCB component -> minimum version, e.g. {snp: 8, microcode: 115}",
    )
    allow_debug: bool = Field(False, description="accept a TEE in debug mode (never in production)")
    max_evidence_age_s: float = Field(
        300.0, gt=0, description="evidence older than this many seconds is refused as expired"
    )

    @field_validator("allowed_measurements")
    @classmethod
    def _hex_measurements(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for item in value:
            if not _HEX.fullmatch(item):
                raise ValueError(f"{item!r} is not a lower-case hex measurement")
        return value


class PeerPolicy(_Frozen):
    """What this participant requires of one peer."""

    kinds: tuple[str, ...] = Field(min_length=1, description="TEE kinds the peer must prove")
    per_kind: dict[str, KindPolicy] = Field(default_factory=dict)

    @field_validator("kinds")
    @classmethod
    def _known_kinds(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return _check_kinds(value)

    @model_validator(mode="after")
    def _policy_for_each_kind(self) -> PeerPolicy:
        missing = [k for k in self.kinds if k not in self.per_kind]
        if missing:
            raise ValueError(f"no per_kind policy for required kind(s): {', '.join(missing)}")
        return self

    def for_kind(self, kind: str) -> KindPolicy:
        """Return the policy of ``kind``."""
        return self.per_kind[kind]


class AttestationPolicy(_Frozen):
    """One participant's attestation configuration (the ``attestation.json`` of its kit)."""

    format: Literal["zenfed-attestation-policy/1"] = "zenfed-attestation-policy/1"
    project: str = Field(min_length=1)
    participant: str = Field(min_length=1, description="this participant's provisioned name")
    kinds: tuple[str, ...] = Field((), description="TEE kinds this participant attests with")
    kind_settings: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="per-kind tool settings, e.g. sev-snp certs_dir"
    )
    measured_files: tuple[str, ...] = Field(
        (), description="runtime configuration files in the measurement, relative to the workspace"
    )
    nonce_ttl_s: float = Field(120.0, gt=0, description="seconds an issued nonce stays valid")
    peers: dict[str, PeerPolicy] = Field(default_factory=dict)

    @field_validator("kinds")
    @classmethod
    def _known_kinds(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return _check_kinds(value)

    @field_validator("measured_files")
    @classmethod
    def _relative(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for item in value:
            path = Path(item)
            if path.is_absolute() or ".." in path.parts:
                raise ValueError(f"{item!r} must be relative to the workspace, without '..'")
        return value

    def to_json(self) -> str:
        """Return the policy as indented JSON text."""
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"


def load_policy(path: str | Path) -> AttestationPolicy:
    """Load and validate an ``attestation.json``.

    Raises:
        AttestationError: If the file is missing or is not valid JSON.
        SpecError: If the content does not validate; the message names each bad field.

    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AttestationError(
            f"attestation policy {path} does not exist; provision the project with "
            "zenfed.provisioning.attestation_builder.AttestationBuilder"
        ) from None
    except json.JSONDecodeError as err:
        raise AttestationError(f"attestation policy {path} is not valid JSON: {err}") from None
    return parse_model(AttestationPolicy, data, kind="attestation policy", source=str(path))


__all__ = [
    "KNOWN_KINDS",
    "POLICY_FILE",
    "AttestationPolicy",
    "KindPolicy",
    "PeerPolicy",
    "load_policy",
]
