"""Why a kit cannot reach its server, told apart on real sockets and real TLS."""

from __future__ import annotations

import json
import socket
import ssl
import threading
from pathlib import Path

import pytest

from _pki import make_ca, make_kit
from zenfed.provisioning.link_check import diagnose_link


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _site_kit(root: Path, ca, port: int) -> Path:
    startup = make_kit(root, "site-1", ca)
    (startup / "fed_client.json").write_text(json.dumps({
        "servers": [{"service": {"target": f"localhost:{port}"}, "identity": "localhost"}],
        "client": {"ssl_root_cert": "rootCA.pem", "ssl_cert": "client.crt", "ssl_private_key": "client.key"},
    }))
    return startup.parent


class Listener:
    """A loopback listener that answers each connection with TLS (its own CA's certificate), bytes, or silence."""

    def __init__(self, root: Path, mode: str, ca=None) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.mode, self.context = mode, None
        if mode == "tls":
            startup = make_kit(root / "server-side", "localhost", ca, stem="server")
            self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.context.load_cert_chain(startup / "server.crt", startup / "server.key")
        self.held: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)
            if self.mode == "http":
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            elif self.mode == "tls":
                try:
                    self.context.wrap_socket(conn, server_side=True)
                except (OSError, ssl.SSLError):
                    pass

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


@pytest.fixture
def ours():
    return make_ca("our-project")


def test_nothing_listening_says_to_bring_the_deployment_up(tmp_path, ours):
    assert diagnose_link(_site_kit(tmp_path, ours, _free_port())).startswith("nothing answers at localhost:")


@pytest.mark.parametrize(("mode", "foreign", "expected"), [
    ("tls", True, "root CA did not issue: the kit belongs to another project"),
    ("tls", False, "answers with this project's certificate"),
    ("silent", False, "completes no TLS handshake in 1 s"),
    ("http", False, "does not speak TLS"),
])
def test_each_kind_of_server_is_named(tmp_path, ours, mode, foreign, expected):
    # Prepare
    listener = Listener(tmp_path, mode, make_ca("their-project") if foreign else ours)
    try:
        # Execute
        said = diagnose_link(_site_kit(tmp_path, ours, listener.port), timeout_s=1)
    finally:
        listener.close()

    # Assert
    assert expected in said, said


def test_a_kit_without_a_server_address_says_so(tmp_path, ours):
    startup = make_kit(tmp_path, "site-1", ours)  # its fed_client.json names the server but no address
    assert "names no server" in diagnose_link(startup.parent)
