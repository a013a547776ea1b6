"""The Docker API proxy the container runner puts in front of the engine (m2snet.kubeflow.engine_proxy).

Here against a real HTTP/1.1 server on a unix socket, as the engine's API is served: requests on one
kept-alive connection, a streamed (chunked) response, a container creation rewritten and nothing else.
The proxy with podman itself and kfp's own task function: tests/test_container.py (marker ``container``).
"""

from __future__ import annotations

import http.client
import json
import socket
import socketserver
import tempfile
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from m2snet.kubeflow.engine_proxy import RUN_LABEL, EngineProxy, keep_until_read


class _Engine(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str):
        self.seen: list[tuple[str, str, dict]] = []
        super().__init__(path, _Handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the engine's API

    def address_string(self) -> str:  # a unix socket has no client address
        return "unix"

    def log_message(self, *args) -> None:
        pass

    def _reply(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.seen.append(("POST", self.path, json.loads(body or b"{}")))
        self._reply(201 if self.path.endswith("/create") else 200, {"Id": "c1", "StatusCode": 3})

    def do_GET(self) -> None:  # a log stream: chunked, in pieces, as `logs?follow=1` answers
        self.server.seen.append(("GET", self.path, {}))
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for piece in (b"epoch 1\n", b"epoch 2\n" * 5000, b"done\n"):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str):
        super().__init__("localhost", timeout=30)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self._path)


@pytest.fixture()
def engine():
    with tempfile.TemporaryDirectory(prefix="m2snet-engine-") as tmp:
        server = _Engine(str(Path(tmp) / "engine.sock"))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            yield server
        finally:
            server.shutdown()
            server.server_close()


def test_the_proxy_keeps_created_containers_and_relays_everything_else(engine, monkeypatch):
    removed = []
    monkeypatch.setattr(EngineProxy, "remove_containers", lambda self: removed.append(self.token) or 0)
    create = {"Image": "img", "Cmd": ["sh"], "Labels": {"a": "b"},
              "HostConfig": {"AutoRemove": True, "NetworkMode": "host"}}
    with EngineProxy(f"unix://{engine.server_address}") as url:
        conn = _UnixConnection(url.removeprefix("unix://"))  # one kept-alive connection, as the docker SDK's
        conn.request("POST", "/v1.41/containers/create?name=step", body=json.dumps(create),
                     headers={"Content-Type": "application/json"})
        assert json.loads(conn.getresponse().read()) == {"Id": "c1", "StatusCode": 3}
        conn.request("GET", "/v1.41/containers/c1/logs?follow=1&stdout=1")
        assert conn.getresponse().read() == b"epoch 1\n" + b"epoch 2\n" * 5000 + b"done\n"
        conn.request("POST", "/v1.41/containers/c1/wait", body=json.dumps({"Condition": "not-running"}))
        assert json.loads(conn.getresponse().read())["StatusCode"] == 3
        conn.close()
    token = removed[0]
    (m1, p1, created), (m2, p2, _), (m3, p3, waited) = engine.seen
    assert (m1, p1) == ("POST", "/v1.41/containers/create?name=step")
    assert created == {**create, "Labels": {"a": "b", RUN_LABEL: token},
                       "HostConfig": {"AutoRemove": False, "NetworkMode": "host"}}
    assert (m2, p2) == ("GET", "/v1.41/containers/c1/logs?follow=1&stdout=1")
    assert (m3, p3, waited) == ("POST", "/v1.41/containers/c1/wait", {"Condition": "not-running"})
    assert not Path(url.removeprefix("unix://")).exists()  # the private socket is gone with the run


def test_only_a_container_creation_is_rewritten():
    head = b"POST /v1.41/containers/c1/start HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n"
    assert keep_until_read(head, b"{}", "t") == (head, b"{}")
    head = b"POST /containers/create HTTP/1.1\r\nContent-Length: 2\r\nHost: x\r\n\r\n"
    new_head, body = keep_until_read(head, b"{}", "t")
    assert json.loads(body) == {"HostConfig": {"AutoRemove": False}, "Labels": {RUN_LABEL: "t"}}
    assert new_head == f"POST /containers/create HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode()
