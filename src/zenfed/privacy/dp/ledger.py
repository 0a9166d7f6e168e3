"""A site's privacy budget ledger: a signed JSON file that the site alone keeps.

The ledger records, per (dataset, job, round), the job's cumulative epsilon
after that round. A job's spend is its largest cumulative epsilon; a dataset's
lifetime spend is the sum over its jobs (basic composition across jobs, which
holds whatever mechanisms the jobs used). The file is signed with the site's
private key (``startup/client.key`` of its FLARE kit), rewritten atomically,
kept at mode 0600, and checked on every read: an edited file raises
:class:`LedgerTamperedError`. It is never sent to the server.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import fcntl
import json
import math
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

from zenfed import signing
from zenfed.atomic import atomic_write_bytes
from zenfed.digest import CanonicalJSONError, canonical_json, sha256_hex
from zenfed.privacy.dp.budget import TOLERANCE, BudgetDecision, decide_budget
from zenfed.privacy.dp.errors import LedgerError, LedgerTamperedError

LEDGER_FORMAT = "zenfed-privacy-ledger/1"
_SIGNATURE_ALGORITHM = "RSA-PSS-SHA256"


@dataclass(frozen=True)
class SpendRecord:
    """One round's spend: the job's cumulative epsilon on a dataset after ``round``."""

    dataset: str
    job: str
    round: int
    epsilon: float
    delta: float
    level: str
    recorded_at: str
    accountant: dict[str, Any] | None = None


def _load_private_key(path: Path) -> rsa.RSAPrivateKey:
    try:
        return signing.load_private_key(path, kinds=(rsa.RSAPrivateKey,))
    except signing.SigningKeyError as err:
        raise LedgerError(
            f"cannot use the site's signing key: {err}; the ledger needs the kit's RSA "
            "startup/client.key"
        ) from None


class PrivacyLedger:
    """The signed record of a site's privacy spend.

    Args:
        path: the ledger file; created on the first record.
        signing_key_path: the site's RSA private key (PEM), e.g. ``startup/client.key``.
        certificate_path: optional certificate (``startup/client.crt``) that must match the key.

    Raises:
        LedgerError: If the key cannot be used or does not match the certificate.
        LedgerTamperedError: If the existing file fails its signature check.

    """

    def __init__(
        self,
        path: str | Path,
        *,
        signing_key_path: str | Path,
        certificate_path: str | Path | None = None,
    ) -> None:
        self.path = Path(path)
        self._key = _load_private_key(Path(signing_key_path))
        self.key_id = sha256_hex(signing.public_der(self._key))
        if certificate_path is not None:
            cert = x509.load_pem_x509_certificate(Path(certificate_path).read_bytes())
            if not signing.keys_match(self._key, cert):
                raise LedgerError(
                    f"the key {signing_key_path} does not match the certificate "
                    f"{certificate_path}; use the client.key and client.crt of the same kit"
                )
        self._lock_path = self.path.with_name(self.path.name + ".lock")
        self._read()  # fail early on a tampered or foreign ledger

    # -- file handling -------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _sign(self, body: dict[str, Any]) -> str:
        signature = signing.sign(self._key, signing.RSA_PSS_MAX_SALT, canonical_json(body))
        return base64.b64encode(signature).decode("ascii")

    def _read(self) -> dict[str, Any]:
        if not self.path.exists():
            return {"format": LEDGER_FORMAT, "sequence": 0, "entries": []}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            signature = data.pop("signature")
            value = base64.b64decode(signature["value"], validate=True)
            key_id = signature["key_id"]
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise LedgerTamperedError(
                f"privacy ledger {self.path} is not a signed ledger ({err}); it was corrupted or "
                "edited. Restore it from a backup; never reset it, or the site loses track of spend"
            ) from None
        if key_id != self.key_id:
            raise LedgerError(
                f"privacy ledger {self.path} was signed by another key ({key_id[:16]}...); "
                "open it with the key of the site that owns it"
            )
        try:
            genuine = signing.verify(
                self._key.public_key(), signing.RSA_PSS_MAX_SALT, canonical_json(data), value
            )
        except CanonicalJSONError:
            genuine = False  # NaN or infinity: never in a body this class signed
        if not genuine:
            raise LedgerTamperedError(
                f"privacy ledger {self.path} does not match its signature: it was edited. "
                "Restore it from a backup and investigate; never reset it"
            ) from None
        if data.get("format") != LEDGER_FORMAT or not isinstance(data.get("entries"), list):
            raise LedgerError(
                f"privacy ledger {self.path} has an unknown format {data.get('format')!r}"
            )
        return data

    def _write(self, body: dict[str, Any]) -> None:
        signed = dict(
            body,
            signature={
                "algorithm": _SIGNATURE_ALGORITHM,
                "key_id": self.key_id,
                "value": self._sign(body),
            },
        )
        text = json.dumps(signed, indent=1, sort_keys=True)
        atomic_write_bytes(self.path, text.encode("utf-8"), mode=0o600)

    # -- queries -------------------------------------------------------------------------

    def records(self, *, dataset: str | None = None, job: str | None = None) -> list[SpendRecord]:
        """Return the recorded spends, oldest first, optionally for one dataset and job."""
        entries = [SpendRecord(**e) for e in self._read()["entries"]]
        return [
            r
            for r in entries
            if (dataset is None or r.dataset == dataset) and (job is None or r.job == job)
        ]

    @staticmethod
    def _job_totals(entries: list[SpendRecord]) -> dict[str, float]:
        totals: dict[str, float] = {}
        for r in entries:
            totals[r.job] = max(totals.get(r.job, 0.0), r.epsilon)
        return totals

    def job_spent(self, *, dataset: str, job: str) -> float:
        """Return the epsilon ``job`` has spent on ``dataset`` so far (its largest cumulative)."""
        return max((r.epsilon for r in self.records(dataset=dataset, job=job)), default=0.0)

    def spent(self, *, dataset: str) -> float:
        """Return the lifetime epsilon spent on ``dataset``: the sum over its jobs."""
        return sum(self._job_totals(self.records(dataset=dataset)).values())

    def accountant_state(self, *, dataset: str, job: str) -> dict[str, Any] | None:
        """Return the last accountant state stored for ``job`` (to resume after a restart)."""
        for r in reversed(self.records(dataset=dataset, job=job)):
            if r.accountant is not None:
                return r.accountant
        return None

    def head_hash(self) -> str:
        """Return the SHA-256 of the signed ledger body, for the audit log to anchor."""
        return sha256_hex(canonical_json(self._read()))

    # -- spending ------------------------------------------------------------------------

    def record_spend(
        self,
        *,
        dataset: str,
        job: str,
        round: int,
        epsilon: float,
        delta: float,
        level: str = "record",
        accountant_state: dict[str, Any] | None = None,
    ) -> SpendRecord:
        """Record the job's cumulative epsilon after ``round``; call it before the update leaves.

        Raises:
            LedgerError: If a value is invalid or the cumulative epsilon went down (an
                accountant was reset: restore it with :meth:`accountant_state`).

        """
        if not (math.isfinite(epsilon) and epsilon >= 0 and 0 <= delta < 1):
            raise LedgerError(
                f"epsilon must be finite >= 0 and delta in [0, 1), got {epsilon}, {delta}"
            )
        if int(round) != round or round < 0:
            raise LedgerError(f"round must be an integer >= 0, got {round!r}")
        record = SpendRecord(
            dataset=dataset,
            job=job,
            round=int(round),
            epsilon=float(epsilon),
            delta=float(delta),
            level=level,
            recorded_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            accountant=json.loads(json.dumps(accountant_state)) if accountant_state else None,
        )
        with self._locked():
            body = self._read()
            previous = max(
                (
                    e["epsilon"]
                    for e in body["entries"]
                    if e["dataset"] == dataset and e["job"] == job
                ),
                default=0.0,
            )
            if epsilon + TOLERANCE < previous:
                raise LedgerError(
                    f"job {job!r} on dataset {dataset!r} already spent epsilon={previous:.4f}, "
                    f"but round {round} reports a cumulative {epsilon:.4f}: its accountant was "
                    "reset. Restore it from PrivacyLedger.accountant_state() before training"
                )
            body["entries"].append(asdict(record))
            body["sequence"] = int(body.get("sequence", 0)) + 1
            self._write(body)
        return record

    # -- budget checks -------------------------------------------------------------------

    def _decide(self, *, dataset: str, job: str | None, **kwargs: Any) -> BudgetDecision:
        totals = self._job_totals(self.records(dataset=dataset))
        return decide_budget(job_totals=totals, dataset=dataset, job=job, **kwargs)

    def check_job(
        self,
        *,
        planned_epsilon: float,
        max_epsilon_per_job: float | None,
        lifetime_budget: float | None,
        dataset: str,
        job: str | None = None,
    ) -> BudgetDecision:
        """Decide, before training, whether a job planned to spend ``planned_epsilon`` may run.

        Limits of None mean "no limit". If ``job`` already spent (a restart), the
        larger of its spend and its plan counts.
        """
        return self._decide(
            dataset=dataset,
            job=job,
            job_epsilon=planned_epsilon,
            max_epsilon_per_job=max_epsilon_per_job,
            lifetime_budget=lifetime_budget,
            what=f"job {job!r}" if job else "the job",
        )

    def can_spend(
        self,
        *,
        dataset: str,
        job: str,
        epsilon_after: float,
        max_epsilon_per_job: float | None,
        lifetime_budget: float | None,
    ) -> BudgetDecision:
        """Decide, before a round, whether the job may reach cumulative ``epsilon_after``.

        A refusal means the site must stop contributing to this job (and say so).
        """
        return self._decide(
            dataset=dataset,
            job=job,
            job_epsilon=epsilon_after,
            max_epsilon_per_job=max_epsilon_per_job,
            lifetime_budget=lifetime_budget,
            what=f"the next round of job {job!r}",
        )
