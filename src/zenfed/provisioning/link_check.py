"""Why a kit cannot reach its server: nothing listening, or a server of another project.

Used when an admin session or a site does not connect: it dials the server
address the kit names and tries the TLS handshake with the kit's root CA, as
FLARE does, to tell the cases apart in one line.
"""

from __future__ import annotations

import json
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class KitLink:
    """Where a kit dials its server, and the files it proves and checks identities with."""

    host: str
    port: int
    identity: str
    root_ca: Path
    cert: Path
    key: Path


def kit_link(kit: Path) -> KitLink:
    """Read where an admin or site kit dials its server.

    Raises:
        ValueError: If the kit's startup files do not name a server.
    """
    startup = kit / "startup"
    admin_file, site_file = startup / "fed_admin.json", startup / "fed_client.json"
    try:
        if admin_file.is_file():
            admin = json.loads(admin_file.read_text())["admin"]
            return KitLink(str(admin["host"]), int(admin["port"]), str(admin.get("server_identity") or admin["host"]),
                           startup / str(admin.get("ca_cert", "rootCA.pem")),
                           startup / str(admin.get("client_cert", "client.crt")),
                           startup / str(admin.get("client_key", "client.key")))
        config = json.loads(site_file.read_text())
        server, client = config["servers"][0], config["client"]
        host, _, port = str(server["service"]["target"]).rpartition(":")
        return KitLink(host, int(port), str(server.get("identity") or host),
                       startup / str(client.get("ssl_root_cert", "rootCA.pem")),
                       startup / str(client.get("ssl_cert", "client.crt")),
                       startup / str(client.get("ssl_private_key", "client.key")))
    except (OSError, KeyError, IndexError, TypeError, ValueError) as err:
        raise ValueError(f"{kit}/startup names no server ({type(err).__name__}: {err})") from None


# OpenSSL verify codes: the server's chain does not lead to this kit's root CA.
_FOREIGN_CA = {2, 19, 20, 21, 30}
# ... or its certificate is outside its validity window (often a clock behind or ahead).
_NOT_VALID_NOW = {9, 10}


def diagnose_link(kit: Path, *, timeout_s: float = 5.0) -> str:
    """Say, in one clause, why ``kit`` (an admin or site kit) cannot reach its server.

    Checks the server's certificate against the kit's root CA as FLARE does (no host name check);
    a server is said to be this project's only once its certificate verified.
    """
    try:
        link = kit_link(kit)
    except ValueError as err:
        return f"{err}; provision the kit again"
    where = f"{link.host}:{link.port}"
    try:
        raw = socket.create_connection((link.host, link.port), timeout=timeout_s)
    except OSError:
        return f"nothing answers at {where}; is the deployment up (`zenfed up WS`)?"
    context = ssl.create_default_context(cafile=str(link.root_ca))
    context.check_hostname = False  # FLARE checks the chain, not the name
    try:
        context.load_cert_chain(str(link.cert), str(link.key))  # mutual TLS, as the kit's own client
    except (OSError, ssl.SSLError) as err:
        raw.close()
        return f"the kit's certificate or key cannot be loaded ({err}); provision the kit again"
    try:
        with context.wrap_socket(raw, server_hostname=link.identity):
            return f"the server at {where} answers with this project's certificate; see the server's log.txt"
    except ssl.SSLCertVerificationError as err:
        code = getattr(err, "verify_code", None)
        if code in _FOREIGN_CA:
            return (f"the server at {where} presents a certificate that this kit's root CA did not issue: the kit "
                    "belongs to another project, or the server was provisioned again; use a kit from the server's "
                    "own provisioning")
        if code in _NOT_VALID_NOW:
            return (f"the server's certificate at {where} is not valid at this machine's time "
                    f"({getattr(err, 'verify_message', err)}); check both machines' clocks")
        return f"the server's certificate at {where} was refused: {getattr(err, 'verify_message', err)}"
    except TimeoutError:
        return f"{where} accepts connections but completes no TLS handshake in {timeout_s:.0f} s (hung or cut off)"
    except ssl.SSLError as err:
        return f"{where} does not speak TLS as a zenfed server does ({err.reason or err}); is the port right?"
    except OSError as err:
        return f"the connection to {where} failed during the TLS handshake ({err})"
    finally:
        raw.close()
