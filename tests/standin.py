"""A stand-in Argus server that is slow in the ways the real one is, and the client harness
that drives real SDK processes against it.

The tests' ``FakeArgus`` (conftest.py) answers at once. The real Argus server (FastAPI on
SQLite, measured under load on loopback) does not, and delivery has to be measured against
what it really does:

- it commits every event on its own, one writer at a time: about 7 ms an event, ~140
  events/s in total whatever the batch size, and a duplicate costs its check too;
- it finishes a request even after the client gave up on it;
- it rate-limits per token: a bucket of 60 requests refilled at 10/s, across all routes,
  beyond which it answers ``429 {"detail": "Rate limit exceeded"}`` with ``Retry-After``;
- several waiting writers sometimes get ``500 {"detail": "database is locked"}``;
- uvicorn closes a keep-alive connection after 5 s without a request.

Each of these is a constructor option of :class:`StandIn`. The stand-in records every
request (time, route, token, events, status, whether the client had gone by the time the
answer was ready) and every event id (when first stored, how many times processed), and
checks every event it stores against ``tests/schema/event_v1.1.json``.

The file has three parts, used by tests/test_real_server.py and benchmarks/bench_real.py:

1. ``StandIn``: the server (standard library; jsonschema is used when importable).
2. ``client_main``: what runs *inside* a client process (``python standin.py client``).
   It imports nothing but the standard library and ``argus``, so it runs under our
   checkout (PYTHONPATH=repo root) and under the upstream client's own interpreter alike.
3. ``launch_clients`` / ``account`` / ``scenario_*``: start client processes, read back
   what they spilled, and turn the server's records into the figures of issue 11.

Run ``python tests/standin.py serve --help`` for a standalone server.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SCHEMA_PATH = os.path.join(HERE, "schema", "event_v1.1.json")

# The real server's measured behaviour (PROTOCOL.md): the defaults of StandIn.
EVENT_COST_S = 0.007  # one commit per event, one writer: ~140 events/s
RATE_BUCKET = 60  # requests a token may send at once ...
RATE_REFILL_PER_S = 10.0  # ... and then per second
KEEPALIVE_S = 5.0  # uvicorn's default timeout_keep_alive
MAX_BATCH_EVENTS = 500
ARTIFACT_MAX_BYTES = 50 * 1024 * 1024

SERVER_EVENT_TYPES = frozenset(
    (
        "batch_start", "batch_done", "batch_failed", "job_start", "job_epoch", "job_done",
        "job_failed", "resource_snapshot", "log_line", "env_snapshot",
    )
)
JOB_EVENT_TYPES = frozenset(("job_start", "job_epoch", "job_done", "job_failed", "log_line"))
ENVELOPE_KEYS = frozenset(
    ("event_id", "schema_version", "event_type", "timestamp", "batch_id", "job_id", "source", "data")
)
SOURCE_KEYS = frozenset(("project", "host", "user", "commit", "command"))


# =======================================================================================
# 1. The server
# =======================================================================================


class _SchemaCheck:
    """The repository's event schema, checked once per event *shape*.

    jsonschema costs ~0.1 ms an event, which would skew a server that is meant to spend its
    time only where the real one does. Within one shape (type, ids, source, key sets) only
    event_id, timestamp and data's values vary, and those are checked by the schema's own
    regular expressions on every event; the full schema runs once per shape.
    """

    def __init__(self, path: str = SCHEMA_PATH):
        with open(path, encoding="utf-8") as f:
            self.schema = json.load(f)
        props = self.schema["properties"]
        self._event_id = re.compile(props["event_id"]["pattern"])
        self._timestamp = re.compile(props["timestamp"]["pattern"])
        self._validator = None  # built on first use: importing jsonschema takes ~0.2 s
        self._shapes = set()
        self._lock = threading.Lock()

    def _full(self, event: dict) -> list:
        if self._validator is None:
            try:
                import jsonschema
            except ImportError:  # the checks below still catch what the server refuses
                self._validator = False
            else:
                self._validator = jsonschema.Draft7Validator(self.schema, format_checker=jsonschema.FormatChecker())
        if not self._validator:
            return []
        return sorted(e.message for e in self._validator.iter_errors(event))

    def errors(self, event: dict) -> list:
        """What in ``event`` breaks the repository schema ([] when nothing does)."""
        problems = []
        if not self._event_id.match(str(event.get("event_id"))):
            problems.append("event_id %r is not a UUID v4" % (event.get("event_id"),))
        if not self._timestamp.match(str(event.get("timestamp"))):
            problems.append("timestamp %r is not fixed-width UTC with milliseconds" % (event.get("timestamp"),))
        data = event.get("data")
        source = event.get("source")
        shape = (
            event.get("event_type"),
            event.get("schema_version"),
            event.get("batch_id"),
            event.get("job_id"),
            json.dumps(source, sort_keys=True),
            tuple(sorted(event)),
            tuple(sorted(data)) if isinstance(data, dict) else repr(type(data)),
        )
        with self._lock:
            known = shape in self._shapes
        if not known:
            full = self._full(event)
            problems.extend(m for m in full if m not in problems)
            if not full:
                with self._lock:
                    self._shapes.add(shape)
        return problems


class _TokenBucket:
    """Per-token request budget: ``size`` at once, ``rate`` more per second."""

    def __init__(self, size: float, rate: float):
        self.size = float(size)
        self.rate = float(rate)
        self._state = {}  # token -> (tokens left, monotonic time of that count)
        self._lock = threading.Lock()

    def take(self, token: str) -> int:
        """0 when the request may go on, else the Retry-After to answer (whole seconds, >= 1)."""
        now = time.monotonic()
        with self._lock:
            left, then = self._state.get(token, (self.size, now))
            left = min(self.size, left + (now - then) * self.rate)
            if left >= 1.0:
                self._state[token] = (left - 1.0, now)
                return 0
            self._state[token] = (left, now)
        # the time until one whole request is available again, rounded up as HTTP wants it
        return max(1, int(math.ceil((1.0 - left) / self.rate))) if self.rate > 0 else 60


class _Writer:
    """One database writer, handed over in arrival order.

    threading.Lock is not fair: a thread that releases and at once re-acquires usually
    wins, so one 500-event request would shut every other out. SQLite's busy handler does
    not favour the last writer like that; FIFO hand-over is closer, and makes concurrent
    requests interleave event by event, each slowed by the others as on the real server.
    """

    def __init__(self):
        self._mu = threading.Lock()
        self._held = False
        self._queue = deque()

    def acquire(self) -> int:
        """Take the writer; return how many writers were already waiting when we came."""
        with self._mu:
            if not self._held:
                self._held = True
                return 0
            waiting = len(self._queue)
            turn = threading.Event()
            self._queue.append(turn)
        turn.wait()  # release() hands the writer to us directly
        return waiting

    def waiting(self) -> int:
        with self._mu:
            return len(self._queue)

    def release(self) -> None:
        with self._mu:
            if self._queue:
                self._queue.popleft().set()
            else:
                self._held = False


class _Refusal(Exception):
    """A whole-request answer other than 200, decided before any event is stored."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status = status
        self.detail = detail


