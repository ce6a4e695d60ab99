"""Artifact uploads: ordering after job_start, file selection, the multipart form, the size
cap, batch artifacts (``auto_upload_dirs``) and what happens when the server cannot take them.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
import time

import pytest

import argus
from conftest import refused_url, serve_ingest, wait_until


def quiet_reporter(url, **kwargs):
    kwargs.setdefault("heartbeat", False)
    kwargs.setdefault("stop_polling", False)
    kwargs.setdefault("resource_snapshot", False)
    return argus.Reporter(monitor_url=url, **kwargs)


def write(path, data=b"\x89PNG\r\n\x1a\n fake image bytes"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def form_parts(artifact) -> dict:
    """name -> (part headers, content) of a multipart/form-data body the fake recorded."""
    boundary = artifact["content_type"].split("boundary=", 1)[1].encode()
    body = artifact["body"]
    assert body.startswith(b"--" + boundary + b"\r\n") and body.endswith(b"\r\n--" + boundary + b"--\r\n")
    parts = {}
    for chunk in body.split(b"--" + boundary)[1:-1]:
        head, _, content = chunk[2:].partition(b"\r\n\r\n")
        assert content.endswith(b"\r\n")
        name = re.search(rb'name="([^"]*)"', head).group(1).decode()
        parts[name] = (head.decode("utf-8"), content[:-2])
    return parts


def strict_json(raw: bytes):
    def refuse(name):
        raise ValueError("not strict JSON: %s" % name)

    return json.loads(raw, parse_constant=refuse)


def messages(caplog, level=logging.INFO) -> list:
    return [r.getMessage() for r in caplog.records if r.name == "argus" and r.levelno >= level]


def sent(fake) -> list:
    return [(a["kind"], a["id"], a["filename"]) for a in fake.artifacts]


# ---------------------------------------------------------------------------------------
# Ordering: an upload leaves after the events queued before it
# ---------------------------------------------------------------------------------------


def test_upload_right_after_job_start_is_accepted_by_a_server_that_404s_unknown_jobs(fake, tmp_path):
    plot = write(tmp_path / "loss.png")
    with quiet_reporter(fake.url) as r:
        for job_id in ("etth1", "etth2"):
            with r.job(job_id) as job:
                assert job.upload(plot) == 1  # the very next call after job_start
    assert sent(fake) == [("jobs", "etth1", "loss.png"), ("jobs", "etth2", "loss.png")]
    head, content = form_parts(fake.artifacts[0])["file"]
    assert content == plot.read_bytes()
    assert 'name="file"; filename="loss.png"' in head and "Content-Type: image/png" in head


def test_the_fake_server_does_answer_404_for_a_job_it_has_not_stored(fake, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="argus")
    plot = write(tmp_path / "loss.png")
    with argus.ExperimentReporter(fake.url, "p") as sender:
        assert sender.job_artifact("never-started", plot) is None
    assert fake.artifacts == []
    assert messages(caplog) == ["argus: upload of %s failed: HTTP 404 job not found" % plot]


def test_upload_after_an_outage_waits_for_the_replayed_job_start(fake, tmp_path, monkeypatch):
    monkeypatch.setattr(argus, "RETRY_BASE_S", 0.001)  # the five failed tries take no time
    monkeypatch.setattr(argus, "RETRY_MAX_S", 0.1)  # ... and the server is probed again 0.1 s later
    plot = write(tmp_path / "b.png")
    # Five 503s: everything below is spilled. Then the first replay request (500 events, the
    # spill's first chunk) is slow, and the upload is queued while it is in flight; job
    # "b"'s job_start is in the second chunk.
    fake.script = [503] * 5 + [("sleep", 0.3)]
    with argus.ExperimentReporter(fake.url, "p") as sender:
        sender.job_start("a")
        for epoch in range(600):
            sender.job_epoch("a", epoch, train_loss=0.5)
        sender.job_start("b")
        assert fake.wait_for(lambda: not fake.script, 10)  # the slow replay request has begun
        record = sender.job_artifact("b", plot)
    assert len(fake.events) == 602
    assert record is not None and sent(fake) == [("jobs", "b", "b.png")]


# ---------------------------------------------------------------------------------------
# Which files: glob and extension rules
# ---------------------------------------------------------------------------------------


@pytest.fixture
def plots(tmp_path):
    root = tmp_path / "plots"
    for name in ("a.png", "b.jpg", "c.jpeg", "d.pdf", "e.svg", "f.txt", "sub/h.png", "sub/i.csv", "sub/x/j.svg"):
        write(root / name, name.encode())
    return root


def test_job_upload_default_glob_takes_png_files_at_every_depth(fake, plots):
    with quiet_reporter(fake.url) as r:
        with r.job("j") as job:
            assert job.upload(plots) == 2
    assert sorted(a["filename"] for a in fake.artifacts) == ["a.png", "h.png"]


def test_job_upload_glob_and_extension_rules(fake, plots, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="argus")
    write(plots / "g.PNG", b"upper case")
    with quiet_reporter(fake.url) as r:
        with r.job("j") as job:
            assert job.upload(plots, glob="*") == 6  # f.txt is left out
            assert "argus: 1 file(s) under %s skipped: only .png/.jpg/.jpeg/.pdf/.svg are uploaded" % plots in messages(
                caplog
            )
            assert job.upload(plots, glob="**/*.svg") == 2
            assert job.upload(plots, glob="**/*.csv") == 0
            assert job.upload(plots / "c.jpeg", glob="**/*.png") == 1  # a file: the glob does not apply
            assert job.upload(plots / "f.txt") == 0
            assert job.upload(tmp_path / "missing") == 0
    assert "argus: %s does not exist; nothing uploaded" % (tmp_path / "missing") in messages(caplog)
    names = [a["filename"] for a in fake.artifacts]
    assert names == ["a.png", "b.jpg", "c.jpeg", "d.pdf", "e.svg", "g.PNG", "e.svg", "j.svg", "c.jpeg"]
    types = {a["filename"]: form_parts(a)["file"][0].rsplit("Content-Type: ", 1)[1] for a in fake.artifacts}
    assert types == {
        "a.png": "image/png",
        "b.jpg": "image/jpeg",
        "c.jpeg": "image/jpeg",
        "d.pdf": "application/pdf",
        "e.svg": "image/svg+xml",
        "g.PNG": "image/png",
        "j.svg": "image/svg+xml",
    }


def test_jpeg_is_an_allowed_extension(fake, tmp_path):
    photo = write(tmp_path / "sample.jpeg", b"\xff\xd8\xff\xe0 jpeg")
    assert ".jpeg" in argus.ARTIFACT_EXTENSIONS
    with quiet_reporter(fake.url) as r:
        with r.job("j") as job:
            assert job.upload(photo) == 1
    head, content = form_parts(fake.artifacts[0])["file"]
    assert 'filename="sample.jpeg"' in head and "Content-Type: image/jpeg" in head
    assert content == b"\xff\xd8\xff\xe0 jpeg"


# ---------------------------------------------------------------------------------------
# The multipart form
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["urllib", "requests"])
def test_multipart_form_carries_file_label_and_meta(fake, tmp_path, monkeypatch, transport):
    if transport == "requests":
        pytest.importorskip("requests")
    monkeypatch.setenv("ARGUS_TRANSPORT", transport)
    curve = write(tmp_path / "curve.svg", b"<svg xmlns='http://www.w3.org/2000/svg'/>\r\n--not-a-boundary\r\n")
    with argus.ExperimentReporter(fake.url, "p") as sender:
        sender.job_start("j")
        record = sender.job_artifact("j", curve, label="loss curve \u2014 val", meta={"epoch": 3, "tags": ("a", "b")})
        bare = sender.job_artifact("j", curve)
    assert sender.transport_name == transport
    assert record == {"id": 1, "filename": "curve.svg"} and bare == {"id": 2, "filename": "curve.svg"}
    parts = form_parts(fake.artifacts[0])
    assert list(parts) == ["label", "meta", "file"]
    assert parts["label"][1].decode("utf-8") == "loss curve \u2014 val"
    assert strict_json(parts["meta"][1]) == {"epoch": 3, "tags": ["a", "b"]}
    assert parts["file"][1] == curve.read_bytes()
    assert list(form_parts(fake.artifacts[1])) == ["file"]  # no label, no meta: no empty parts


def test_multipart_body_length_matches_what_it_streams(tmp_path):
    path = write(tmp_path / 'odd "name" \u00e9.png', os.urandom(200_000))
    body = argus._MultipartBody(str(path), {"label": "x", "meta": '{"a":1}'})
    data = b"".join(body)
    assert len(body) == len(data)
    assert body.content_type == "multipart/form-data; boundary=" + body.boundary
    assert b'filename="odd _name_ \xc3\xa9.png"' in data  # quotes cannot end the header value
    artifact = {"content_type": body.content_type, "body": data}
    assert form_parts(artifact)["file"][1] == path.read_bytes()


def test_meta_with_a_nan_still_uploads_the_file(fake, tmp_path):
    plot = write(tmp_path / "loss.png")
    with argus.ExperimentReporter(fake.url, "p") as sender:
        sender.job_start("j")
        record = sender.job_artifact("j", plot, meta={"epoch": 3, "val_loss": float("nan")})
    assert record is not None
    meta = strict_json(form_parts(fake.artifacts[0])["meta"][1])
    assert meta == {"epoch": 3, "val_loss": None, "nonfinite": {"val_loss": "NaN"}}


def test_offline_meta_with_an_infinity_is_still_recorded_for_sync(fake, tmp_path, monkeypatch, spill_dir):
    monkeypatch.setenv("ARGUS_OFFLINE", "1")
    plot = write(tmp_path / "loss.png")
    with argus.ExperimentReporter(fake.url, "p") as sender:
        assert sender.job_artifact("j", plot, meta={"best": float("inf")}) is None  # offline: recorded
    lines = (spill_dir / "pending-uploads.jsonl").read_text().splitlines()
    assert [strict_json(line)["meta"] for line in lines] == [{"best": None, "nonfinite": {"best": "Infinity"}}]


# ---------------------------------------------------------------------------------------
# The size cap
# ---------------------------------------------------------------------------------------


def test_a_file_of_exactly_the_cap_is_uploaded_and_one_byte_over_is_not(fake, tmp_path, monkeypatch, caplog):
    assert argus.ARTIFACT_MAX_BYTES == 50 * 1024 * 1024  # the server's per-file cap
    # The cap is lowered to 1000 bytes here so that the test writes 2 kB instead of 100 MB;
    # _upload reads the module attribute at call time.
    monkeypatch.setattr(argus, "ARTIFACT_MAX_BYTES", 1000)
    caplog.set_level(logging.WARNING, logger="argus")
    folder = tmp_path / "figs"
    at_cap = write(folder / "at_cap.png", b"a" * 1000)
    over = write(folder / "over_cap.png", b"o" * 1001)
    write(folder / "small.png", b"s")
    with quiet_reporter(fake.url) as r:
        with r.job("j") as job:
            assert job.upload(folder) == 2  # the count of files the server took
            assert job.upload(over) == 0
    assert sorted(a["filename"] for a in fake.artifacts) == ["at_cap.png", "small.png"]
    stored = [a for a in fake.artifacts if a["filename"] == "at_cap.png"][0]
    assert form_parts(stored)["file"][1] == at_cap.read_bytes()
    capped = [m for m in messages(caplog) if "cap; not uploaded" in m]
    assert len(capped) == 2 and all(m.startswith("argus: %s is " % over) for m in capped)


# ---------------------------------------------------------------------------------------
# Batch artifacts: auto_upload_dirs and servers without the route
# ---------------------------------------------------------------------------------------


def test_auto_upload_dirs_sends_the_folders_files_as_batch_artifacts_on_a_clean_exit(fake, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="argus")
    figs = tmp_path / "figs"
    for name in ("a.png", "notes.md", "deep/b.pdf", "deep/c.jpeg", "deep/d.csv"):
        write(figs / name, name.encode())
    more = write(tmp_path / "more" / "e.svg", b"<svg/>").parent
    with quiet_reporter(fake.url, auto_upload_dirs=[figs, str(more), tmp_path / "absent"]) as r:
        with r.job("j"):
            pass
        assert fake.artifacts == []  # at exit, not before
    assert sent(fake) == [("batches", r.batch_id, n) for n in ("a.png", "b.pdf", "c.jpeg", "e.svg")]
    assert fake.of_type("batch_done")
    assert "argus: %s does not exist; nothing uploaded" % (tmp_path / "absent") in messages(caplog)


def test_auto_upload_dirs_takes_a_single_path_and_is_skipped_when_the_batch_fails(fake, tmp_path):
    figs = tmp_path / "figs"
    write(figs / "a.png")
    with quiet_reporter(fake.url, auto_upload_dirs=str(figs)) as r:
        pass
    assert sent(fake) == [("batches", r.batch_id, "a.png")]
    with pytest.raises(KeyError):
        with quiet_reporter(fake.url, auto_upload_dirs=figs) as failing:
            raise KeyError("boom")
    assert [a["id"] for a in fake.artifacts] == [r.batch_id]
    assert [e["batch_id"] for e in fake.of_type("batch_failed")] == [failing.batch_id]


def _serve_ingest(httpserver, artifact_handler):
    """pytest-httpserver as an Argus server: ingest accepted, artifact routes by ``artifact_handler``."""
    url = serve_ingest(httpserver)
    httpserver.expect_request(re.compile(r"^/api/(jobs|batches)/[^/]+/artifacts$"), method="POST").respond_with_handler(
        artifact_handler
    )
    return url


def test_a_server_without_batch_artifacts_is_logged_once(httpserver, tmp_path, caplog, monkeypatch):
    from werkzeug.wrappers import Response

    monkeypatch.setattr(argus, "_logged_once", set())
    caplog.set_level(logging.WARNING, logger="argus")
    hits = []

    def artifacts(request):
        hits.append(request.path)
        return Response('{"detail": "Not Found"}', 404)

    url = _serve_ingest(httpserver, artifacts)
    figs = tmp_path / "figs"
    for name in ("a.png", "b.png", "c.pdf"):
        write(figs / name)
    with quiet_reporter(url, auto_upload_dirs=figs, batch_id="no-batch-artifacts") as r:
        assert r._sender.batch_artifact(figs / "a.png") is None
    assert hits == ["/api/batches/no-batch-artifacts/artifacts"] * 4
    assert [m for m in messages(caplog) if "artifact" in m] == [
        "argus: this server has no batch artifacts (404 on /api/batches/no-batch-artifacts/artifacts); "
        "batch files are not uploaded"
    ]


@pytest.mark.parametrize(
    "answers, uploaded, logged",
    [
        ([503, 201], True, None),
        ([(429, {"Retry-After": "0.2"}), 201], True, None),
        ([413], False, "HTTP 413 file too large"),
        ([500, 502, 503], False, "HTTP 503 unavailable"),
    ],
)
def test_upload_retries_5xx_and_429_and_gives_up_on_413(
    httpserver, tmp_path, caplog, monkeypatch, answers, uploaded, logged
):
    from werkzeug.wrappers import Response

    monkeypatch.setattr(argus, "RETRY_BASE_S", 0.001)
    caplog.set_level(logging.WARNING, logger="argus")
    script = list(answers)
    times = []

    def artifacts(request):
        times.append(time.monotonic())
        answer = script.pop(0)
        status, headers = answer if isinstance(answer, tuple) else (answer, {})
        if status == 201:
            return Response('{"id": 7}', 201)
        detail = "file too large" if status == 413 else "unavailable"
        return Response(json.dumps({"detail": detail}), status, headers)

    url = _serve_ingest(httpserver, artifacts)
    plot = write(tmp_path / "p.png")
    with argus.ExperimentReporter(url, "p") as sender:
        record = sender.job_artifact("j", plot)
    assert script == [] and len(times) == len(answers)
    assert (record == {"id": 7}) is uploaded and (record is None) is not uploaded
    if isinstance(answers[0], tuple):
        assert times[1] - times[0] >= 0.18  # Retry-After was waited out
    assert messages(caplog) == ([] if logged is None else ["argus: upload of %s failed: %s" % (plot, logged)])


# ---------------------------------------------------------------------------------------
# When the server cannot take uploads
# ---------------------------------------------------------------------------------------


def test_uploads_while_the_server_is_unreachable_are_recorded_for_sync(tmp_path, monkeypatch, caplog, spill_dir):
    monkeypatch.setattr(argus, "RETRY_BASE_S", 0.001)  # reach "unreachable" without the real backoff
    caplog.set_level(logging.WARNING, logger="argus")
    plot = write(tmp_path / "p.png")
    dead = refused_url()
    start = time.monotonic()
    with quiet_reporter(dead) as r:
        with r.job("j") as job:
            assert job.upload(plot) == 0
    assert time.monotonic() - start < 5
    assert "argus: the server is unreachable; upload of %s recorded for `python3 -m argus sync`" % plot in messages(
        caplog
    )
    pending = [json.loads(line) for line in (spill_dir / "pending-uploads.jsonl").read_text().splitlines()]
    assert [(e["path"], e["route"], e["why"]) for e in pending] == [(str(plot), "/api/jobs/j/artifacts", "server unreachable")]
    # A first contact that is an upload (nothing spilled to replay first): the connection is
    # refused, so it never reached the server: retried, then recorded too.
    other = tmp_path / "empty-spill"
    with argus.ExperimentReporter(dead, "p", spill_path=other) as sender:
        assert sender.job_artifact("j", plot) is None
    assert any(m.startswith("argus: upload of %s failed (connection refused); recorded" % plot) for m in messages(caplog))
    assert len((other / "pending-uploads.jsonl").read_text().splitlines()) == 1


def test_offline_mode_records_uploads_for_sync_instead_of_sending(fake, tmp_path, monkeypatch, spill_dir):
    monkeypatch.setenv("ARGUS_OFFLINE", "1")
    plot = write(tmp_path / "p.png", b"12345")
    with quiet_reporter(fake.url) as r:
        with r.job("j 1") as job:
            assert job.upload(plot) == 0  # nothing was uploaded (yet)
    assert fake.artifacts == [] and fake.requests == []
    lines = (spill_dir / "pending-uploads.jsonl").read_text().splitlines()
    entry = json.loads(lines[0])
    assert len(lines) == 1
    assert (entry["path"], entry["size"], entry["route"]) == (str(plot), 5, "/api/jobs/j%201/artifacts")
    assert entry["label"] is None and entry["meta"] is None


def test_uploads_without_a_server_or_after_close_return_nothing(fake, tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.WARNING, logger="argus")
    monkeypatch.setattr(argus, "_logged_once", set())
    plot = write(tmp_path / "p.png")
    with argus.Reporter(heartbeat=False, stop_polling=False, resource_snapshot=False) as r:  # no URL
        with r.job("j") as job:
            assert job.upload(plot) == 0
    sender = argus.ExperimentReporter(fake.url, "p")
    sender.close()
    assert sender.job_artifact("j", plot) is None
    assert any(
        m.startswith("argus: an upload of %s after the Reporter of batch" % plot) and "is not sent" in m
        for m in messages(caplog)
    )
    with pytest.raises(RuntimeError, match="context manager"):
        argus.Reporter(monitor_url=fake.url).job("j").upload(plot)


# -- uploads and flushes queued while the run is in disk mode -----------------------------


def test_an_upload_queued_during_the_linger_while_disk_mode_begins_is_uploaded(fake, spill_dir, tmp_path, monkeypatch):
    """The worker waits out the linger; meanwhile the program queues an upload, and the guard
    writes the queue to disk (disk mode on). At the end of the wait, what queued goes to
    disk: the upload must stay queued for its turn, not be taken with the events and
    dropped (job_artifact then waited out its timeout, and nothing was uploaded)."""
    monkeypatch.setattr(argus, "UPLOAD_WAIT_S", 8.0)
    png = write(tmp_path / "plot.png")
    facade = argus.ExperimentReporter(fake.url, "linger", batch_id="linger-1")
    worker, raced, result = facade.worker, [], {}

    class Linger(threading.Event):  # the worker's wait in _pacing, with the race inside it
        def wait(self, timeout=None):
            if sys._getframe(1).f_code.co_name == "_pacing" and not raced:
                raced.append(1)
                uploading = threading.Thread(target=lambda: result.update(art=facade.job_artifact("j", png)))
                uploading.start()
                result["thread"] = uploading
                assert wait_until(lambda: any(type(i) is argus._Upload for i in facade._queue), 5)
                with worker._lock:  # the guard, for an event a second old
                    worker._journal_locked()
                return super().wait(0)
            return super().wait(timeout)

    worker._stop_evt = Linger()
    facade.job_start("j")
    facade.job_epoch("j", 0, train_loss=0.5)
    assert wait_until(lambda: raced, 10)
    result["thread"].join(15)
    assert facade.flush(5)
    facade.close(5)
    assert result.get("art") is not None and len(fake.artifacts) == 1
    assert [e["event_type"] for e in fake.events.values()] == ["job_start", "job_epoch"]
    assert worker._controls == 0


def test_a_second_upload_queued_while_the_backlog_replays_before_the_first_is_uploaded(fake, spill_dir, tmp_path, monkeypatch):
    """Disk mode, an upload at the head of the queue: its events on disk are replayed first.
    Meanwhile the program queues an event and a second upload. The event follows the
    backlog through disk; the second upload must keep its place behind it (it was taken
    with the event and dropped)."""
    monkeypatch.setattr(argus, "UPLOAD_WAIT_S", 8.0)
    png = write(tmp_path / "plot.png")
    facade = argus.ExperimentReporter(fake.url, "replay", batch_id="replay-1")
    worker, replayer, result = facade.worker, facade.replayer, {}
    assert wait_until(lambda: replayer._replay_due is None, 10)  # the start's look at old spill files

    def upload(name):
        thread = threading.Thread(target=lambda: result.update({name: facade.job_artifact("j", png, label=name)}))
        thread.start()
        return thread

    real_once, raced = replayer._replay_once, []

    def replay_once(**kwargs):
        if not raced:
            raced.append(1)
            facade.job_epoch("j", 1, train_loss=0.5)  # the program, meanwhile
            result["second thread"] = upload("second")
            assert wait_until(lambda: len(facade._queue) == 2, 5)
        return real_once(**kwargs)

    monkeypatch.setattr(replayer, "_replay_once", replay_once)
    with worker._lock:  # the guard wrote the events before the first upload to disk
        facade.job_start("j")
        facade.job_epoch("j", 0, train_loss=0.5)
        first = upload("first")
        assert wait_until(lambda: any(type(i) is argus._Upload for i in facade._queue), 5)
        worker._journal_locked()
    first.join(15)
    result["second thread"].join(15)
    facade.close(5)
    assert result.get("first") is not None and result.get("second") is not None
    assert len(fake.artifacts) == 2 and worker._controls == 0
    assert [(e["event_type"], e["data"].get("epoch")) for e in fake.events.values()] == [
        ("job_start", None), ("job_epoch", 0), ("job_epoch", 1)]
