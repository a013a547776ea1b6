"""A Docker API in front of the container engine that keeps each step's container until its status is read.

kfp's DockerRunner starts every step with ``auto_remove=True`` and only then reads the step's logs and
exit status. A step that ends first is already gone when its status is asked for: podman answers that
request with a 500 (kfp fails the run) and docker with a 404, which kfp takes for *success*, even for a
step that failed. Rather than replacing kfp's function, the runner points kfp at this proxy: it relays
the API byte for byte, except a container's creation, where it turns ``AutoRemove`` off and labels the
container with the run's token. The containers of the run are removed when the run ends.

The proxy speaks just enough HTTP/1.1 to find request boundaries on a kept-alive connection (a request
head, then ``Content-Length`` bytes); a chunked or upgraded request (``docker attach``, image builds) is
relayed untouched to the end of its connection. Responses are never parsed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import uuid
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

RUN_LABEL = "io.m2snet.local-run"  # label of the containers this proxy created: value = the run's token
MAX_HEAD_BYTES = 1 << 20
_BUFFER = 1 << 16


def _connect(url: str) -> socket.socket:
    """A socket to the engine's API at ``unix:///path`` or ``tcp://host:port`` (``http://`` alike)."""
    parts = urlsplit(url)
    if parts.scheme in ("unix", "http+unix"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(parts.path)
        return sock
    if parts.scheme in ("tcp", "http") and parts.hostname:
        return socket.create_connection((parts.hostname, parts.port or 2375))
    raise ValueError(f"unsupported Docker API URL {url!r} (unix:// or tcp://)")


def _read_head(reader: BinaryIO) -> bytes:
    """One request head (through its blank line); b"" at the end of the connection."""
    head = b""
    while True:
        line = reader.readline(MAX_HEAD_BYTES)
        if not line:
            return b""
        if not line.strip():  # the blank line ends a head; before one, it is a stray separator
            if head:
                return head + line
            continue
        head += line
        if len(head) > MAX_HEAD_BYTES:
            raise ValueError("request head too long")


def _headers(head: bytes) -> tuple[str, str, dict[str, str]]:
    """(method, path, lower-cased headers) of a request head."""
    lines = head.decode("latin-1").split("\r\n")
    method, path = (lines[0].split(" ") + ["", ""])[:2]
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return method, path, headers


def keep_until_read(head: bytes, body: bytes, token: str) -> tuple[bytes, bytes]:
    """A container-create request with AutoRemove off and the run's label; other requests unchanged."""
    method, path, _ = _headers(head)
    if method != "POST" or not urlsplit(path).path.endswith("/containers/create"):
        return head, body
    spec = json.loads(body or b"{}")
    spec.setdefault("HostConfig", {})["AutoRemove"] = False
    spec["Labels"] = {**(spec.get("Labels") or {}), RUN_LABEL: token}
    body = json.dumps(spec).encode()
    lines = [line for line in head.decode("latin-1").split("\r\n")[:-2]
             if not line.lower().startswith("content-length:")]
    return ("\r\n".join(lines + [f"Content-Length: {len(body)}", "", ""])).encode("latin-1"), body


def _pump(source: socket.socket, sink: socket.socket) -> None:
    """Copy until ``source`` ends, then end ``sink``'s writing side."""
    try:
        while data := source.recv(_BUFFER):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        try:
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass


class EngineProxy:
    """``with EngineProxy(engine_url) as url:`` a Docker API at ``url`` that keeps step containers (see module)."""

    def __init__(self, upstream: str):
        self.upstream = upstream
        self.token = uuid.uuid4().hex
        self._dir = Path(tempfile.mkdtemp(prefix="m2snet-api-"))  # short: unix socket paths are ~107 bytes
        self.url = f"unix://{self._dir / 'api.sock'}"
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()

    def __enter__(self) -> str:
        self._listener.bind(str(self._dir / "api.sock"))
        os.chmod(self._dir / "api.sock", 0o600)
        self._listener.listen(32)
        threading.Thread(target=self._accept, name="engine-proxy", daemon=True).start()
        return self.url

    def __exit__(self, *exc: object) -> None:
        self._listener.close()
        with self._lock:
            for sock in self._open:
                try:
                    sock.close()
                except OSError:
                    pass
        self.remove_containers()
        shutil.rmtree(self._dir, ignore_errors=True)

    def remove_containers(self) -> int:
        """Remove the containers created through this proxy (they are kept until their status was read)."""
        import docker

        client = docker.DockerClient(base_url=self.upstream, timeout=120)
        removed = 0
        try:
            for container in client.containers.list(all=True, filters={"label": f"{RUN_LABEL}={self.token}"}):
                try:
                    container.remove(force=True)
                    removed += 1
                except docker.errors.APIError as err:  # the run's result stands; say what is left behind
                    log.warning("could not remove step container %s: %s", container.short_id, err)
        finally:
            client.close()
        return removed

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:  # closed: the run ended
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            engine = _connect(self.upstream)
        except OSError as err:
            log.warning("engine API %s unreachable: %s", self.upstream, err)
            conn.close()
            return
        with self._lock:
            self._open.update((conn, engine))
        responses = threading.Thread(target=_pump, args=(engine, conn), daemon=True)
        responses.start()
        try:
            self._relay_requests(conn, engine)
        except (OSError, ValueError) as err:
            log.debug("engine proxy connection ended: %s", err)
        finally:
            try:
                engine.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            responses.join()
            with self._lock:
                self._open.difference_update((conn, engine))
            conn.close()
            engine.close()

    def _relay_requests(self, conn: socket.socket, engine: socket.socket) -> None:
        reader = conn.makefile("rb")
        while head := _read_head(reader):
            _, _, headers = _headers(head)
            if "chunked" in headers.get("transfer-encoding", "").lower() or "upgrade" in headers:
                engine.sendall(head)  # not one we rewrite: the rest of the connection goes through as it is
                while data := reader.read1(_BUFFER):
                    engine.sendall(data)
                return
            body = reader.read(int(headers.get("content-length") or 0))
            head, body = keep_until_read(head, body, self.token)
            engine.sendall(head + body)