def _no_constants(name):
    raise ValueError("not strict JSON: %s" % name)


def _client_gone(sock) -> bool:
    """True when the client has closed its end (it timed out, or its process ended).

    A peek that does not wait: EOF or a reset means gone; no data means still there. This
    catches the client that left before the answer is written, which a failed write alone
    does not (the first write to a closed peer usually succeeds).
    """
    # poll first: the socket has a timeout, and Python then waits that long inside recv()
    # for data even with MSG_DONTWAIT
    poller = select.poll()
    poller.register(sock, select.POLLIN | select.POLLERR | select.POLLHUP)
    if not poller.poll(0):
        return False
    try:
        data = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError, TimeoutError):
        return False
    except OSError:
        return True
    return data == b""


class StandIn:
    """A stand-in Argus server on 127.0.0.1 with the real server's delivery behaviour.

    Options (defaults are the real server's measured figures):

    - ``event_cost_s``: time one event holds the single writer (7 ms). 0 turns the writer
      off (events are stored at once).
    - ``dup_cost_s``: the same for an event_id already stored (default: ``event_cost_s``;
      the server still checks and rolls back).
    - ``bucket`` / ``refill_per_s``: the per-token rate limit (60, 10/s); ``bucket=None``
      turns it off. It counts every route: ingest, stop polls and uploads.
    - ``locked_prob`` / ``locked_min_waiters``: probability that an event whose request
      finds at least that many other writers waiting fails the request with
      ``500 database is locked`` (events stored before it stay stored, as on SQLite).
    - ``tokens``: accepted tokens (None: any ``Bearer`` token; a request without one gets 401).
    - ``strict_schema``: answer 422 to a request holding an event that breaks the
      repository schema (default: store it and count it in ``stats()["schema_violations"]``;
      the real server accepts e.g. the upstream client's whole-second timestamps).
    - ``keepalive_s``: an idle keep-alive connection is closed after this (uvicorn: 5 s).
    - ``seed``: for the ``locked_prob`` draws.

    Records: ``requests`` (a list of dicts, see ``_dispatch``), ``events`` (event_id ->
    the first payload stored), ``meta`` (event_id -> [first stored (wall clock), times
    processed, row id]), ``artifacts``.
    """

    def __init__(
        self,
        *,
        event_cost_s: float = EVENT_COST_S,
        dup_cost_s: float | None = None,
        bucket: float | None = RATE_BUCKET,
        refill_per_s: float = RATE_REFILL_PER_S,
        locked_prob: float = 0.0,
        locked_min_waiters: int = 2,
        tokens=None,
        strict_schema: bool = False,
        keepalive_s: float | None = KEEPALIVE_S,
        seed: int | None = None,
        port: int = 0,
    ):
        self.event_cost_s = float(event_cost_s)
        self.dup_cost_s = self.event_cost_s if dup_cost_s is None else float(dup_cost_s)
        self.limiter = _TokenBucket(bucket, refill_per_s) if bucket is not None else None
        self.locked_prob = float(locked_prob)
        self.locked_min_waiters = int(locked_min_waiters)
        self.tokens = set(tokens) if tokens is not None else None
        self.strict_schema = strict_schema
        self.keepalive_s = keepalive_s
        self.port = port
        self._random = random.Random(seed)
        self._writer = _Writer() if (self.event_cost_s > 0 or self.dup_cost_s > 0) else None
        self._schema = _SchemaCheck()

        self.lock = threading.Lock()  # guards every record below
        self.requests = []
        self.events = {}
        self.meta = {}
        self.artifacts = []
        self.batches = set()  # batch ids with a stored event: the stop route knows them
        self.jobs = set()  # job ids with a stored job_start: uploads to them are accepted
        self.stop_requested = {}  # batch_id -> requested_at
        self.schema_violations = 0
        self.schema_errors = []  # the first few, for the report
        self.writer_busy_s = 0.0
        self._rows = 0
        self._in_flight = 0
        self.max_in_flight = 0
        self._last_done = time.monotonic()
        self._server = None
        self._thread = None
        self.started_at = None

    # -- life cycle ---------------------------------------------------------------------

    @property
    def url(self) -> str:
        return "http://127.0.0.1:%d" % self._server.server_address[1]

    def start(self) -> "StandIn":
        standin = self

        class Handler(_Handler):
            owner = standin

        class Server(ThreadingHTTPServer):
            daemon_threads = True  # a handler still sleeping in the writer never blocks exit
            request_queue_size = 1024  # the default (5) drops SYNs when 200 clients connect at once
            allow_reuse_address = True

            def handle_error(self, request, client_address):
                # a client that resets its idle keep-alive connection, or exits, is routine
                if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError, socket.timeout)):
                    super().handle_error(request, client_address)

        self._server = Server(("127.0.0.1", self.port), Handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, name="standin", daemon=True
        )
        self._thread.start()
        self.started_at = time.time()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "StandIn":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def request_stop(self, batch_id: str) -> None:
        """What the UI's Stop button does: the stop route answers requested=true from now on."""
        with self.lock:
            self.stop_requested[batch_id] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

    def in_flight(self) -> int:
        with self.lock:
            return self._in_flight

    def wait_idle(self, quiet_s: float = 0.3, timeout: float = 60.0) -> bool:
        """Wait until no request is being worked on (abandoned ones included) for ``quiet_s``."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self.lock:
                idle = self._in_flight == 0 and time.monotonic() - self._last_done >= quiet_s
            if idle:
                return True
            time.sleep(0.05)
        return False

    # -- request handling (called by _Handler in the connection's thread) ------------------

    def _dispatch(self, handler: "_Handler", method: str) -> None:
        path = handler.path.split("?", 1)[0]
        auth = handler.headers.get("Authorization") or ""
        token = auth[7:].strip() if auth.startswith("Bearer ") else ""
        record = {
            "t": time.time(),  # wall clock: comparable with the client processes' own stamps
            "t_end": None,
            "method": method,
            "route": _route_name(method, path)[0] or "unknown",
            "token": token,
            "events": 0,
            "types": (),  # the event types the body carried
            "new": 0,
            "dup": 0,
            "status": None,
            "gave_up": False,
            "gave_up_after_s": None,  # from arrival until the server noticed the client had gone
            "batch": None,  # the batch_id the body names first: which client sent it (429s too)
        }
        with self.lock:
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
            self.requests.append(record)
        try:
            try:
                body = handler.read_body() if method == "POST" else b""
            except (OSError, ValueError):
                record["gave_up"] = True  # the client left while sending
                handler.close_connection = True
                return
            found = _BATCH_ID.search(body, 0, 4096) if body else None
            if found:
                record["batch"] = found.group(1).decode("utf-8", "replace")
            status, payload, headers = self._answer(handler, record, method, path, token, body)
            record["status"] = status
            if not record["gave_up"] and _client_gone(handler.connection):
                self._mark_gone(record)
            if record["gave_up"]:
                handler.close_connection = True  # nobody to answer: the work was done for nothing
            elif not handler.send_json(status, payload, headers):
                self._mark_gone(record)
        finally:
            with self.lock:
                record["t_end"] = time.time()
                self._in_flight -= 1
                self._last_done = time.monotonic()

    def _mark_gone(self, record: dict) -> None:
        if not record["gave_up"]:
            record["gave_up"] = True
            record["gave_up_after_s"] = round(time.time() - record["t"], 4)

    def _answer(self, handler, record, method, path, token, body) -> tuple:
        route, ident = _route_name(method, path)
        if route is None:
            return 404, {"detail": "Not Found"}, None
        if self.limiter is not None:
            # keyed by the token, or by the peer for requests without one (as slowapi does)
            retry = self.limiter.take(token or "ip:%s" % handler.client_address[0])
            if retry:
                return 429, {"detail": "Rate limit exceeded"}, {"Retry-After": str(retry)}
        if not token:
            return 401, {"detail": "Authentication required"}, None
        if self.tokens is not None and token not in self.tokens:
            return 401, {"detail": "Invalid or expired API token"}, None
        try:
            if route == "stop":
                return self._stop(ident)
            if route in ("job_artifacts", "batch_artifacts"):
                return self._artifact(handler, route, ident, body)
            return self._ingest(handler, record, route, body)
        except _Refusal as refusal:
            return refusal.status, {"detail": refusal.detail}, None

    def _stop(self, batch_id: str) -> tuple:
        with self.lock:
            if batch_id not in self.batches:
                return 404, {"detail": "Batch not found"}, None
            at = self.stop_requested.get(batch_id)
        return 200, {"requested": at is not None, "requested_at": at, "requested_by": "standin" if at else None}, None

    def _artifact(self, handler, route: str, ident: str, body: bytes) -> tuple:
        ctype = handler.headers.get("Content-Type", "")
        if not ctype.startswith("multipart/form-data"):
            raise _Refusal(422, "multipart/form-data expected")
        parts = _multipart(body, ctype)
        if "file" not in parts:
            raise _Refusal(422, "field 'file' is required")
        filename, content = parts["file"]
        if len(content) > ARTIFACT_MAX_BYTES:
            raise _Refusal(413, "file too large")
        with self.lock:
            if route == "job_artifacts" and ident not in self.jobs:
                raise _Refusal(404, "job not found")
            if route == "batch_artifacts" and ident not in self.batches:
                raise _Refusal(404, "batch not found")
            row = {
                "id": len(self.artifacts) + 1,
                "kind": "job" if route == "job_artifacts" else "batch",
                "owner": ident,
                "filename": filename,
                "size_bytes": len(content),
                "label": parts.get("label", (None, b""))[1].decode("utf-8", "replace") or None,
                "t": time.time(),
            }
            self.artifacts.append(row)
        return 201, row, None

    def _ingest(self, handler, record: dict, route: str, body: bytes) -> tuple:
        try:
            parsed = json.loads(body.decode("utf-8"), parse_constant=_no_constants)
        except (ValueError, UnicodeDecodeError) as exc:
            raise _Refusal(422, "invalid JSON body: %s" % exc) from None
        if route == "batch":
            if not isinstance(parsed, dict) or not isinstance(parsed.get("events"), list):
                raise _Refusal(422, "body must be {\"events\": [...]}")
            events = parsed["events"]
            if not 1 <= len(events) <= MAX_BATCH_EVENTS:
                raise _Refusal(422, "a batch holds 1..%d events, got %d" % (MAX_BATCH_EVENTS, len(events)))
        else:
            events = [parsed]
        record["events"] = len(events)
        record["types"] = tuple(sorted({str(e.get("event_type")) for e in events if isinstance(e, dict)}))
        for event in events:  # the whole body is validated before anything is stored
            self._check_envelope(event)
        errors = []
        for event in events:
            problems = self._schema.errors(event)
            if problems:
                errors.append((event.get("event_id"), problems))
        if errors:
            with self.lock:
                self.schema_violations += len(errors)
                room = 10 - len(self.schema_errors)
                if room > 0:
                    self.schema_errors.extend(errors[:room])
            if self.strict_schema:
                raise _Refusal(422, "schema violation: %s" % (errors[0],))

        results = []
        sock = handler.connection
        for event in events:
            if self._writer is not None:
                waiting = self._writer.acquire()
                try:
                    if (
                        self.locked_prob
                        and waiting >= self.locked_min_waiters
                        and self._random.random() < self.locked_prob
                    ):
                        return 500, {"detail": "database is locked"}, None
                    results.append(self._store(event, record, slow=True))
                finally:
                    self._writer.release()
                # the real server does not look, but we want to know when the client left
                if not record["gave_up"] and _client_gone(sock):
                    self._mark_gone(record)
            else:
                results.append(self._store(event, record, slow=False))
        if route == "events":
            status, row = results[0]
            return 200, {"accepted": True, "event_id": row, "deduplicated": status == "deduplicated"}, None
        answer = [
            {"event_id": e.get("event_id"), "status": status, "db_id": row, "error": None}
            for e, (status, row) in zip(events, results)
        ]
        return 200, {"accepted": len(answer), "rejected": 0, "results": answer}, None

    def _check_envelope(self, event) -> None:
        """What the real server refuses for the whole request (PROTOCOL.md, ingest answers)."""
        if not isinstance(event, dict):
            raise _Refusal(422, "an event must be an object")
        if event.get("schema_version") != "1.1":
            raise _Refusal(415, "unsupported schema_version %r" % (event.get("schema_version"),))
        extra = set(event) - ENVELOPE_KEYS
        if extra:
            raise _Refusal(422, "extra fields not permitted: %s" % sorted(extra))
        if event.get("event_type") not in SERVER_EVENT_TYPES:
            raise _Refusal(422, "unknown event_type %r" % (event.get("event_type"),))
        if not isinstance(event.get("event_id"), str) or not event["event_id"]:
            raise _Refusal(422, "event_id is required")
        batch_id = event.get("batch_id")
        if not isinstance(batch_id, str) or not 1 <= len(batch_id) <= 128:
            raise _Refusal(422, "batch_id must be 1..128 characters")
        job_id = event.get("job_id")
        if job_id is not None and (not isinstance(job_id, str) or len(job_id) > 256):
            raise _Refusal(422, "job_id must be a string of at most 256 characters")
        source = event.get("source")
        if not isinstance(source, dict) or not isinstance(source.get("project"), str):
            raise _Refusal(422, "source.project is required")
        if set(source) - SOURCE_KEYS:
            raise _Refusal(422, "extra source fields not permitted: %s" % sorted(set(source) - SOURCE_KEYS))
        if "data" in event and not isinstance(event["data"], dict):
            raise _Refusal(422, "data must be an object")
        if event["event_type"] in JOB_EVENT_TYPES and not job_id:
            raise _Refusal(400, "%s requires job_id" % event["event_type"])

    def _store(self, event: dict, record: dict, slow: bool) -> tuple:
        """Commit one event (holding the writer when ``slow``); return (status, row id)."""
        event_id = event["event_id"]
        with self.lock:
            known = self.meta.get(event_id)
        if slow:
            cost = self.dup_cost_s if known else self.event_cost_s
            if cost > 0:
                time.sleep(cost)
        with self.lock:
            self.writer_busy_s += (self.dup_cost_s if known else self.event_cost_s) if slow else 0.0
            meta = self.meta.get(event_id)
            if meta is not None:  # a duplicate still cost its check: count that it was processed
                meta[1] += 1
                record["dup"] += 1
                return "deduplicated", meta[2]
            self._rows += 1
            self.meta[event_id] = [time.time(), 1, self._rows]
            self.events[event_id] = event
            record["new"] += 1
            self.batches.add(event["batch_id"])
            if event["event_type"] == "job_start":
                self.jobs.add(event["job_id"])
            return "accepted", self._rows

    # -- what was recorded ------------------------------------------------------------------

    def batch_events(self, batch_id: str) -> list:
        """(event, first stored, times processed) for every stored event of a batch."""
        with self.lock:
            return [
                (event, self.meta[eid][0], self.meta[eid][1])
                for eid, event in self.events.items()
                if event.get("batch_id") == batch_id
            ]

    def stats(self, token: str | None = None, since: float | None = None, until: float | None = None) -> dict:
        """A summary of the requests (optionally one token's, or a wall-clock window's) and events."""
        with self.lock:
            requests = [
                dict(r)
                for r in self.requests
                if (token is None or r["token"] == token)
                and (since is None or r["t"] >= since)
                and (until is None or r["t"] <= until)
            ]
            processed = [m[1] for m in self.meta.values()]
            schema_errors = list(self.schema_errors)
            violations = self.schema_violations
            busy = self.writer_busy_s
        ingest = [r for r in requests if r["route"] in ("events", "batch")]
        accepted = [r for r in ingest if r["status"] == 200]
        sizes = sorted(r["events"] for r in accepted)
        gave_up = [r for r in requests if r["gave_up"]]
        by_route, by_status = {}, {}
        for r in requests:
            by_route[r["route"]] = by_route.get(r["route"], 0) + 1
            by_status[str(r["status"])] = by_status.get(str(r["status"]), 0) + 1
        limited = sum(1 for r in requests if r["status"] == 429)
        # requests the daemons cost: stop polls, and ingest requests carrying nothing but
        # resource snapshots (a heartbeat that travels with epochs costs no request)
        daemon = [r for r in requests if r["route"] == "stop" or (r["route"] in ("events", "batch") and r["types"] == ("resource_snapshot",))]
        accepted_all = sum(1 for r in requests if r["status"] in (200, 201))
        daemon_accepted = sum(1 for r in daemon if r["status"] == 200)
        twice = sum(1 for n in processed if n >= 2)
        waits = sorted(r["gave_up_after_s"] for r in gave_up if r["gave_up_after_s"] is not None)
        return {
            "requests": len(requests),
            "by_route": by_route,
            "by_status": by_status,
            "rate_limited": limited,
            "rate_limited_pct": _pct(limited, len(requests)),
            "daemon_requests": len(daemon),
            "daemon_accepted": daemon_accepted,
            "daemon_share_of_accepted_pct": _pct(daemon_accepted, accepted_all),
            "ingest_requests": len(ingest),
            "ingest_accepted": len(accepted),
            "events_per_accepted_request": _spread(sizes),
            "events_stored": len(processed),
            "events_processed": sum(processed),
            "processed_twice": twice,
            "processed_twice_pct": _pct(twice, len(processed)),
            "gave_up": len(gave_up),
            "gave_up_ingest": sum(1 for r in gave_up if r["route"] in ("events", "batch")),
            "gave_up_events": sum(r["events"] for r in gave_up),
            # from arrival to when the server saw the client gone: about the client's timeout
            "gave_up_after_s": _spread(waits),
            # how long the server went on working for nobody
            "worked_after_gave_up_s": round(
                sum(r["t_end"] - r["t"] - r["gave_up_after_s"] for r in gave_up
                    if r["t_end"] and r["gave_up_after_s"] is not None), 3),
            "db_locked": sum(1 for r in requests if r["status"] == 500),
            "schema_violations": violations,
            "schema_errors": schema_errors,
            "writer_busy_s": round(busy, 3),
            "max_in_flight": self.max_in_flight,
            "first_request": requests[0]["t"] if requests else None,
            "last_request": requests[-1]["t"] if requests else None,
        }


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as uvicorn
    server_version = "argus-standin"
    owner = None  # the StandIn, set by StandIn.start()

    def setup(self):
        # BaseHTTPRequestHandler applies self.timeout to the socket: an idle keep-alive
        # connection is then closed after it, as uvicorn closes them after 5 s.
        self.timeout = self.owner.keepalive_s
        super().setup()
        try:
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass

    def log_message(self, *args):  # a report per request would drown the test output
        pass

    def do_GET(self):
        self.owner._dispatch(self, "GET")

    def do_POST(self):
        self.owner._dispatch(self, "POST")

    def read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if len(body) != length:
            raise ValueError("body cut short")
        return body

    def send_json(self, status: int, payload, headers=None) -> bool:
        """Write the whole answer in one send (headers and body apart would meet Nagle and
        delayed ACKs: +40 ms); False when the client is no longer there to read it."""
        body = json.dumps(payload).encode("utf-8")
        lines = [
            "HTTP/1.1 %d %s" % (status, _REASONS.get(status, "Status")),
            "Content-Type: application/json",
            "Content-Length: %d" % len(body),
        ]
        for key, value in (headers or {}).items():
            lines.append("%s: %s" % (key, value))
        if self.close_connection:
            lines.append("Connection: close")
        try:
            self.wfile.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, TimeoutError, OSError):
            self.close_connection = True
            return False
        return True


_REASONS = {
    200: "OK", 201: "Created", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
    404: "Not Found", 413: "Payload Too Large", 415: "Unsupported Media Type",
    422: "Unprocessable Entity", 429: "Too Many Requests", 500: "Internal Server Error",
}

_ROUTES = (
    ("POST", re.compile(r"^/api/events$"), "events"),
    ("POST", re.compile(r"^/api/events/batch$"), "batch"),
    ("GET", re.compile(r"^/api/batches/([^/]+)/stop-requested$"), "stop"),
    ("POST", re.compile(r"^/api/jobs/([^/]+)/artifacts$"), "job_artifacts"),
    ("POST", re.compile(r"^/api/batches/([^/]+)/artifacts$"), "batch_artifacts"),
)


_BATCH_ID = re.compile(rb'"batch_id"\s*:\s*"([^"]+)"')


def _route_name(method: str, path: str) -> tuple:
    for verb, pattern, name in _ROUTES:
        m = pattern.match(path)
        if m and verb == method:
            return name, (m.group(1) if m.groups() else None)
    return None, None


def _multipart(body: bytes, content_type: str) -> dict:
    """name -> (filename or None, content) of a multipart/form-data body."""
    m = re.search(r'boundary="?([^";]+)"?', content_type)
    if not m:
        raise _Refusal(422, "multipart body without a boundary")
    parts = {}
    for chunk in body.split(b"--" + m.group(1).encode("latin-1")):
        if b"\r\n\r\n" not in chunk:
            continue
        head, _, content = chunk.partition(b"\r\n\r\n")
        name = re.search(rb'name="([^"]*)"', head)
        if not name:
            continue
        filename = re.search(rb'filename="([^"]*)"', head)
        if content.endswith(b"\r\n"):
            content = content[:-2]
        parts[name.group(1).decode("utf-8", "replace")] = (
            filename.group(1).decode("utf-8", "replace") if filename else None,
            content,
        )
    return parts


def _pct(part, whole) -> float | None:
    return round(100.0 * part / whole, 1) if whole else None


def _spread(values: list) -> dict:
    """min / median / max / count of numbers (None when there are none)."""
    if not values:
        return {"n": 0, "min": None, "median": None, "max": None}
    values = sorted(values)
    return {"n": len(values), "min": values[0], "median": statistics.median(values), "max": values[-1]}


# =======================================================================================
# 2. Inside a client process: ``python standin.py client ...``
# =======================================================================================


def client_main(argv) -> int:
    """Emit epochs through ``argus.Reporter`` at a steady rate; write what happened as JSON.

    Protocol with the harness: print ``READY`` once imported, then read one line from stdin,
    the wall-clock time at which to start (so that many processes start together, as a job
    array does), run, and write the result file. Reporter settings come from the
    environment the harness sets (ARGUS_URL, ARGUS_TOKEN, HOME, ARGUS_SPILL_DIR), which both
    our client and the upstream one read.
    """
    p = argparse.ArgumentParser(prog="standin.py client")
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--rate", type=float, default=0.0, help="epochs per second (0: as fast as possible)")
    p.add_argument("--job-id", default="job-1")
    p.add_argument("--result", required=True)
    p.add_argument("--heartbeat", type=float, default=0.0, help="interval in s (0: off)")
    p.add_argument("--stop-polling", type=float, default=0.0, help="interval in s (0: off)")
    p.add_argument("--resource", type=float, default=0.0, help="interval in s (0: off)")
    args = p.parse_args(argv)
    done_path = args.result + ".atexit"

    def stamp_end():
        # registered before argus is imported, so it runs after argus's own exit handlers
        # (atexit runs last-registered first): the moment the client's exit work was over
        with open(done_path, "w", encoding="utf-8") as f:
            f.write("%.6f" % time.time())

    import atexit

    atexit.register(stamp_end)

    # What a client's worker imports on its first request, imported now: fifty processes
    # that start together should not starve two cores at the moment they begin to send.
    for name in ("requests", "ssl", "encodings.idna", "http.client", "uuid"):
        try:
            __import__(name)
        except ImportError:
            pass
    import argus

    result = {
        "argus_file": getattr(argus, "__file__", None),
        "argus_version": getattr(argus, "__version__", None),
        "python": sys.version.split()[0],
        "pid": os.getpid(),
        "emitted": 0,
    }
    sys.stdout.write("READY\n")
    sys.stdout.flush()
    line = sys.stdin.readline().strip()
    start_at = float(line) if line else time.time()
    time.sleep(max(0.0, start_at - time.time()))

    def interval(value):
        return value if value > 0 else False

    result["t_start"] = time.time()
    try:
        reporter = argus.Reporter(
            batch_prefix="standin",
            source_project="standin",
            heartbeat=interval(args.heartbeat),
            stop_polling=interval(args.stop_polling),
            resource_snapshot=interval(args.resource),
        )
        with reporter as r:
            result["batch_id"] = r.batch_id
            with r.job(args.job_id, model="standin-model", dataset="standin-data") as job:
                period = 1.0 / args.rate if args.rate > 0 else 0.0
                t0 = time.perf_counter()
                for i in range(args.epochs):
                    if period:
                        delay = t0 + i * period - time.perf_counter()
                        if delay > 0:
                            time.sleep(delay)
                    job.epoch(i, train_loss=1.0 / (i + 1), val_loss=1.5 / (i + 1), lr=1e-3)
                    result["emitted"] = i + 1
                result["t_emit_end"] = time.time()
        result["t_exit_end"] = time.time()
    finally:
        tmp = args.result + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(result, f)
        os.replace(tmp, args.result)
    return 0


# =======================================================================================
# 3. Running client processes and accounting for their events
# =======================================================================================


class Client:
    """One client process and its private folders (HOME, spill directory, result, stderr)."""

    def __init__(self, index: int, kind: str, folder: str):
        self.index = index
        self.kind = kind  # "ours" or "upstream"
        self.folder = folder
        self.home = os.path.join(folder, "home")
        self.spill = os.path.join(folder, "spill")
        self.result_path = os.path.join(folder, "result.json")
        self.stderr_path = os.path.join(folder, "stderr.txt")
        self.proc = None
        self.ready = False
        self.exit_wall = None  # when the harness saw the process end (wall clock)
        self.returncode = None
        self.result = {}

    def spill_dirs(self) -> list:
        # ours: ARGUS_SPILL_DIR; upstream: ~/.argus-reporter (it ignores ARGUS_SPILL_DIR)
        return [self.spill, os.path.join(self.home, ".argus-reporter")]

    def end_of_run(self) -> float | None:
        """When the client's last exit handler had run (its own clock; the harness's view of
        the process end can lag by seconds when fifty processes end at once on two cores)."""
        return self.result.get("t_atexit_done") or self.exit_wall

    def stderr(self) -> str:
        try:
            with open(self.stderr_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return ""


def client_env(kind: str, client: Client, url: str, token: str, repo: str = REPO, extra=None) -> dict:
    """A clean environment: no ARGUS_*, PYTHON*, proxy or rank variables from ours leak in."""
    skip = ("ARGUS_", "PYTHON", "SLURM_", "OMPI_", "PMI_")
    dropped = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY",
               "http_proxy", "https_proxy", "all_proxy", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"}
    env = {k: v for k, v in os.environ.items() if not k.startswith(skip) and k not in dropped}
    env.update(
        HOME=client.home,
        ARGUS_SPILL_DIR=client.spill,
        ARGUS_URL=url,
        ARGUS_TOKEN=token,
        PYTHONUNBUFFERED="1",
    )
    if kind == "ours":
        env["PYTHONPATH"] = repo  # this checkout's argus.py; the upstream one never sees it
    env.update(extra or {})
    return env


def launch_clients(
    kind: str,
    python: str,
    count: int,
    url: str,
    token: str,
    *,
    epochs: int,
    rate: float,
    workdir: str,
    repo: str = REPO,
    wave: int = 25,
    daemons=(0.0, 0.0, 0.0),
    extra_env=None,
    ready_timeout: float = 120.0,
    nice: int = 10,
) -> list:
    """Start ``count`` client processes in waves of ``wave`` and wait until all are imported.

    They then wait for ``start_clients``. Waves keep 200 interpreters from starting on two
    cores at once; since all wait at the same barrier, they still run together.

    Clients run at a lower CPU priority (``nice``): on a cluster the server has a machine of
    its own, and when 200 clients share two cores with it, an unprioritised stand-in
    answers a 16-event request in 8 s, which is the machine, not the server, talking.
    """
    clients = []
    for index in range(count):
        folder = os.path.join(workdir, "%s-%03d" % (kind, index))
        client = Client(index, kind, folder)
        os.makedirs(client.home, exist_ok=True)
        clients.append(client)
    for first in range(0, count, max(1, wave)):
        group = clients[first:first + max(1, wave)]
        for client in group:
            cmd = [
                *(["nice", "-n", str(nice)] if nice and shutil.which("nice") else []),
                python, os.path.abspath(__file__), "client",
                "--epochs", str(epochs), "--rate", str(rate), "--result", client.result_path,
                "--job-id", "job-%03d" % client.index,
                "--heartbeat", str(daemons[0]), "--stop-polling", str(daemons[1]), "--resource", str(daemons[2]),
            ]
            with open(client.stderr_path, "wb") as err:
                client.proc = subprocess.Popen(
                    cmd,
                    env=client_env(kind, client, url, token, repo, extra_env),
                    cwd=client.folder,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=err,
                )
        deadline = time.monotonic() + ready_timeout
        for client in group:
            client.ready = _read_ready(client.proc, deadline)
    return clients


def _read_ready(proc, deadline: float) -> bool:
    fd = proc.stdout.fileno()
    seen = b""
    while b"READY" not in seen:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        readable, _, _ = select.select([fd], [], [], left)
        if not readable:
            return False
        chunk = os.read(fd, 256)
        if not chunk:
            return False  # it died while importing
        seen += chunk
    return True


def start_clients(clients: list, lead_s: float = 0.2) -> float:
    """Tell every ready client to start at the same moment; return that moment (wall clock)."""
    start_at = time.time() + lead_s
    for client in clients:
        if client.proc is None:
            continue
        try:
            client.proc.stdin.write(b"%.6f\n" % start_at)
            client.proc.stdin.close()
        except OSError:
            pass

        def waiter(c=client):
            c.returncode = c.proc.wait()
            c.exit_wall = time.time()

        threading.Thread(target=waiter, daemon=True).start()
    return start_at


def wait_clients(clients: list, timeout: float) -> None:
    """Wait for every client to end (kill the ones past ``timeout``), then read their results."""
    deadline = time.monotonic() + timeout
    for client in clients:
        if client.proc is None:
            continue
        try:
            client.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            client.proc.kill()  # only processes this harness started
            client.proc.wait()
        while client.exit_wall is None:  # the waiter thread stamps it
            time.sleep(0.005)
        client.proc.stdout.close()
        try:
            with open(client.result_path, encoding="utf-8") as f:
                client.result = json.load(f)
        except (OSError, ValueError):
            client.result = {}
        try:
            with open(client.result_path + ".atexit", encoding="utf-8") as f:
                client.result["t_atexit_done"] = float(f.read())
        except (OSError, ValueError):
            pass


def spilled_events(directories) -> dict:
    """event_id -> event of every event waiting in spill files (not dead letters or uploads)."""
    found = {}
    for directory in directories:
        try:
            names = sorted(os.listdir(directory))
        except OSError:
            continue
        for name in names:
            if ".jsonl" not in name or name.startswith(("deadletter", "pending-uploads")):
                continue
            try:
                with open(os.path.join(directory, name), encoding="utf-8", errors="replace") as f:
                    for line in f:
                        try:
                            event = json.loads(line)
                        except ValueError:
                            continue
                        if isinstance(event, dict) and event.get("event_id"):
                            found[event["event_id"]] = event
            except OSError:
                continue
    return found


def dead_letter_count(directories) -> int:
    count = 0
    for directory in directories:
        try:
            with open(os.path.join(directory, "deadletter.jsonl"), "rb") as f:
                count += sum(1 for line in f if line.strip())
        except OSError:
            pass
    return count


def account(server: StandIn, clients: list, planned_epochs: int) -> dict:
    """Where every emitted epoch is: stored during the run, stored late, on disk, or lost.

    An epoch is identified by (batch, epoch number): each client runs one batch with epochs
    0..N-1, so this holds whatever a client does with event ids.
    """
    totals = {
        "clients": len(clients), "clients_failed": 0, "emitted": 0, "stored_by_emit_end": 0,
        "stored_in_run": 0, "stored_late": 0, "stored": 0, "spilled": 0, "spilled_and_stored": 0,
        "lost": 0, "missing_on_server": 0, "lifecycle_missing": 0, "dead_letters": 0,
        "events_of_clients": 0, "processed_twice": 0, "lost_in": [],
    }
    for client in clients:
        result = client.result
        batch_id = result.get("batch_id")
        emitted = result.get("emitted", 0) if result else 0
        if not result or "t_exit_end" not in result or client.returncode != 0:
            totals["clients_failed"] += 1
        totals["emitted"] += emitted
        stored_epochs = {}  # epoch -> first stored
        types = set()
        if batch_id:
            for event, first, processed in server.batch_events(batch_id):
                types.add(event["event_type"])
                totals["events_of_clients"] += 1
                if processed >= 2:
                    totals["processed_twice"] += 1
                if event["event_type"] == "job_epoch":
                    epoch = (event.get("data") or {}).get("epoch")
                    stored_epochs[epoch] = min(first, stored_epochs.get(epoch, first))
        spilled_epochs = {
            (e.get("data") or {}).get("epoch")
            for e in spilled_events(client.spill_dirs()).values()
            if e.get("batch_id") == batch_id and e.get("event_type") == "job_epoch"
        }
        emit_end = result.get("t_emit_end") or float("inf")
        exit_wall = client.end_of_run() or float("inf")
        totals["stored_by_emit_end"] += sum(1 for t in stored_epochs.values() if t <= emit_end)
        totals["stored_in_run"] += sum(1 for t in stored_epochs.values() if t <= exit_wall)
        totals["stored_late"] += sum(1 for t in stored_epochs.values() if t > exit_wall)
        totals["stored"] += len(stored_epochs)
        totals["spilled"] += len(spilled_epochs)
        totals["spilled_and_stored"] += len(spilled_epochs & set(stored_epochs))
        emitted_epochs = set(range(emitted))
        lost = emitted_epochs - set(stored_epochs) - spilled_epochs
        totals["lost"] += len(lost)
        if lost and len(totals["lost_in"]) < 10:  # where to look: the client's folder and epochs
            totals["lost_in"].append({"folder": client.folder, "batch_id": batch_id, "lost": len(lost),
                                      "epochs": sorted(lost)[:10]})
        totals["missing_on_server"] += len(emitted_epochs - set(stored_epochs))
        totals["lifecycle_missing"] += len({"batch_start", "job_start", "job_done", "batch_done"} - types)
        totals["dead_letters"] += dead_letter_count(client.spill_dirs())
    totals["delivered_in_run_pct"] = _pct(totals["stored_in_run"], totals["emitted"])
    totals["processed_twice_pct"] = _pct(totals["processed_twice"], totals["events_of_clients"])
    totals["planned"] = planned_epochs * len(clients)
    return totals


def run_sync(python: str, client: Client, url: str, token: str, repo: str = REPO, timeout: float = 300.0) -> dict:
    """``python argus.py sync`` once over one client's spill directory (our CLI)."""
    env = client_env("ours", client, url, token, repo)
    started = time.monotonic()
    try:
        proc = subprocess.run(
            [python, os.path.join(repo, "argus.py"), "sync", "--dir", client.spill],
            env=env, cwd=client.folder, capture_output=True, text=True, timeout=timeout,
        )
        rc, out = proc.returncode, (proc.stdout + proc.stderr).strip()
    except subprocess.TimeoutExpired as exc:
        rc, out = None, "timed out after %.0f s: %s" % (timeout, exc)
    return {"rc": rc, "seconds": round(time.monotonic() - started, 2), "output": out[-500:]}


