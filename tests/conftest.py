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
        for line in event_lines(path.read_text()):
            events.append(json.loads(line))
    return events


def spilled_lines(directory) -> list:
    """Every line of every spill file in ``directory``, headers left out, as written."""
    found = []
    for path in sorted(Path(directory).glob("spill-*.jsonl*")):
        raw = path.read_bytes().replace(b"\0", b"")
        found += [ln + b"\n" for ln in raw.split(b"\n")[1:] if ln]
    return found


def event_lines(text: str) -> list:
    """The event lines of a spill file's text: without the destination header, and with
    durable mode's compact lines (``~`` + base64 of a marshal, ``^`` + base64 of a struct) turned back into the JSON
    that a replay sends, by the SDK's own replay code, with the source from the header."""
    import argus

    source, lines = '{"project":"unknown"}', []
    for line in text.splitlines():
        if not line.strip():
            continue
        if line.startswith('{"argus_spill"'):
            try:
                header = json.loads(line)
            except ValueError:
                continue
            if isinstance(header.get("source"), dict):
                source = json.dumps(header["source"], separators=(",", ":"))
            continue
        if line.startswith(("~", "^")):
            line = argus._expand(line, source) or line
        lines.append(line)
    return lines


def dead_letters(directory) -> list:
    path = Path(directory) / "deadletter.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------
# scenario helpers (test_disk_buffer, test_lifecycle, test_values_and_answers)
# ---------------------------------------------------------------------------------------

# The end of every scenario child's prelude: QUIET settings and gate(), after its imports.
GATE_PRELUDE = """QUIET = dict(heartbeat=False, stop_polling=False, resource_snapshot=False)


def gate(name, timeout=60):
    # tell the test this phase is done, then wait until the test says go
    open(name + ".ready", "w").close()
    end = time.time() + timeout
    while not os.path.exists(name + ".go") and time.time() < end:
        time.sleep(0.005)


"""


def wait_until(predicate, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.01)
    return bool(predicate())


def on_disk(directory) -> dict:
    """event_id -> event of every event waiting in a spill directory.

    Tolerant: a file being written may end in half a line, and spill files may start with a
    header line (``"argus_spill"``: destination and token fingerprint) that is not an event.
    """
    found = {}
    for path in sorted(Path(directory).glob("*.jsonl*")) if Path(directory).is_dir() else []:
        if path.name.startswith(("deadletter", "pending-uploads")):
            continue
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:  # renamed or replayed meanwhile
            continue
        for line in event_lines(text):
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and "event_id" in event:
                found[event["event_id"]] = event
    return found


def everywhere(fake, directory) -> dict:
    """event_id -> event, delivered or waiting on disk (dead letters count as kept, too)."""
    found = on_disk(directory)
    for letter in dead_letters(directory) if Path(directory).is_dir() else []:
        if isinstance(letter.get("event"), dict):
            found[letter["event"]["event_id"]] = letter["event"]
    if fake is not None:
        with fake.lock:
            found.update(fake.events)
    return found


def epochs(events, job_id: str) -> list:
    """The sorted epochs of ``job_id``; ``events`` is a dict event_id -> event or a list of events."""
    return sorted(
        e["data"]["epoch"]
        for e in (events.values() if isinstance(events, dict) else events)
        if e["event_type"] == "job_epoch" and e["job_id"] == job_id
    )


def of_type(events, event_type: str, batch_id=None) -> list:
    return [
        e
        for e in events.values()
        if e["event_type"] == event_type and (batch_id is None or e["batch_id"] == batch_id)
    ]


def line(name: str, **figures) -> None:
    print("\n[%s] %s" % (name, " ".join("%s=%s" % kv for kv in figures.items())))


def write_png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n fake image bytes")
    return path


def hold_artifacts(fake, monkeypatch, store: bool = True, first=None):
    """Make the fake's first ``first`` uploads (all of them when None) wait for the returned
    ``release`` event; a held upload is then stored, or answered 503 unless ``store``.

    Returns ``(arrived, release)``: ``arrived`` is set once a held upload reached the server.
    """
    arrived, release = threading.Event(), threading.Event()
    handler = fake.server.RequestHandlerClass
    original = handler._artifact
    count = [0]

    def held(self, raw):
        count[0] += 1
        if first is not None and count[0] > first:
            return original(self, raw)
        arrived.set()
        release.wait(30)
        if store:
            return original(self, raw)
        return self._answer(503, {"detail": "gone"})

    monkeypatch.setattr(handler, "_artifact", held)
    return arrived, release


class Slowloris:
    """Reads a request, then answers one header byte every 0.2 s, forever."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = "http://127.0.0.1:%d" % self.sock.getsockname()[1]
        self.stop = threading.Event()
        self.accepted = 0
        self.open = 0
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        self.sock.settimeout(0.1)
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with self.lock:
                self.accepted += 1
                self.open += 1
            threading.Thread(target=self._trickle, args=(conn,), daemon=True).start()

    def _trickle(self, conn):
        try:
            conn.settimeout(0.2)
            try:
                conn.recv(65536)
            except socket.timeout:
                pass
            conn.sendall(b"HTTP/1.1 200 OK\r\n")
            while not self.stop.is_set():
                conn.sendall(b"X")
                try:  # a client that closed its end shows as EOF here
                    if conn.recv(65536) == b"":
                        break
                except socket.timeout:
                    pass
        except OSError:
            pass
        finally:
            conn.close()
            with self.lock:
                self.open -= 1

    def close(self):
        self.stop.set()
        self.sock.close()


@pytest.fixture
def slowloris():
    server = Slowloris()
    yield server
    server.close()


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


_HELD: list = []


def refused_url() -> str:
    """The URL of a server that is down: its port stays bound, never listened on, for as long as
    this test process lives, so every connection to it is refused. A port from ``free_port()``
    is free again at once, and the next server any test starts (the demo's collector, say) may
    take it; a "down" server that answers turns a spill test into a delivery test."""
    if not _HELD:
        held = socket.socket()
        held.bind(("127.0.0.1", 0))
        _HELD.append(held)
    return "http://127.0.0.1:%d" % _HELD[0].getsockname()[1]


def run_script(code: str, env: dict, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter that imports this checkout's argus.py."""
    full_env = dict(os.environ)
    full_env.update(env)
    full_env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-c", code], env=full_env, capture_output=True, text=True, timeout=timeout, **kwargs
    )
