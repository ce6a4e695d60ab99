"""Shared fixtures: an isolated environment, schema validation, and a fake Argus server.

``FakeArgus`` is a standard-library HTTP server that speaks the Argus ingest protocol and
can be told to misbehave (status codes, delays, hangs, per-event rejections). Every event it
receives is validated against ``tests/schema/event_v1.1.json``, kept in this repository.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jsonschema
import pytest

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_PATH = Path(__file__).resolve().parent / "schema" / "event_v1.1.json"
SCHEMA = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
_VALIDATOR = jsonschema.Draft7Validator(SCHEMA, format_checker=jsonschema.FormatChecker())
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
SERVER_TYPES = set(SCHEMA["properties"]["event_type"]["enum"])

sys.path.insert(0, str(ROOT))


_VALID_SHAPES = set()


def validate_event(event: dict) -> None:
    """Assert that ``event`` is what the Argus server accepts (schema 1.1 plus PROTOCOL.md).

    jsonschema is slow (~0.1 ms an event). Of the schema's rules, only `event_id`,
    `timestamp` and `data` differ between events of the same shape (type, ids, source, key
    set), and the regular expressions below are stricter than the schema for the first two;
    so a shape that passed jsonschema once is checked again by those alone.
    """
    assert TIMESTAMP.match(str(event.get("timestamp"))), event.get("timestamp")
    assert UUID4.match(str(event.get("event_id"))), event.get("event_id")
    assert isinstance(event.get("data", {}), dict), event
    shape = (
        event.get("event_type"),
        event.get("schema_version"),
        event.get("batch_id"),
        event.get("job_id"),
        json.dumps(event.get("source"), sort_keys=True),
        tuple(sorted(event)),
        tuple(sorted(event.get("data") or {})),
    )
    if shape in _VALID_SHAPES:
        return
    errors = sorted(_VALIDATOR.iter_errors(event), key=str)
    assert not errors, "invalid event %r: %s" % (event, [e.message for e in errors])
    assert None not in event["source"].values()
    if event["event_type"] in ("job_start", "job_epoch", "job_done", "job_failed", "log_line"):
        assert event.get("job_id"), "job event without job_id: %r" % event
    _VALID_SHAPES.add(shape)


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    """No ARGUS_* settings leak in; the spill store lives in the test's own folder."""
    for name in list(os.environ):
        if name.startswith("ARGUS_") or name in ("RANK", "SLURM_PROCID", "SLURM_JOB_ID"):
            monkeypatch.delenv(name, raising=False)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    spill = tmp_path / "spill"
    monkeypatch.setenv("ARGUS_SPILL_DIR", str(spill))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    yield spill
    import argus

    argus._spill_counts.clear()  # spills of in-process tests: no exit summary after pytest's
    argus._left_behind.clear()


@pytest.fixture
def spill_dir(isolated_env):
    return isolated_env


def spilled_events(directory) -> list:
    """Every event waiting in a spill directory (closed and open files)."""
    events = []
    for path in sorted(Path(directory).glob("*.jsonl*")):
        if path.name.startswith(("deadletter", "pending-uploads")):
            continue
        for line in path.read_text().splitlines():
            if line.strip() and not line.startswith('{"argus_spill"'):  # the destination header
                events.append(json.loads(line))
    return events