def _rel(t, start_at: float):
    return round(t - start_at, 3) if t else None


def _exit_figures(clients: list) -> dict:
    """From the end of emitting to: the with-blocks' return, the last exit handler, and the
    process end as the harness saw it."""
    out = {"with_exit_s": [], "exit_s": [], "process_end_s": []}
    for c in clients:
        r = c.result
        if not r.get("t_emit_end"):
            continue
        for key, end in (("with_exit_s", r.get("t_exit_end")), ("exit_s", c.end_of_run()), ("process_end_s", c.exit_wall)):
            if end:
                out[key].append(round(end - r["t_emit_end"], 3))
    return {key: _spread(values) for key, values in out.items()}


def _stderr_summary(clients: list, keep: int = 6) -> dict:
    lines = []
    for c in clients:
        lines.extend(line for line in c.stderr().splitlines() if line.strip())
    distinct = []
    for line in lines:
        short = re.sub(r"\d+", "N", line)[:240]
        if short not in distinct:
            distinct.append(short)
    return {"lines": len(lines), "distinct": distinct[:keep]}


def scenario(
    kind: str,
    python: str,
    *,
    procs: int,
    epochs: int,
    rate: float,
    token: str = "em_live_standin_shared_token",
    event_cost_s: float = EVENT_COST_S,
    dup_cost_s: float | None = None,
    bucket: float | None = RATE_BUCKET,
    refill_per_s: float = RATE_REFILL_PER_S,
    locked_prob: float = 0.0,
    sync: bool = True,
    wave: int = 25,
    daemons=(0.0, 0.0, 0.0),
    nice: int = 10,
    repo: str = REPO,
    workdir: str | None = None,
    keep: bool = False,
    extra_env=None,
    log=None,
) -> dict:
    """Run ``procs`` clients of one kind against a fresh stand-in and return the figures.

    One slow-server client (issue 11's S1) is ``procs=1``; a job array sharing a token (S2)
    is ``procs=50, epochs=200, rate=20`` with ``event_cost_s=0``. ``daemons`` gives the
    (heartbeat, stop polling, resource snapshot) intervals, 0 for off. With ``sync`` (our
    client only) ``argus.py sync`` then runs once per client's spill directory that holds
    events.
    """
    log = log or (lambda msg: None)
    own_dir = workdir is None
    workdir = workdir or tempfile.mkdtemp(prefix="argus-standin-")
    server = StandIn(
        event_cost_s=event_cost_s, dup_cost_s=dup_cost_s, bucket=bucket, refill_per_s=refill_per_s,
        locked_prob=locked_prob, seed=1,
    ).start()
    try:
        log("%s: starting %d client(s) (%d epochs at %g/s each)" % (kind, procs, epochs, rate))
        clients = launch_clients(
            kind, python, procs, server.url, token, epochs=epochs, rate=rate, workdir=workdir,
            repo=repo, wave=wave, daemons=daemons, extra_env=extra_env, nice=nice,
        )
        not_ready = sum(1 for c in clients if not c.ready)
        start_at = start_clients(clients)
        run_s = epochs / rate if rate > 0 else 0.0
        wait_clients(clients, timeout=run_s + 180.0)
        last_exit = max((c.end_of_run() for c in clients if c.end_of_run()), default=time.time())
        log("%s: clients ended %.1f s after the start; waiting for the server to finish" % (kind, last_exit - start_at))
        server.wait_idle(timeout=120.0)
        run_stats = server.stats(until=last_exit)
        after_run = server.stats()  # abandoned requests included
        before = account(server, clients, epochs)
        figures = {
            "kind": kind,
            "argus_file": next((c.result.get("argus_file") for c in clients if c.result), None),
            "procs": procs, "epochs_each": epochs, "rate_each": rate,
            "event_cost_ms": event_cost_s * 1000, "bucket": bucket, "refill_per_s": refill_per_s,
            "not_ready": not_ready,
            "run_length_s": round(last_exit - start_at, 2),
            "request_ceiling": (round(bucket + refill_per_s * (last_exit - start_at)) if bucket is not None else None),
            "run": before,
            "server_run": run_stats,
            "server_after_run": after_run,
            "client_stderr": _stderr_summary(clients),
            "client_returncodes": sorted({c.returncode for c in clients}, key=str),
        }
        figures.update(_exit_figures(clients))
        with server.lock:  # the requests nobody waited for: how big, how long, what timeout
            figures["gave_up_requests"] = [
                {"t": round(r["t"] - start_at, 3), "dur": round((r["t_end"] or r["t"]) - r["t"], 3),
                 "route": r["route"], "events": r["events"], "status": r["status"],
                 "gave_up_after_s": r["gave_up_after_s"]}
                for r in server.requests if r["gave_up"]
            ][:50]
        # Every request in order: how each client sizes and times its requests. ``client`` is
        # the index of the client whose batch the body names (None: a stop poll).
        client_of = {c.result.get("batch_id"): i for i, c in enumerate(clients) if c.result}
        figures["clients"] = [
            {"t_start": _rel(c.result.get("t_start"), start_at), "t_emit_end": _rel(c.result.get("t_emit_end"), start_at),
             "t_exit": _rel(c.end_of_run(), start_at)}
            for c in clients
        ]
        with server.lock:
            figures["request_log"] = [
                {"t": round(r["t"] - start_at, 3), "dur": round((r["t_end"] or r["t"]) - r["t"], 3),
                 "route": r["route"], "events": r["events"], "status": r["status"], "gave_up": r["gave_up"],
                 "gave_up_after_s": r["gave_up_after_s"], "dup": r["dup"], "client": client_of.get(r["batch"])}
                for r in server.requests
            ]
        if sync and kind == "ours":
            syncs = []
            t0 = time.time()
            for client in clients:
                if spilled_events([client.spill]):
                    syncs.append(run_sync(python, client, server.url, token, repo))
            server.wait_idle(timeout=120.0)
            log("%s: %d sync run(s) took %.1f s" % (kind, len(syncs), time.time() - t0))
            after = account(server, clients, epochs)
            figures["sync"] = {
                "runs": len(syncs),
                "failed": sum(1 for s in syncs if s["rc"] != 0),
                "seconds": round(time.time() - t0, 2),
                "outputs": [s["output"] for s in syncs if s["rc"] != 0][:3],
                "after": after,
                "server": server.stats(since=t0),
            }
        figures["server_total"] = server.stats()
        return figures
    finally:
        server.stop()
        if own_dir and not keep:
            shutil.rmtree(workdir, ignore_errors=True)
        elif keep:
            log("kept %s" % workdir)


