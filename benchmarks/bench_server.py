"""A minimal, fast stand-in for an Argus server, for benchmarks only.

Run as its own process (so it never shares a GIL with the client under test):

    python benchmarks/bench_server.py [--slow-ms 50] [--idle-exit 60]

It binds 127.0.0.1 on a free port and prints ``PORT <n>`` as its first line.
Keep-alive HTTP/1.1, standard library only, Python 3.8+.

Routes:
    POST /api/events                          one event
    POST /api/events/batch                    {"events": [...]}
    GET  /api/batches/{id}/stop-requested     {"requested": false, ...}
    POST /api/jobs/{id}/artifacts, /api/batches/{id}/artifacts   201 {}
    GET  /_stats                              counters, see Stats.snapshot()
    GET  /_ids                                every event_id received

The server exits by itself after ``--idle-exit`` seconds without a request.
"""
from __future__ import annotations

import argparse
import gzip
import json
import sys
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List, Optional, Tuple


class Stats:
    """Thread-safe record of what the server has acknowledged."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen_ids: set = set()
        self.unique_by_type: Dict[str, int] = {}
        self.duplicates = 0
        self.events_without_id = 0
        self.requests: Dict[str, int] = {}
        self._last_db_id = 0
        self.busy_s = 0.0  # time spent handling ingest requests, body reads and --slow-ms sleeps excluded
        self.first_request_wall: Optional[float] = None
        self.last_ack_wall: Optional[float] = None
        self.last_activity = time.monotonic()

    def touch(self, route: str) -> None:
        with self._lock:
            self.requests[route] = self.requests.get(route, 0) + 1
            self.last_activity = time.monotonic()
            if self.first_request_wall is None and route != "stats":
                self.first_request_wall = time.time()

    def record_events(self, events: List[Any]) -> List[Tuple[str, int]]:
        """Record events; return (status, db_id) for each, like the real server."""
        results = []
        with self._lock:
            for event in events:
                self._last_db_id += 1
                results.append((self._record_one(event), self._last_db_id))
        return results

    def _record_one(self, event: Any) -> str:
        if not isinstance(event, dict) or not event.get("event_id"):
            self.events_without_id += 1
            return "accepted"
        event_id = str(event["event_id"])
        if event_id in self._seen_ids:
            self.duplicates += 1
            return "deduplicated"
        self._seen_ids.add(event_id)
        event_type = str(event.get("event_type"))
        self.unique_by_type[event_type] = self.unique_by_type.get(event_type, 0) + 1
        return "accepted"

    def mark_ack(self, busy_s: float) -> None:
        now = time.time()
        with self._lock:
            self.last_ack_wall = now
            self.busy_s += busy_s

    def event_ids(self) -> List[str]:
        with self._lock:
            return list(self._seen_ids)

    def snapshot(self) -> Dict[str, Any]:
        with self._lock:
            return {
                "unique_events": len(self._seen_ids),
                "unique_by_type": dict(self.unique_by_type),
                "duplicates": self.duplicates,
                "events_without_id": self.events_without_id,
                "requests": dict(self.requests),
                "first_request_wall": self.first_request_wall,
                "last_ack_wall": self.last_ack_wall,
                "busy_s": self.busy_s,
            }


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Answers are written in one send; no Nagle delay on small replies.
    disable_nagle_algorithm = True
    server_version = "argus-bench-server"

    # Set by serve(): shared across handler instances.
    stats: Stats = Stats()
    slow_s: float = 0.0

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass  # a log line per request would dominate the timings

    # -- request plumbing -------------------------------------------------

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            body = self._read_chunked()
        else:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
        encoding = self.headers.get("Content-Encoding", "").lower()
        if encoding == "gzip":
            body = gzip.decompress(body)
        elif encoding == "deflate":
            body = zlib.decompress(body)
        return body

    def _read_chunked(self) -> bytes:
        parts = []
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(parts)
            parts.append(self.rfile.read(size))
            self.rfile.readline()  # CRLF after each chunk

    def _answer(self, status: int, payload: Any, ack: bool = False) -> None:
        """Write the whole answer in one send; an ack is timed and recorded."""
        body = json.dumps(payload).encode("utf-8")
        head = (
            "HTTP/1.1 %d %s\r\n"
            "Content-Type: application/json\r\n"
            "Content-Length: %d\r\n"
            "\r\n" % (status, self.responses.get(status, ("",))[0], len(body))
        ).encode("ascii")
        if ack:
            self.stats.mark_ack(time.perf_counter() - self._started - self.slow_s)
        self.wfile.write(head + body)

    def _route(self) -> Tuple[str, List[str]]:
        path = self.path.split("?", 1)[0]
        return path, [p for p in path.split("/") if p]

    def _slow_down(self) -> None:
        if self.slow_s:
            time.sleep(self.slow_s)

    # -- routes -------------------------------------------------------------

    def do_GET(self) -> None:  # noqa: N802
        path, parts = self._route()
        if path == "/_stats":
            self.stats.touch("stats")
            self._answer(200, self.stats.snapshot())
        elif path == "/_ids":
            self.stats.touch("stats")
            self._answer(200, self.stats.event_ids())
        elif len(parts) == 4 and parts[:2] == ["api", "batches"] and parts[3] == "stop-requested":
            self.stats.touch("stop")
            self._slow_down()
            self._answer(200, {"requested": False, "requested_at": None, "requested_by": None})
        else:
            self.stats.touch("other")
            self._answer(404, {"detail": "Not Found"})

    def do_POST(self) -> None:  # noqa: N802
        path, parts = self._route()
        try:
            body = self._read_body()
        except (ValueError, OSError, zlib.error):
            self.close_connection = True
            self._answer(400, {"detail": "unreadable body"})
            return
        self._started = time.perf_counter()  # server work only: not the wait for the body
        if path == "/api/events":
            self._post_event(body)
        elif path == "/api/events/batch":
            self._post_batch(body)
        elif len(parts) == 4 and parts[0] == "api" and parts[3] == "artifacts":
            self.stats.touch("artifact")
            self._slow_down()
            self._answer(201, {})
        else:
            self.stats.touch("other")
            self._answer(404, {"detail": "Not Found"})

    def _post_event(self, body: bytes) -> None:
        self.stats.touch("event")
        try:
            event = json.loads(body)
        except ValueError:
            self._answer(422, {"detail": "invalid JSON"})
            return
        self._slow_down()
        status, db_id = self.stats.record_events([event])[0]
        self._answer(
            200,
            {"accepted": True, "event_id": db_id, "deduplicated": status == "deduplicated"},
            ack=True,
        )

    def _post_batch(self, body: bytes) -> None:
        self.stats.touch("batch")
        try:
            events = json.loads(body)["events"]
            if not isinstance(events, list):
                raise TypeError("events is not a list")
        except (ValueError, KeyError, TypeError):
            self._answer(422, {"detail": "expected {\"events\": [...]}"})
            return
        self._slow_down()
        recorded = self.stats.record_events(events)
        results = [
            {
                "event_id": event.get("event_id") if isinstance(event, dict) else None,
                "status": status,
                "db_id": db_id,
                "error": None,
            }
            for event, (status, db_id) in zip(events, recorded)
        ]
        self._answer(200, {"accepted": len(events), "rejected": 0, "results": results}, ack=True)


def _exit_when_idle(stats: Stats, server: ThreadingHTTPServer, idle_s: float) -> None:
    while True:
        time.sleep(1.0)
        if time.monotonic() - stats.last_activity > idle_s:
            server.shutdown()
            return


def serve(slow_ms: float = 0.0, idle_exit_s: float = 60.0) -> None:
    Handler.stats = Stats()
    Handler.slow_s = slow_ms / 1000.0
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    watchdog = threading.Thread(
        target=_exit_when_idle, args=(Handler.stats, server, idle_exit_s), daemon=True
    )
    watchdog.start()
    sys.stdout.write("PORT %d\n" % server.server_address[1])
    sys.stdout.flush()
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slow-ms", type=float, default=0.0,
                        help="sleep this long in every ingest request")
    parser.add_argument("--idle-exit", type=float, default=60.0,
                        help="exit after this many seconds without a request")
    args = parser.parse_args(argv)
    try:
        serve(args.slow_ms, args.idle_exit)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
