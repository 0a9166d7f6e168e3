"""A cuttable network link between a site in its own network namespace and a server on this host's loopback.

The site runs in a namespace (``ip netns``) whose only interface is its own
loopback, so it can reach nothing directly. Its kit dials ``localhost:PORT``
as provisioned; inside the namespace a relay listens there and carries each
connection over a Unix socket (a file, which both namespaces see) to this
host, where :class:`HostEnd` dials the server's real ``127.0.0.1:PORT``. No
listener leaves loopback. :meth:`HostEnd.cut` then drops every byte in both
directions while the connections stay open: a pulled cable, not a refusal.

Run as a script, this file is the relay inside the namespace.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

_CHUNK = 1 << 16


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, cut: threading.Event | None) -> None:
    try:
        while data := await reader.read(_CHUNK):
            if cut is not None and cut.is_set():
                continue  # the cable is pulled: bytes vanish
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


class HostEnd:
    """This host's end of the link: Unix socket in, the server's loopback port out."""

    def __init__(self, unix_path: Path, port: int) -> None:
        """Serve ``unix_path``, forwarding each connection to ``127.0.0.1:port``."""
        self.unix_path, self.port = unix_path, port
        self._cut = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    def start(self) -> HostEnd:
        """Start serving in a background thread."""
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the host end of the link did not start")
        return self

    def cut(self) -> None:
        """Drop every byte from now on, both ways; connections stay open."""
        self._cut.set()

    def close(self) -> None:
        """Stop serving, close every connection and the loop."""
        if self._loop.is_closed():
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        self._loop.run_until_complete(asyncio.sleep(0))
        self._loop.close()
        with contextlib.suppress(FileNotFoundError):
            self.unix_path.unlink()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                writer.close()
                return
            self._writers |= {writer, up_writer}
            await asyncio.gather(_pipe(reader, up_writer, self._cut), _pipe(up_reader, writer, self._cut))

        self._server = self._loop.run_until_complete(asyncio.start_unix_server(connect, path=str(self.unix_path)))
        self._ready.set()
        self._loop.run_forever()


class Namespace:
    """A network namespace with its loopback up and the relay inside it."""

    def __init__(self, name: str, *, unix_path: Path, port: int) -> None:
        """Create namespace ``name`` and start the relay for ``port`` in it (by a PID kept here)."""
        self.name = name
        subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
        try:
            self.run(["ip", "link", "set", "lo", "up"])
        except subprocess.CalledProcessError:
            subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)
            raise
        self.relay = subprocess.Popen(
            ["ip", "netns", "exec", name, sys.executable, __file__, "--port", str(port), "--unix", str(unix_path)],
            start_new_session=True,
        )

    def run(self, argv: list[str]) -> None:
        """Run a command inside the namespace."""
        subprocess.run(["ip", "netns", "exec", self.name, *argv], check=True, capture_output=True)

    def close(self) -> None:
        """End the relay (by its PID) and delete the namespace."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.relay.pid, 9)
        self.relay.wait()
        subprocess.run(["ip", "netns", "del", self.name], check=False, capture_output=True)


def namespaces_usable() -> str | None:
    """None if this machine lets us make network namespaces, else why not."""
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    probe = f"zenfed-probe-{os.getpid()}-{int(time.time())}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` is not allowed here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _relay(port: int, unix_path: str) -> None:
    async def connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            host_reader, host_writer = await asyncio.open_unix_connection(unix_path)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pipe(reader, host_writer, None), _pipe(host_reader, writer, None))

    async def main() -> None:
        server = await asyncio.start_server(connect, "127.0.0.1", port)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--unix", required=True)
    args = parser.parse_args()
    _relay(args.port, args.unix)