# =======================================================================================
# Command line: a standalone stand-in, and the client side of the harness
# =======================================================================================


def _serve_main(argv) -> int:
    p = argparse.ArgumentParser(prog="standin.py serve", description="Run the stand-in Argus server.")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--event-ms", type=float, default=EVENT_COST_S * 1000)
    p.add_argument("--dup-ms", type=float, default=None)
    p.add_argument("--bucket", type=float, default=RATE_BUCKET, help="0: no rate limit")
    p.add_argument("--refill", type=float, default=RATE_REFILL_PER_S)
    p.add_argument("--locked-prob", type=float, default=0.0)
    p.add_argument("--idle-exit", type=float, default=600.0, help="stop after this many seconds without a request")
    args = p.parse_args(argv)
    server = StandIn(
        event_cost_s=args.event_ms / 1000.0,
        dup_cost_s=None if args.dup_ms is None else args.dup_ms / 1000.0,
        bucket=args.bucket or None,
        refill_per_s=args.refill,
        locked_prob=args.locked_prob,
        port=args.port,
    ).start()
    print("URL %s" % server.url, flush=True)
    try:
        while True:  # stop by itself once nobody has used it for a while
            time.sleep(1.0)
            with server.lock:
                last = server.requests[-1]["t"] if server.requests else None
            if time.time() - (last or server.started_at) > args.idle_exit and server.in_flight() == 0:
                break
    except KeyboardInterrupt:
        pass
    print(json.dumps(server.stats(), indent=1))
    server.stop()
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "client":
        sys.exit(client_main(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        sys.exit(_serve_main(sys.argv[2:]))
    print("usage: standin.py serve [options] | standin.py client [options]", file=sys.stderr)
    sys.exit(2)
