"""AMD SEV-SNP: reports from /dev/sev-guest through ``snpguest``, checked against AMD's keys.

Generation needs an SEV-SNP guest (``/dev/sev-guest``) and the ``snpguest``
tool. Verification needs ``snpguest`` and AMD's certificate chain (ARK and ASK
in ``certs_dir``, the chip's VCEK fetched from AMD's key server or cached).
Where any of it is missing the adapter fails closed and says what is missing.
"""

from __future__ import annotations

import base64
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from zenfed.attestation._tools import run_tool
from zenfed.attestation.base import HardwareReportTEE, report_data
from zenfed.attestation.records import AttestationUnavailable, EvidenceRejected

REPORT_SIZE = 0x4A0
_REPORT_DATA = slice(0x50, 0x90)
_MEASUREMENT = slice(0x90, 0xC0)
_POLICY = slice(0x08, 0x10)
_REPORTED_TCB = slice(0x180, 0x188)
_CHIP_ID = slice(0x1A0, 0x1E0)
_POLICY_DEBUG_BIT = 19


def parse_report(report: bytes) -> dict[str, Any]:
    """Read the fields zenfed checks from a raw SEV-SNP attestation report (1184 bytes)."""
    if len(report) != REPORT_SIZE:
        raise EvidenceRejected(f"an SEV-SNP report has {REPORT_SIZE} bytes, got {len(report)}")
    tcb = report[_REPORTED_TCB]
    policy = int.from_bytes(report[_POLICY], "little")
    return {
        "report_data": report[_REPORT_DATA],
        "measurement": report[_MEASUREMENT].hex(),
        "debug": bool(policy >> _POLICY_DEBUG_BIT & 1),
        "tcb": {"bootloader": tcb[0], "tee": tcb[1], "snp": tcb[6], "microcode": tcb[7]},
        "chip_id": report[_CHIP_ID].hex(),
    }


class SevSnpTEE(HardwareReportTEE):
    """AMD SEV-SNP guest attestation.

    Args:
        participant: This participant's name.
        snpguest: The ``snpguest`` executable (name on PATH or a path).
        certs_dir: Folder holding AMD's ``ark.pem`` and ``ask.pem``; fetched VCEKs are cached here.
        cpu_model: AMD product line for fetching certificates ("milan", "genoa", ...).
        fetch_certs: Fetch missing AMD certificates from AMD's key server (needs network).
        device: The SEV-SNP guest device.
        timeout_s: Seconds each tool call may take.
        clock: Returns the current time in seconds.

    """

    kind = "sev-snp"
    label = "SEV-SNP"
    report_field = "report"
    report_data_field = "REPORT_DATA"

    def __init__(
        self,
        *,
        participant: str,
        snpguest: str = "snpguest",
        certs_dir: str = "/opt/zenfed/amd-certs",
        cpu_model: str = "milan",
        fetch_certs: bool = True,
        device: str = "/dev/sev-guest",
        timeout_s: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(participant=participant, clock=clock)
        self._tool = snpguest
        self._certs = Path(certs_dir)
        self._cpu_model = cpu_model
        self._fetch = fetch_certs
        self._device = Path(device)
        self._timeout = timeout_s

    def _generate_body(self, *, nonce: str, issued_at: float) -> dict[str, Any]:
        if not self._device.exists():
            raise AttestationUnavailable(
                f"{self._device} is absent: this machine is not an AMD SEV-SNP guest "
                "(run the participant in an SEV-SNP confidential VM, or require another kind)"
            )
        tool = shutil.which(self._tool)
        if tool is None:
            raise AttestationUnavailable(
                f"{self._tool} is not installed; install snpguest (github.com/virtee/snpguest)"
            )
        with tempfile.TemporaryDirectory(prefix="zenfed-snp-") as tmp:
            request, report = Path(tmp, "request.bin"), Path(tmp, "report.bin")
            request.write_bytes(
                report_data(kind=self.kind, participant=self.participant, nonce=nonce)
            )
            try:
                run_tool(
                    [tool, "report", str(report), str(request)],
                    what="SEV-SNP report",
                    timeout_s=self._timeout,
                )
            except EvidenceRejected as err:
                raise AttestationUnavailable(str(err)) from None
            raw = report.read_bytes()
        return {"report": base64.b64encode(raw).decode()}

    def _parse(self, raw: bytes) -> dict[str, Any]:
        return parse_report(raw)

    def _verify_report(self, raw: bytes, fields: dict[str, Any]) -> None:
        tool = shutil.which(self._tool)
        if tool is None:
            raise EvidenceRejected(
                f"cannot verify SEV-SNP evidence here: {self._tool} is not installed on this "
                "verifier; install snpguest (github.com/virtee/snpguest)"
            )
        tcb = fields["tcb"]
        versions = "-".join(str(tcb[k]) for k in ("bootloader", "tee", "snp", "microcode"))
        cache = self._certs / "vcek" / f"{fields['chip_id']}-{versions}.pem"
        with tempfile.TemporaryDirectory(prefix="zenfed-snp-") as tmp:
            certs, report = Path(tmp, "certs"), Path(tmp, "report.bin")
            certs.mkdir()
            report.write_bytes(raw)
            self._ca_certs(tool, certs)
            if not cache.is_file():
                if not self._fetch:
                    raise EvidenceRejected(
                        f"no cached VCEK {cache} and fetching is off; place the chip's VCEK there"
                    )
                run_tool(
                    [tool, "fetch", "vcek", "pem", str(certs), str(report)],
                    what="fetching the AMD VCEK",
                    timeout_s=self._timeout,
                )
                cache.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(certs / "vcek.pem", cache)
            shutil.copy(cache, certs / "vcek.pem")
            run_tool(
                [tool, "verify", "attestation", str(certs), str(report)],
                what="verifying the SEV-SNP report signature",
                timeout_s=self._timeout,
            )

    def _ca_certs(self, tool: str, dest: Path) -> None:
        names = ("ark.pem", "ask.pem")
        if not all((self._certs / n).is_file() for n in names):
            if not self._fetch:
                raise EvidenceRejected(
                    f"AMD ark.pem/ask.pem are not in {self._certs} and fetching is off"
                )
            self._certs.mkdir(parents=True, exist_ok=True)
            run_tool(
                [tool, "fetch", "ca", "pem", str(self._certs), self._cpu_model],
                what="fetching AMD CA certificates",
                timeout_s=self._timeout,
            )
        for name in names:
            shutil.copy(self._certs / name, dest / name)
