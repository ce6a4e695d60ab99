"""The local collector (`argus serve`, `argus demo`): its HTTP routes, its SQLite state,
and the SDK driving it."""

from __future__ import annotations

import http.client
import itertools
import json
import os
import socket
import socketserver
import sqlite3
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler

import pytest

import argus
from argus import _Collector
from conftest import run_script

_clock = itertools.count()


@pytest.fixture(autouse=True)
def fast_server(monkeypatch):
    """Keep each test in milliseconds: a collector stops within 10 ms instead of its 100 ms
    poll interval, and responses skip the 40 ms Nagle stall (a bug, see
    test_a_response_is_not_delayed_by_nagle, which undoes this)."""
    serve_forever = socketserver.BaseServer.serve_forever

    def quick_serve_forever(self, poll_interval=0.5):
        return serve_forever(self, min(poll_interval, 0.01))

    monkeypatch.setattr(socketserver.BaseServer, "serve_forever", quick_serve_forever)
    monkeypatch.setattr(BaseHTTPRequestHandler, "disable_nagle_algorithm", True)


def make_event(event_type, batch_id="b1", job_id=None, **data):
    """A valid schema-1.1 event; timestamps grow by one second per call (for a day)."""
    second = next(_clock)
    hms = (second // 3600 % 24, second // 60 % 60, second % 60)
    return {
        "event_id": str(uuid.uuid4()),
        "schema_version": "1.1",
        "event_type": event_type,
        "timestamp": "2026-04-23T%02d:%02d:%02d.000Z" % hms,
        "batch_id": batch_id,
        "job_id": job_id,
        "source": {"project": "p", "host": "h"},
        "data": data,
    }


@pytest.fixture
def collector(tmp_path):
    with _Collector(artifacts_dir=str(tmp_path / "artifacts")) as c:
        yield c


class Client:
    """One keep-alive connection to the collector."""

    def __init__(self, collector, token=None):
        self.conn = http.client.HTTPConnection("127.0.0.1", collector.port, timeout=10)
        self.token = token

    def request(self, method, path, body=None, headers=None, raw=False):
        headers = dict(headers or {})
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if body is not None and not raw:
            body = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        self.conn.request(method, path, body=body, headers=headers)
        response = self.conn.getresponse()
        return response.status, json.loads(response.read())

    def post(self, path, body, **kwargs):
        return self.request("POST", path, body, **kwargs)

    def get(self, path):
        return self.request("GET", path)


@pytest.fixture
def client(collector):
    c = Client(collector)
    yield c
    c.conn.close()


def multipart(fields, boundary="----argus-test-boundary"):
    """fields: {name: bytes or str (a text part) | (filename, bytes) (a file part)}."""
    body = b""
    for name, value in fields.items():
        if isinstance(value, tuple):
            head = (f'Content-Disposition: form-data; name="{name}"; filename="{value[0]}"\r\n'
                    "Content-Type: application/octet-stream")
            content = value[1]
        else:
            head = f'Content-Disposition: form-data; name="{name}"'
            content = value.encode() if isinstance(value, str) else value
        body += f"--{boundary}\r\n{head}\r\n\r\n".encode() + content + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def upload(client, path, fields):
    body, headers = multipart(fields)
    return client.post(path, body, headers=headers, raw=True)


# -- Ingest ---------------------------------------------------------------------------------

def test_single_event_is_accepted_with_its_row_id(client, collector):
    status, answer = client.post("/api/events", make_event("batch_start", n_total_jobs=3))
    assert status == 200
    assert answer == {"accepted": True, "event_id": 1, "deduplicated": False}
    assert collector.event_count() == 1


def test_repeated_event_id_is_deduplicated_and_its_new_payload_dropped(client, collector):
    event = make_event("batch_start", experiment_type="first")
    assert client.post("/api/events", event)[1]["event_id"] == 1
    event["data"] = {"experiment_type": "second"}
    status, answer = client.post("/api/events", event)
    assert (status, answer) == (200, {"accepted": True, "event_id": 1, "deduplicated": True})
    assert collector.event_count() == 1
    assert collector.batches()[0]["experiment_type"] == "first"


def test_batch_endpoint_answers_per_event(client, collector):
    known = make_event("batch_start")
    client.post("/api/events", known)
    fresh = make_event("job_start", job_id="j1", model="m")
    status, answer = client.post("/api/events/batch", {"events": [known, fresh, fresh]})
    assert status == 200
    assert answer["accepted"] == 3 and answer["rejected"] == 0
    assert [(r["event_id"], r["status"]) for r in answer["results"]] == [
        (known["event_id"], "deduplicated"), (fresh["event_id"], "accepted"),
        (fresh["event_id"], "deduplicated")]
    assert answer["results"][1]["db_id"] == answer["results"][2]["db_id"] == 2
    assert all(r["error"] is None for r in answer["results"])
    assert collector.event_count() == 2


def test_event_count_counts_one_batch_when_asked(client, collector):
    """The demo reports what the collector stored for its own batch: a stray client that
    happens on the demo's port (a test whose "down" server it took) must not change it."""
    client.post("/api/events/batch", {"events": [make_event("batch_start", batch_id="mine"),
                                                 make_event("job_start", batch_id="mine", job_id="j")]})
    client.post("/api/events", make_event("batch_start", batch_id="stray"))
    assert (collector.event_count(), collector.event_count("mine"), collector.event_count("stray")) == (3, 2, 1)
    assert collector.event_count("nobody") == 0


@pytest.mark.parametrize("count", [0, 501])
def test_empty_or_oversized_batch_is_refused_whole(client, collector, count):
    events = [make_event("log_line", job_id="j", line="x") for _ in range(count)]
    status, answer = client.post("/api/events/batch", {"events": events})
    assert status == 422 and "detail" in answer
    assert collector.event_count() == 0


def test_batch_of_500_is_accepted(client, collector):
    events = [make_event("log_line", job_id="j", line=str(i)) for i in range(500)]
    status, answer = client.post("/api/events/batch", {"events": events})
    assert (status, answer["accepted"]) == (200, 500)
    assert client.get("/api/stats")[1]["logs"] == 500


def test_one_invalid_event_refuses_the_whole_batch(client, collector):
    bad = make_event("heartbeat")
    status, _ = client.post("/api/events/batch", {"events": [make_event("batch_start"), bad]})
    assert status == 422
    assert collector.event_count() == 0


def test_store_failure_is_a_per_event_internal_rejection(client, collector, monkeypatch):
    store = _Collector._store

    def flaky_store(self, event):
        if event["event_type"] == "log_line":
            raise sqlite3.OperationalError("disk I/O error")
        return store(self, event)

    monkeypatch.setattr(_Collector, "_store", flaky_store)
    events = [make_event("batch_start"), make_event("log_line", job_id="j", line="x")]
    status, answer = client.post("/api/events/batch", {"events": events})
    assert (status, answer["accepted"], answer["rejected"]) == (200, 1, 1)
    rejected = answer["results"][1]
    assert rejected["status"] == "rejected" and rejected["db_id"] is None
    assert rejected["error"].startswith("internal")
    assert collector.event_count() == 1
    status, answer = client.post("/api/events", events[1])
    assert status == 500 and answer["detail"].startswith("internal")


# -- Validation -----------------------------------------------------------------------------

def test_token_is_required_and_checked(tmp_path):
    with _Collector(token="em_live_secret") as collector:
        event = make_event("batch_start")
        assert Client(collector).post("/api/events", event) == (
            401, {"detail": "Authentication required"})
        assert Client(collector, token="em_live_wrong").post("/api/events", event) == (
            401, {"detail": "Invalid or expired API token"})
        wrong = Client(collector, token="em_live_wrong")
        assert wrong.get("/api/batches/b1/stop-requested")[0] == 401
        assert Client(collector, token="em_live_secret").post("/api/events", event)[0] == 200


def test_other_schema_version_is_415(client, collector):
    event = make_event("batch_start")
    event["schema_version"] = "1.0"
    status, answer = client.post("/api/events", event)
    assert status == 415 and "schema_version" in answer["detail"]
    assert collector.event_count() == 0


def _invalid_events():
    def edit(change):
        event = make_event("job_start", job_id="j1")
        change(event)
        return event

    return {
        "unknown type": edit(lambda e: e.update(event_type="heartbeat")),
        "type not a string": edit(lambda e: e.update(event_type=["job_start"])),
        "batch_id not a string": edit(lambda e: e.update(batch_id=["b"])),
        "source not an object": edit(lambda e: e.update(source="p")),
        "extra envelope key": edit(lambda e: e.update(extra=1)),
        "extra source key": edit(lambda e: e["source"].update(pid="1")),
        "null source value": edit(lambda e: e["source"].update(user=None)),
        "number source value": edit(lambda e: e["source"].update(user=7)),
        "no project": edit(lambda e: e["source"].pop("project")),
        "missing timestamp": edit(lambda e: e.pop("timestamp")),
        "missing event_id": edit(lambda e: e.pop("event_id")),
        "event_id not a uuid": edit(lambda e: e.update(event_id="abc")),
        "bad timestamp": edit(lambda e: e.update(timestamp="yesterday")),
        "empty batch_id": edit(lambda e: e.update(batch_id="")),
        "batch_id of 129": edit(lambda e: e.update(batch_id="b" * 129)),
        "job_id of 257": edit(lambda e: e.update(job_id="j" * 257)),
        "job_id not a string": edit(lambda e: e.update(job_id=5)),
        "data a list": edit(lambda e: e.update(data=[1])),
        "data null": edit(lambda e: e.update(data=None)),
        "event a list": [1, 2],
    }


@pytest.mark.parametrize("case", sorted(_invalid_events()))
def test_invalid_event_is_422(client, collector, case):
    event = _invalid_events()[case]
    for path, body in (("/api/events", event), ("/api/events/batch", {"events": [event]})):
        status, answer = client.post(path, body)
        assert status == 422, (path, answer)
        assert isinstance(answer["detail"], str)
    assert collector.event_count() == 0


@pytest.mark.parametrize("body", [
    b'{"events": [NaN]}', b"[Infinity]", b'{"a": -Infinity}', b"{not json", b"\xff\xfe",
    b'{"x": "\\ud800"}'])
def test_non_strict_json_is_422(client, body):
    for path in ("/api/events", "/api/events/batch"):
        status, answer = client.post(path, body, raw=True)
        assert status == 422 and "detail" in answer


def test_limits_at_the_edge_are_accepted(client):
    event = make_event("job_start", batch_id="b" * 128, job_id="j" * 256)
    assert client.post("/api/events", event)[0] == 200


@pytest.mark.parametrize("event_type", ["job_start", "job_epoch", "job_done", "job_failed",
                                        "log_line"])
def test_job_event_without_job_id_is_400(client, collector, event_type):
    status, answer = client.post("/api/events", make_event(event_type))
    assert status == 400 and "job_id" in answer["detail"]
    assert client.post("/api/events", make_event(event_type, job_id=""))[0] == 400
    assert collector.event_count() == 0


def test_env_snapshot_is_accepted_and_the_first_one_wins(client, collector):
    client.post("/api/events", make_event("env_snapshot", git_sha="aaa"))
    status, answer = client.post("/api/events", make_event("env_snapshot", git_sha="bbb"))
    assert (status, answer["deduplicated"]) == (200, False)
    assert collector.batches()[0]["env"] == {"git_sha": "aaa"}


# -- Batch and job state ----------------------------------------------------------------------

def test_second_batch_start_is_a_resume(client, collector):
    first = make_event("batch_start", experiment_type="forecast", n_total_jobs=2)
    client.post("/api/events", first)
    client.post("/api/events", make_event("batch_start", experiment_type="again",
                                          n_total_jobs=5))
    batch = collector.batches()[0]
    assert batch["started_at"] == first["timestamp"]
    assert (batch["experiment_type"], batch["n_total"], batch["status"]) == ("again", 5, "RUNNING")


def test_finished_batch_stays_finished_on_resume(client, collector):
    client.post("/api/events", make_event("batch_start"))
    done = make_event("batch_done", n_done=1, n_failed=0)
    client.post("/api/events", done)
    client.post("/api/events", make_event("batch_start", experiment_type="resumed"))
    batch = client.get("/api/batches/b1")[1]
    assert (batch["status"], batch["ended_at"]) == ("DONE", done["timestamp"])
    assert batch["experiment_type"] == "resumed"


def test_batch_failed_keeps_its_reason(client, collector):
    client.post("/api/events", make_event("batch_start"))
    client.post("/api/events", make_event("batch_failed", reason="SIGTERM"))
    assert client.get("/api/batches/b1")[1]["status"] == "FAILED"
    assert collector.batches()[0]["reason"] == "SIGTERM"


def test_job_lifecycle_and_epochs_are_readable(client, collector):
    client.post("/api/events/batch", {"events": [
        make_event("batch_start", n_total_jobs=2),
        make_event("job_start", job_id="j1", model="dlinear", dataset="etth1"),
        make_event("job_epoch", job_id="j1", epoch=2, train_loss=0.2, val_loss=0.3, lr=1e-3),
        make_event("job_epoch", job_id="j1", epoch=1, train_loss=0.5, extra={"k": [1]}),
        make_event("job_done", job_id="j1", status="DONE", metrics={"MSE": 0.4},
                   elapsed_s=12.5, train_epochs=2),
        make_event("job_start", job_id="j2", model="m2"),
        make_event("job_failed", job_id="j2", status="FAILED", reason="OOM", elapsed_s=1),
        make_event("log_line", job_id="j2", line="boom", level="error"),
        make_event("resource_snapshot", gpu_util_pct=90),
    ]})
    status, jobs = client.get("/api/batches/b1/jobs")
    assert status == 200 and jobs == collector.jobs("b1")
    j1, j2 = jobs
    assert (j1["job_id"], j1["status"], j1["model"], j1["dataset"]) == ("j1", "DONE", "dlinear",
                                                                       "etth1")
    assert (j1["metrics"], j1["elapsed_s"], j1["train_epochs"]) == ({"MSE": 0.4}, 12.5, 2)
    assert (j2["status"], j2["reason"]) == ("FAILED", "OOM")
    status, epochs = client.get("/api/batches/b1/jobs/j1/epochs")
    assert status == 200
    assert [(e["epoch"], e["train_loss"], e["val_loss"]) for e in epochs] == [
        (1, 0.5, None), (2, 0.2, 0.3)]
    assert epochs[0]["data"]["extra"] == {"k": [1]}
    assert client.get("/api/stats")[1] == {"events": 9, "batches": 1, "jobs": 2, "epochs": 2,
                                           "logs": 1, "resource_snapshots": 1, "artifacts": 0}


def test_odd_value_types_are_stored_not_rejected(client, collector):
    status, answer = client.post("/api/events", make_event(
        "job_epoch", job_id="j", epoch=10**30, train_loss={"a": 1}, lr="NaN"))
    assert (status, answer["accepted"]) == (200, True)
    assert collector.epochs("b1", "j")[0]["lr"] == "NaN"


def test_read_routes(client, collector):
    client.post("/api/events", make_event("batch_start", batch_id="b/with space"))
    status, batches = client.get("/api/batches")
    assert status == 200 and [b["batch_id"] for b in batches] == ["b/with space"]
    assert client.get("/api/batches/b%2Fwith%20space")[1]["batch_id"] == "b/with space"
    for path in ("/api/batches/nope", "/api/batches/nope/jobs", "/api/batches/nope/artifacts",
                 "/api/batches/nope/jobs/j/epochs"):
        assert client.get(path) == (404, {"detail": "batch not found"})


def test_unknown_route_is_404_and_wrong_method_405(client):
    assert client.get("/api/nothing")[0] == 404
    assert client.get("/")[0] == 404
    assert client.get("/api/events")[0] == 405
    assert client.request("PUT", "/api/batches/b1/stop", {})[0] == 405
    assert client.request("DELETE", "/api/events/batch")[0] == 405


# -- Stop requests ----------------------------------------------------------------------------

def test_stop_poll_is_404_until_the_batch_has_an_event(client):
    assert client.get("/api/batches/b1/stop-requested") == (404, {"detail": "batch not found"})
    assert client.post("/api/batches/b1/stop", {})[0] == 404


def test_stop_request_is_seen_by_the_poll(client, collector):
    client.post("/api/events", make_event("job_start", job_id="j1"))  # no batch_start needed
    assert client.get("/api/batches/b1/stop-requested") == (
        200, {"requested": False, "requested_at": None, "requested_by": None})
    status, answer = client.post("/api/batches/b1/stop", None)
    assert status == 200 and answer["requested"] is True
    status, answer = client.get("/api/batches/b1/stop-requested")
    assert answer["requested"] is True and answer["requested_by"] == "api"
    assert answer["requested_at"].endswith("Z") and len(answer["requested_at"]) == 24


def test_request_stop_from_python(client, collector):
    assert collector.request_stop("b1") is False
    client.post("/api/events", make_event("batch_start"))
    assert collector.request_stop("b1", requested_by="demo") is True
    assert client.get("/api/batches/b1/stop-requested")[1]["requested_by"] == "demo"


# -- Artifacts --------------------------------------------------------------------------------

def test_job_artifact_upload_stores_file_label_and_meta(client, collector):
    client.post("/api/events", make_event("job_start", job_id="j1"))
    content = bytes(range(256)) * 10 + b"\r\n--not-the-boundary\r\n"
    status, row = upload(client, "/api/jobs/j1/artifacts", {
        "file": ("model.pt", content), "label": "checkpoint", "meta": '{"epoch": 3}'})
    assert status == 201
    assert {k: row[k] for k in ("id", "batch_id", "job_id", "filename", "size", "label",
                                "meta")} == {
        "id": 1, "batch_id": "b1", "job_id": "j1", "filename": "model.pt",
        "size": len(content), "label": "checkpoint", "meta": {"epoch": 3}}
    assert row["path"] == os.path.join(collector.artifacts_dir, "b1", "j1", "model.pt")
    with open(row["path"], "rb") as file:
        assert file.read() == content
    assert client.get("/api/batches/b1/artifacts") == (200, [row])
    assert collector.artifacts("b1") == [row]


def test_artifact_before_job_start_is_404(client, collector):
    fields = {"file": ("a.txt", b"x")}
    assert upload(client, "/api/jobs/j1/artifacts", fields) == (404, {"detail": "job not found"})
    client.post("/api/events", make_event("job_epoch", job_id="j1", epoch=1))
    assert upload(client, "/api/jobs/j1/artifacts", fields)[0] == 404
    client.post("/api/events", make_event("job_start", job_id="j1"))
    assert upload(client, "/api/jobs/j1/artifacts", fields)[0] == 201


def test_artifact_goes_to_the_job_started_last(client, collector):
    client.post("/api/events", make_event("job_start", batch_id="old", job_id="j1"))
    client.post("/api/events", make_event("job_start", batch_id="new", job_id="j1"))
    assert upload(client, "/api/jobs/j1/artifacts", {"file": ("a", b"x")})[1]["batch_id"] == "new"


def test_batch_artifact_upload(client, collector):
    fields = {"file": ("notes.md", b"# hi")}
    assert upload(client, "/api/batches/b1/artifacts", fields)[0] == 404
    client.post("/api/events", make_event("batch_start"))
    status, row = upload(client, "/api/batches/b1/artifacts", fields)
    assert status == 201 and row["job_id"] is None and row["label"] is None
    assert row["path"] == os.path.join(collector.artifacts_dir, "b1", "_batch", "notes.md")


def test_artifact_names_cannot_escape_and_never_overwrite(client, collector):
    client.post("/api/events", make_event("job_start", batch_id="../..", job_id="../j"))
    paths = [upload(client, "/api/jobs/..%2Fj/artifacts",
                    {"file": ("../../etc/passwd", b"x")})[1]["path"] for _ in range(2)]
    root = os.path.realpath(collector.artifacts_dir)
    for path in paths:
        assert os.path.realpath(path).startswith(root + os.sep)
    assert paths[0] != paths[1] and os.path.basename(paths[1]) == "passwd-1"


@pytest.mark.parametrize("fields, detail", [
    ({"label": "no file"}, "file"),
    ({"file": ("a", b"x"), "meta": "[1]"}, "meta"),
    ({"file": ("a", b"x"), "meta": "{bad"}, "meta"),
])
def test_bad_artifact_form_is_422(client, fields, detail):
    client.post("/api/events", make_event("job_start", job_id="j1"))
    status, answer = upload(client, "/api/jobs/j1/artifacts", fields)
    assert status == 422 and detail in answer["detail"]


def test_artifact_that_is_not_multipart_is_422(client):
    client.post("/api/events", make_event("job_start", job_id="j1"))
    assert client.post("/api/jobs/j1/artifacts", {"file": "x"})[0] == 422


def test_artifact_over_the_file_cap_is_413_and_the_connection_lives(client, monkeypatch):
    monkeypatch.setattr(argus, "ARTIFACT_MAX_BYTES", 1000)
    client.post("/api/events", make_event("job_start", job_id="j1"))
    assert upload(client, "/api/jobs/j1/artifacts", {"file": ("a", b"x" * 1000)})[0] == 201
    status, answer = upload(client, "/api/jobs/j1/artifacts", {"file": ("a", b"x" * 1001)})
    assert status == 413 and "detail" in answer
    # A body far over the cap is drained, not cut off: the client reads its 413.
    monkeypatch.setattr(argus, "_COLLECTOR_FORM_OVERHEAD", 100)
    status, _ = upload(client, "/api/jobs/j1/artifacts", {"file": ("a", b"x" * 3_000_000)})
    assert status == 413
    assert client.get("/api/stats")[1]["artifacts"] == 1  # same keep-alive connection


def test_job_artifact_quota_is_413(client, monkeypatch):
    monkeypatch.setattr(argus, "ARTIFACT_MAX_JOB_BYTES", 1500)
    client.post("/api/events", make_event("job_start", job_id="j1"))
    assert upload(client, "/api/jobs/j1/artifacts", {"file": ("a", b"x" * 1000)})[0] == 201
    assert upload(client, "/api/jobs/j1/artifacts", {"file": ("b", b"x" * 501)})[0] == 413


def test_ingest_body_over_the_json_cap_is_413(client, monkeypatch):
    monkeypatch.setattr(argus, "_COLLECTOR_MAX_JSON_BYTES", 2000)
    events = [make_event("log_line", job_id="j", line="x" * 100) for _ in range(20)]
    assert client.post("/api/events/batch", {"events": events})[0] == 413
    assert client.post("/api/events/batch", {"events": events[:2]})[0] == 200


def test_artifacts_dir_defaults_to_a_temporary_folder(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # nothing left behind in /tmp
    with _Collector() as collector:
        c = Client(collector)
        c.post("/api/events", make_event("job_start", job_id="j1"))
        status, row = upload(c, "/api/jobs/j1/artifacts", {"file": ("a.txt", b"x")})
        assert status == 201 and os.path.isfile(row["path"])
        assert row["path"].startswith(collector.artifacts_dir)


# -- Server behaviour -------------------------------------------------------------------------

def test_keep_alive_survives_bad_requests(client):
    conn = client.conn
    assert client.post("/api/events", b"{", raw=True)[0] == 422
    assert client.get("/api/nothing")[0] == 404
    assert client.post("/api/events", make_event("batch_start"))[0] == 200
    assert client.conn is conn and conn.sock is not None


def test_bad_framing_is_answered_then_closed(collector):
    def exchange(raw):
        """Send raw bytes; the answer up to the server closing the connection."""
        with socket.create_connection(("127.0.0.1", collector.port), timeout=5) as sock:
            sock.sendall(raw)
            return b"".join(iter(lambda: sock.recv(4096), b""))

    head = b"POST /api/events HTTP/1.1\r\nHost: x\r\n"
    answer = exchange(head + b"Content-Length: nope\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400") and answer.endswith(b'"invalid Content-Length"}')
    answer = exchange(head + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 411")
    answer = exchange(b"GET / extra-word HTTP/1.1\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400")
    assert "detail" in json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert Client(collector).get("/api/stats")[0] == 200


def test_server_is_quiet(collector, capfd):
    c = Client(collector)
    c.post("/api/events", b"{", raw=True)
    c.post("/api/events", make_event("batch_start"))
    c.get("/nowhere")
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_concurrent_clients(collector):
    def send(n):
        c = Client(collector)
        for _ in range(20):
            c.post("/api/events", make_event("log_line", batch_id=f"b{n}", job_id="j", line="x"))

    threads = [threading.Thread(target=send, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert collector.event_count() == 160 and len(collector.batches()) == 8


def test_stop_cuts_keep_alive_connections(tmp_path):
    collector = _Collector().start()
    client = Client(collector)
    assert client.get("/api/stats")[0] == 200
    collector.stop()
    collector.stop()  # idempotent
    with pytest.raises((OSError, http.client.HTTPException)):
        client.get("/api/stats")
    with pytest.raises(OSError):
        Client(collector).get("/api/stats")
    assert collector.event_count() == 0  # still readable after stop


def test_serve_forever_runs_in_the_foreground_until_stopped():
    collector = _Collector()
    thread = threading.Thread(target=collector.serve_forever, daemon=True)
    thread.start()
    for _ in range(100):
        if collector.port:
            break
        threading.Event().wait(0.01)
    assert collector.url == f"http://127.0.0.1:{collector.port}"
    assert Client(collector).get("/api/stats")[0] == 200
    collector.stop()
    thread.join(timeout=5)
    assert not thread.is_alive()


def test_database_file_persists_between_collectors(tmp_path):
    db = str(tmp_path / "argus.db")
    with _Collector(db=db) as collector:
        Client(collector).post("/api/events", make_event("batch_start"))
    with _Collector(db=db) as collector:
        assert collector.event_count() == 1
        assert Client(collector).get("/api/batches/b1/stop-requested")[0] == 200




def test_a_response_is_not_delayed_by_nagle(monkeypatch):
    monkeypatch.setattr(BaseHTTPRequestHandler, "disable_nagle_algorithm", False)
    with _Collector() as collector:
        client = Client(collector)
        client.get("/api/stats")  # connected and warm
        start = time.perf_counter()
        for _ in range(10):
            assert client.get("/api/stats")[0] == 200
        elapsed = time.perf_counter() - start
    assert elapsed < 0.25, "10 keep-alive requests took %.3f s" % elapsed


def test_importing_argus_does_not_import_the_server_modules():
    code = (
        "import sys\n"
        "names = ('http.server', 'socketserver', 'sqlite3', 'tempfile')\n"
        "before = {m for m in names if m in sys.modules}\n"  # site may import tempfile
        "import argus\n"
        "print(sorted(m for m in names if m in sys.modules and m not in before))\n"
    )
    out = run_script(code, {})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# -- The SDK driving the collector --------------------------------------------------------------

def _png(path, size=200):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * size)
    return path


def _wait(predicate, timeout=5.0):
    end = time.monotonic() + timeout
    while not predicate() and time.monotonic() < end:
        time.sleep(0.01)
    return predicate()


def test_a_reporter_run_lands_in_the_collector(collector, tmp_path):
    plots = tmp_path / "plots"
    _png(plots / "batch.png", 300)
    with argus.Reporter(
        source_project="paper", experiment_type="forecast", n_total=2, monitor_url=collector.url,
        heartbeat=False, resource_snapshot=False, stop_polling=0.02, auto_upload_dirs=[plots],
    ) as r:
        with r.job("j1", model="dlinear", dataset="etth1") as job:
            for epoch in range(3):
                job.epoch(epoch, train_loss=1.0 / (epoch + 1), val_loss=0.5, lr=1e-3)
            job.log("done", level="WARNING")
            assert job.upload(_png(tmp_path / "curve.png", 100)) == 1
            job.metrics({"MSE": 0.4})
        assert r.flush(5.0)
        assert not r.stopped
        assert collector.request_stop(r.batch_id, requested_by="test")
        assert _wait(lambda: r.stopped), "the Reporter never saw the Stop request"
        with r.job("j2") as job:
            assert job.stopped
    batch = collector.batch(r.batch_id)
    assert (batch["status"], batch["experiment_type"], batch["n_total"], batch["project"]) == (
        "DONE", "forecast", 2, "paper")
    assert batch["stop_requested_by"] == "test"
    jobs = {j["job_id"]: j for j in collector.jobs(r.batch_id)}
    assert (jobs["j1"]["status"], jobs["j1"]["model"], jobs["j1"]["metrics"]) == (
        "DONE", "dlinear", {"MSE": 0.4})
    assert jobs["j1"]["train_epochs"] == 3 and jobs["j2"]["status"] == "DONE"
    epochs = collector.epochs(r.batch_id, "j1")
    assert [(e["epoch"], e["train_loss"], e["lr"]) for e in epochs] == [
        (0, 1.0, 1e-3), (1, 0.5, 1e-3), (2, 1.0 / 3, 1e-3)]
    artifacts = [(a["job_id"], a["filename"], a["size"]) for a in collector.artifacts(r.batch_id)]
    assert artifacts == [("j1", "curve.png", 108), (None, "batch.png", 308)]
    for artifact in collector.artifacts(r.batch_id):
        assert os.path.getsize(artifact["path"]) == artifact["size"]
    stats = collector.stats()
    assert (stats["logs"], stats["epochs"]) == (1, 3)
    assert stats["events"] == r._sender.delivered and r._sender.spill.spilled == 0


def test_events_sent_again_by_sync_are_deduplicated(collector, spill_dir, capsys):
    with argus.ExperimentReporter(collector.url, "p", batch_id="dup-1") as sender:
        sender.batch_start("demo", 1)
        for i in range(40):
            sender.log_line("j1", "line %d" % i)
    assert collector.event_count() == 41
    raws = [row["raw"] for row in collector._rows("SELECT raw FROM events ORDER BY id")]
    # A run that lost its acknowledgements spills what the server already stored.
    store = argus.SpillStore()
    store.append(raws)
    store.close()
    assert argus.main(["sync", "--url", collector.url]) == 0
    assert "41 event(s) sent" in capsys.readouterr().out  # deduplicated counts as delivered
    assert collector.event_count() == 41 and collector.stats()["logs"] == 40
    assert argus.SpillStore().backlog()["events"] == 0


def test_a_token_protected_collector_takes_only_its_token(tmp_path, spill_dir, capsys):
    with _Collector(token="em_live_collector_token") as collector:
        with argus.ExperimentReporter(collector.url, "p", auth_token="em_live_wrong_token",
                                      batch_id="tok-1") as sender:
            sender.batch_start("x", 1)
        assert collector.event_count() == 0
        assert argus.SpillStore().backlog()["events"] == 1  # refused: kept, not dead-lettered
        assert argus.main(["sync", "--url", collector.url, "--token", "em_live_wrong_token"]) == 1
        assert argus.main(["sync", "--url", collector.url,
                           "--token", "em_live_collector_token"]) == 0
        assert collector.batch("tok-1")["experiment_type"] == "x"


# -- `argus serve --rate-limit / --event-ms`: the real server's behaviour under load -------------


def test_a_rate_limited_collector_answers_429_with_retry_after_per_token(tmp_path):
    with _Collector(artifacts_dir=str(tmp_path / "a"), rate_limit=(2, 0.5)) as collector:
        alice, bob = Client(collector, token="alice"), Client(collector, token="bob")
        answers = [alice.post("/api/events", make_event("batch_start"))[0] for _ in range(3)]
        assert answers == [200, 200, 429]  # a burst of 2, then 0.5 a second
        alice.conn.request("POST", "/api/events", body=json.dumps(make_event("batch_start")),
                           headers={"Authorization": "Bearer alice", "Content-Type": "application/json"})
        response = alice.conn.getresponse()
        assert response.status == 429 and json.loads(response.read()) == {"detail": "Rate limit exceeded"}
        assert response.getheader("Retry-After") == "2"  # whole seconds until one request is back
        assert bob.post("/api/events", make_event("batch_start"))[0] == 200  # per token
        alice.conn.close()
        bob.conn.close()


def test_the_sdk_delivers_everything_to_a_slow_rate_limited_collector(tmp_path, monkeypatch):
    monkeypatch.setenv("ARGUS_SPILL_DIR", str(tmp_path / "spill"))
    with _Collector(artifacts_dir=str(tmp_path / "a"), event_ms=2, rate_limit=(3, 2)) as collector:
        with argus.Reporter(monitor_url=collector.url, token="t", batch_id="limited-1", heartbeat=False,
                            stop_polling=False, resource_snapshot=False, drain_timeout=20) as r:
            with r.job("j") as job:
                for i in range(300):
                    job.epoch(i, train_loss=1.0 / (i + 1))
        assert len(collector.epochs("limited-1", "j")) == 300
        assert collector.batch("limited-1")["status"] == "DONE"
    assert not list((tmp_path / "spill").glob("*.jsonl*"))