def dead_letters(directory) -> list:
    path = Path(directory) / "deadletter.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class FakeArgus:
    """A programmable Argus ingest server on 127.0.0.1.

    - ``events``: event_id -> event, every accepted event (validated on arrival).
    - ``requests``: (method, path, number of events) in arrival order.
    - ``script``: a list of actions consumed one per ingest request before normal handling:
      an int status (answered with ``{"detail": ...}``), ``("status", code, headers)``,
      ``("sleep", seconds)`` then normal handling, or ``"hang"`` (never answer).
    - ``reject``: a function event -> error string or None, for per-event rejections.
    - ``delay``: seconds to wait before answering every ingest request.
    - ``stop``: value of "requested" for the stop endpoint (None: 404).
    """

    def __init__(self):
        self.events = {}
        self.duplicates = 0
        self.requests = []
        self.script = []
        self.reject = None
        self.delay = 0.0
        self.stop = False
        self.stop_key = "requested"
        self.stop_script = []
        self.jobs_started = set()
        self.artifacts = []
        self.lock = threading.Lock()
        self._hang = threading.Event()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _answer(self, status, payload, headers=None):
                body = json.dumps(payload).encode()
                head = "HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d\r\n" % (
                    status,
                    len(body),
                )
                for k, v in (headers or {}).items():
                    head += "%s: %s\r\n" % (k, v)
                self.wfile.write(head.encode() + b"\r\n" + body)

            def do_GET(self):
                m = re.match(r"^/api/batches/([^/]+)/stop-requested$", self.path)
                if not m:
                    return self._answer(404, {"detail": "Not Found"})
                with fake.lock:
                    fake.requests.append(("GET", self.path, 0))
                    action = fake.stop_script.pop(0) if fake.stop_script else None
                if isinstance(action, int):
                    return self._answer(action, {"detail": "scripted"}, {"Retry-After": "0"})
                if fake.stop is None:
                    return self._answer(404, {"detail": "batch not found"})
                return self._answer(200, {fake.stop_key: fake.stop, "requested_at": None, "requested_by": None})

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                if "/artifacts" in self.path:
                    return self._artifact(raw)
                with fake.lock:
                    action = fake.script.pop(0) if fake.script else None
                if action == "hang":
                    fake._hang.wait(60)
                    return
                if isinstance(action, tuple) and action[0] == "sleep":
                    time.sleep(action[1])
                elif isinstance(action, tuple) and action[0] == "status":
                    with fake.lock:
                        fake.requests.append(("POST", self.path, -action[1]))
                    return self._answer(action[1], {"detail": "scripted"}, action[2])
                elif isinstance(action, int):
                    with fake.lock:
                        fake.requests.append(("POST", self.path, -action))
                    return self._answer(action, {"detail": "scripted %d" % action})
                if fake.delay:
                    time.sleep(fake.delay)
                body = json.loads(raw, parse_constant=_refuse_constant)
                if self.path == "/api/events":
                    with fake.lock:
                        fake.requests.append(("POST", self.path, 1))
                    error = fake.reject(body) if fake.reject else None
                    if error:
                        return self._answer(422, {"detail": error})
                    dedup = fake._store(body)
                    return self._answer(200, {"accepted": True, "event_id": 1, "deduplicated": dedup})
                if self.path == "/api/events/batch":
                    events = body["events"]
                    with fake.lock:
                        fake.requests.append(("POST", self.path, len(events)))
                    if not 1 <= len(events) <= 500:
                        return self._answer(422, {"detail": "batch must hold 1..500 events"})
                    results = []
                    for event in events:
                        error = fake.reject(event) if fake.reject else None
                        if error:
                            results.append(
                                {"event_id": event["event_id"], "status": "rejected", "db_id": None, "error": error}
                            )
                            continue
                        dedup = fake._store(event)
                        results.append(
                            {
                                "event_id": event["event_id"],
                                "status": "deduplicated" if dedup else "accepted",
                                "db_id": 1,
                                "error": None,
                            }
                        )
                    accepted = sum(r["status"] != "rejected" for r in results)
                    return self._answer(
                        200, {"accepted": accepted, "rejected": len(results) - accepted, "results": results}
                    )
                return self._answer(404, {"detail": "Not Found"})

            def _artifact(self, raw):
                m = re.match(r"^/api/(jobs|batches)/([^/]+)/artifacts$", self.path)
                if not m:
                    return self._answer(404, {"detail": "Not Found"})
                kind, ident = m.groups()
                if kind == "jobs" and ident not in fake.jobs_started:
                    return self._answer(404, {"detail": "job not found"})
                ctype = self.headers.get("Content-Type", "")
                filename = re.search(rb'filename="([^"]*)"', raw)
                with fake.lock:
                    fake.artifacts.append(
                        {
                            "kind": kind,
                            "id": ident,
                            "filename": filename.group(1).decode() if filename else None,
                            "bytes": len(raw),
                            "content_type": ctype,
                            "body": raw,
                        }
                    )
                return self._answer(201, {"id": len(fake.artifacts), "filename": filename and filename.group(1).decode()})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = "http://127.0.0.1:%d" % self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05})
        self._thread.daemon = True
        self._thread.start()

    def _store(self, event: dict) -> bool:
        validate_event(event)
        with self.lock:
            if event["event_id"] in self.events:
                self.duplicates += 1
                return True
            self.events[event["event_id"]] = event
            if event["event_type"] == "job_start":
                self.jobs_started.add(event["job_id"])
            return False

    def of_type(self, event_type: str) -> list:
        with self.lock:
            return [e for e in self.events.values() if e["event_type"] == event_type]

    def types(self) -> list:
        """Event types in timestamp order (ties keep arrival order)."""
        with self.lock:
            events = list(self.events.values())
        return [e["event_type"] for e in sorted(events, key=lambda e: e["timestamp"])]

    def wait_for(self, predicate, timeout: float = 10.0) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if predicate():
                return True
            time.sleep(0.01)
        return predicate()

    def close(self):
        self._hang.set()
        self.server.shutdown()
        self.server.server_close()


def _refuse_constant(name):
    raise ValueError("not strict JSON: %s" % name)


@pytest.fixture
def fake():
    server = FakeArgus()
    yield server
    server.close()


def serve_ingest(httpserver) -> str:
    """Make pytest-httpserver accept both ingest routes as Argus does; return its base URL."""
    from werkzeug.wrappers import Response

    def one(request):
        return Response(json.dumps({"accepted": True, "event_id": 1, "deduplicated": False}), 200)

    def batch(request):
        events = json.loads(request.get_data())["events"]
        results = [{"event_id": e["event_id"], "status": "accepted", "db_id": 1, "error": None} for e in events]
        return Response(json.dumps({"accepted": len(events), "rejected": 0, "results": results}), 200)

    httpserver.expect_request("/api/events", method="POST").respond_with_handler(one)
    httpserver.expect_request("/api/events/batch", method="POST").respond_with_handler(batch)
    return httpserver.url_for("/").rstrip("/")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_script(code: str, env: dict, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter that imports this checkout's argus.py."""
    full_env = dict(os.environ)
    full_env.update(env)
    full_env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-c", code], env=full_env, capture_output=True, text=True, timeout=timeout, **kwargs
    )
