"""Intel TDX: quotes through the kernel's configfs-tsm, checked by a DCAP quote verifier.

Generation needs a TDX guest whose kernel exposes configfs-tsm
(``/sys/kernel/config/tsm/report``, Linux 6.7+). Verification needs a quote
verifier command (e.g. one built on Intel's DCAP Quote Verification Library)
that exits 0 when the quote's signature and collateral are good; zenfed then
reads the quote itself for the nonce binding, measurement, TCB and debug bit.
Without either it fails closed and says what is missing.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from zenfed.attestation._tools import run_tool
from zenfed.attestation.base import HardwareReportTEE, report_data
from zenfed.attestation.records import AttestationUnavailable, EvidenceRejected

HEADER_SIZE = 48
BODY_SIZE = 584
TEE_TYPE_TDX = 0x81
_TCB = slice(0, 16)
_TD_ATTRIBUTES = slice(120, 128)
_MRTD = slice(136, 184)
_RTMRS = slice(328, 520)
_REPORT_DATA = slice(520, 584)


def parse_quote(quote: bytes) -> dict[str, Any]:
    """Read the fields zenfed checks from a TDX quote (version 4 or 5 header + TD report body).

    The measurement is SHA-256(MRTD | RTMR0 | RTMR1 | RTMR2 | RTMR3): the TD's
    build-time image and its runtime-extended registers together.
    """
    if len(quote) < HEADER_SIZE + BODY_SIZE:
        raise EvidenceRejected(f"a TDX quote has at least {HEADER_SIZE + BODY_SIZE} bytes")
    version = int.from_bytes(quote[0:2], "little")
    tee_type = int.from_bytes(quote[4:8], "little")
    if version not in (4, 5) or tee_type != TEE_TYPE_TDX:
        raise EvidenceRejected(f"not a TDX quote (version {version}, TEE type {tee_type:#x})")
    body = quote[HEADER_SIZE : HEADER_SIZE + BODY_SIZE]
    return {
        "report_data": body[_REPORT_DATA],
        "measurement": hashlib.sha256(body[_MRTD] + body[_RTMRS]).hexdigest(),
        "debug": bool(body[_TD_ATTRIBUTES][0] & 1),
        "tcb": {f"tee_tcb_svn_{i}": b for i, b in enumerate(body[_TCB])},
    }


class TdxTEE(HardwareReportTEE):
    """Intel TDX guest attestation.

    Args:
        participant: This participant's name.
        tsm_dir: The configfs-tsm report folder.
        quote_verifier: Command that verifies a quote file, "{quote}" marking its path,
            e.g. ["/usr/local/bin/tdx-verify-quote", "{quote}"]; None means this
            participant cannot verify TDX evidence.
        timeout_s: Seconds the verifier command may take.
        clock: Returns the current time in seconds.

    """

    kind = "tdx"
    label = "TDX"
    report_field = "quote"
    report_data_field = "REPORTDATA"

    def __init__(
        self,
        *,
        participant: str,
        tsm_dir: str = "/sys/kernel/config/tsm/report",
        quote_verifier: Sequence[str] | None = None,
        timeout_s: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(participant=participant, clock=clock)
        self._tsm = Path(tsm_dir)
        self._verifier = list(quote_verifier) if quote_verifier else None
        self._timeout = timeout_s

    def _generate_body(self, *, nonce: str, issued_at: float) -> dict[str, Any]:
        if not self._tsm.is_dir():
            hint = (
                "/dev/tdx_guest exists but configfs-tsm is not mounted (mount configfs; "
                "Linux 6.7+ needed)"
                if Path("/dev/tdx_guest").exists()
                else "this machine is not an Intel TDX guest (run the participant in a TD)"
            )
            raise AttestationUnavailable(f"{self._tsm} is absent: {hint}")
        entry = self._tsm / f"zenfed-{secrets.token_hex(8)}"
        try:
            entry.mkdir()
            (entry / "inblob").write_bytes(
                report_data(kind=self.kind, participant=self.participant, nonce=nonce)
            )
            quote = (entry / "outblob").read_bytes()
            provider = (entry / "provider").read_text().strip()
        except OSError as err:
            raise AttestationUnavailable(
                f"reading a TDX quote from {entry} failed: {err}"
            ) from None
        finally:
            if entry.exists():
                os.rmdir(entry)
        if provider != "tdx_guest":
            raise AttestationUnavailable(f"configfs-tsm provider is {provider!r}, not 'tdx_guest'")
        return {"quote": base64.b64encode(quote).decode()}

    def _parse(self, raw: bytes) -> dict[str, Any]:
        return parse_quote(raw)

    def _verify_report(self, raw: bytes, fields: dict[str, Any]) -> None:
        if self._verifier is None:
            raise EvidenceRejected(
                "cannot verify TDX evidence here: no quote verifier is configured; set "
                "kind_settings.tdx.quote_verifier to a DCAP quote verification command"
            )
        with tempfile.TemporaryDirectory(prefix="zenfed-tdx-") as tmp:
            path = Path(tmp, "quote.bin")
            path.write_bytes(raw)
            cmd = [part.replace("{quote}", str(path)) for part in self._verifier]
            run_tool(cmd, what="verifying the TDX quote", timeout_s=self._timeout)
