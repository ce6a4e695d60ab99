"""Values the SDK cannot encode, answers it must not take for an acknowledgement, spill files
that belong to another server, replays interrupted or raced, and secrets on the command line.

- A value that cannot be converted costs that value (a marker) or that event (dead letter),
  never an exception in the training loop, and never the worker.
- An event counts as delivered only when the server acknowledged that event: a 200 whose
  body is not JSON, has no per-event ``results``, or lacks a result for an event, and a
  redirect turned into a GET, acknowledge nothing. On both transports.
- Spill files written for server A are left alone by a run against server B; ``argus sync``
  sends them to A.
- A killed ``argus sync`` orphans nothing, an empty ``.part`` file under a live writer is not
  deleted, and an upload whose answer comes late is stored once.

Each scenario prints one line (``pytest -s``): emitted / delivered / on disk / lost.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import argus
from conftest import (
    ROOT,
    FakeArgus,
    dead_letters,
    epochs,
    hold_artifacts,
    line,
    on_disk,
    validate_event,
    write_png,
)

QUIET = dict(heartbeat=False, stop_polling=False, resource_snapshot=False)

try:
    import requests  # noqa: F401

    TRANSPORTS = ["urllib", "requests"]
except ImportError:  # the stdlib-only test environment
    TRANSPORTS = ["urllib"]


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------


def letters(directory) -> list:
    return dead_letters(directory) if Path(directory).is_dir() else []


def sync(*args) -> tuple:
    """``argus sync ARGS`` in this process; returns (status, output)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        status = argus.main(["sync"] + list(args))
    return status, out.getvalue()


def run_script(script: Path, args: list, env: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    full_env = dict(os.environ)
    full_env.update(env)
    full_env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, str(script)] + args,
        env=full_env,
        cwd=str(script.parent),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# ---------------------------------------------------------------------------------------
# values that cannot be encoded
# ---------------------------------------------------------------------------------------


def deep_dict(depth: int) -> dict:
    root = node = {}
    for _ in range(depth):
        node["k"] = {}
        node = node["k"]
    return root


class BadRepr:
    def __repr__(self):
        raise RuntimeError("__repr__ refuses")

    __str__ = __repr__


def deep_bad_repr(depth: int = 20):
    value = BadRepr()
    for _ in range(depth):
        value = [value]
    return value


class BadFloat(float):
    def __float__(self):
        raise RuntimeError("__float__ refuses")


class BadStr(str):
    def __str__(self):
        raise RuntimeError("__str__ refuses")


class BadGetattr:
    def __getattr__(self, name):
        raise RuntimeError("no attribute lookups here (%s)" % name)


class BadItems(dict):
    def items(self):
        raise RuntimeError("items() refuses")


BAD_VALUES = {
    "dict nested 1000 deep": lambda: deep_dict(1000),
    "raising __repr__ nested 20 deep": deep_bad_repr,
    "float subclass with raising __float__": lambda: BadFloat(1.5),
    "str subclass with raising __str__": lambda: BadStr("text"),
    "__getattr__ raising RuntimeError": BadGetattr,
    "dict subclass with raising items()": lambda: BadItems(a=1),
}


@pytest.mark.parametrize("param", ["epoch", "train_loss", "val_loss", "lr", "batch_time_ms"])
def test_each_named_epoch_value_is_converted_on_the_callers_thread(param, fake, spill_dir):
    """job.epoch()'s fast path looks only at the type of each named value: anything but an
    int epoch and float values is still converted when the call is made. A list is copied
    then (changed after the call, the event keeps what it held), and a value that cannot
    be converted does not raise."""
    raised = []
    with argus.Reporter(monitor_url=fake.url, batch_id="named-1", **QUIET) as r:
        with r.job("train") as job:
            values = {"epoch": 0, "train_loss": 0.5, "val_loss": 0.6, "lr": 1e-3}
            held = [0.25]
            job.epoch(**dict(values, **{param: held}))
            held.append(99.0)  # after the call: the event has [0.25]
            try:
                job.epoch(**dict(values, **{param: BadFloat(1.5)}))
            except Exception as exc:
                raised.append(repr(exc)[:200])
    sent = [e["data"] for e in fake.events.values() if e["event_type"] == "job_epoch"]
    assert raised == []
    assert sent[0][param] == [0.25], sent
    assert len(sent) == 2 and type(sent[1][param]) in (str, float, int), sent


@pytest.mark.parametrize("kind", list(BAD_VALUES))
def test_a_value_that_cannot_be_converted_never_raises_into_the_training_loop(kind, fake, spill_dir):
    """Issue 10: six kinds of value raised out of job.epoch() into the training loop, and the
    event was lost. The call returns; the event arrives with a marker in place of the value,
    or is set aside in the dead-letter file; the events after it are delivered."""
    raised = []
    with argus.Reporter(monitor_url=fake.url, batch_id="values-1", **QUIET) as r:
        with r.job("train") as job:
            job.epoch(0, train_loss=0.5)
            try:
                job.epoch(1, train_loss=0.4, value=BAD_VALUES[kind]())
            except Exception as exc:  # what the training loop would have seen
                raised.append(repr(exc)[:200])
            for i in range(2, 7):
                job.epoch(i, train_loss=0.3)
    delivered = list(fake.events.values())
    bad = [e for e in delivered if e["event_type"] == "job_epoch" and e["data"]["epoch"] == 1]
    dead = [d for d in letters(spill_dir) if isinstance(d["event"], dict)]
    line(kind, emitted=11, delivered=len(delivered), dead_letter=len(dead),
         lost=11 - len(delivered) - len(dead), raised=raised)
    assert raised == []
    assert epochs(delivered, "train") in ([0, 1, 2, 3, 4, 5, 6], [0, 2, 3, 4, 5, 6])
    if bad:
        assert "value" in bad[0]["data"]  # a marker in its place, not silently gone
    else:
        assert [d["event"]["data"]["epoch"] for d in dead] == [1]
    assert len(delivered) + len(dead) == 11  # batch_start, job_start, 7 epochs, job_done, batch_done


def test_an_int_over_4300_digits_costs_at_most_its_own_event(fake, spill_dir):
    """Issue 10: an int over 4,300 digits (Python 3.11+ refuses to print it) killed the
    worker (ValueError), and the events taken with it were lost, even after sync."""
    raised = []
    with argus.Reporter(monitor_url=fake.url, batch_id="bigint-1", **QUIET) as r:
        with r.job("train") as job:
            for i in range(100):
                try:
                    job.epoch(i, train_loss=0.1, big=10**5000 if i == 50 else i)
                except Exception as exc:
                    raised.append(repr(exc)[:200])
        r.emit("log_line", job_id="train", line="the worker still delivers")
    if on_disk(spill_dir):
        sync("--url", fake.url)
    delivered = list(fake.events.values())
    dead = [d for d in letters(spill_dir) if isinstance(d["event"], dict)]
    line("int of 5001 digits", emitted=105, delivered=len(delivered), dead_letter=len(dead),
         lost=105 - len(delivered) - len(dead))
    assert raised == []
    assert set(epochs(delivered, "train")) | {d["event"]["data"].get("epoch") for d in dead} == set(range(100))
    assert len(delivered) + len(dead) == 105
    assert len(delivered) >= 104  # at most the one event is set aside
    assert [e["data"]["line"] for e in delivered if e["event_type"] == "log_line"] == ["the worker still delivers"]


BIG_INT_HANGING = """
import argus
with argus.Reporter(batch_id="bigint-2", heartbeat=False, stop_polling=False, resource_snapshot=False) as r:
    with r.job("train") as job:
        r.flush(0.5)  # the worker now waits on the server: what follows stays queued until exit
        for i in range(5):
            job.epoch(i, big=10**5000 if i == 2 else i)
print("after the block", flush=True)
"""


def test_an_int_over_4300_digits_at_exit_against_a_server_that_never_answers_raises_nothing(fake, spill_dir, tmp_path):
    """Issue 10: when the server hung, the int's ValueError escaped __exit__."""
    fake.script = ["hang"] * 100
    script = tmp_path / "train.py"
    script.write_text(BIG_INT_HANGING)
    proc = run_script(script, [], {"ARGUS_URL": fake.url})
    kept = list(on_disk(spill_dir).values())
    dead = [d for d in letters(spill_dir) if isinstance(d["event"], dict)]
    line("int of 5001 digits at exit, server hangs", emitted=9, delivered=0, on_disk=len(kept),
         dead_letter=len(dead), lost=9 - len(kept) - len(dead), rc=proc.returncode)
    assert proc.returncode == 0 and "after the block" in proc.stdout, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(kept) + len(dead) == 9
    assert sorted(epochs(kept, "train") + [d["event"]["data"].get("epoch") for d in dead]) == [0, 1, 2, 3, 4]


# ---------------------------------------------------------------------------------------
# answers that acknowledge nothing
# ---------------------------------------------------------------------------------------


class Ingest:
    """An Argus ingest behind something that sometimes answers in its place.

    ``odd`` holds the answers still to give instead of the real one, one per request that
    they apply to: "html" (a proxy's login page with 200, on both routes), "no-results" (200
    ``{"status": "ok"}`` on the batch route) and "partial" (on the batch route, only every
    other event stored and given a result). What is answered oddly is not stored.
    """

    def __init__(self, httpserver, odd=()):
        from werkzeug.wrappers import Response

        self.Response = Response
        self.odd = list(odd)
        self.events = {}
        self.duplicates = 0
        self.lock = threading.Lock()
        httpserver.expect_request("/api/events", method="POST").respond_with_handler(self.handle)
        httpserver.expect_request("/api/events/batch", method="POST").respond_with_handler(self.handle)
        self.url = httpserver.url_for("/").rstrip("/")

    def _store(self, events):
        with self.lock:
            for event in events:
                validate_event(event)
                if event["event_id"] in self.events:
                    self.duplicates += 1
                self.events[event["event_id"]] = event

    def handle(self, request):
        batch = request.path.endswith("/batch")
        body = json.loads(request.get_data())
        events = body["events"] if batch else [body]
        with self.lock:
            odd = self.odd[0] if self.odd and (batch or self.odd[0] == "html") else None
            if odd:
                self.odd.pop(0)
        if odd == "html":
            return self.Response("<html><body>Please log in</body></html>", 200, content_type="text/html")
        if odd == "no-results":
            return self.Response(json.dumps({"status": "ok"}), 200, content_type="application/json")
        if odd == "partial":
            events = events[::2]
        if odd == "list-status":  # nothing stored; each result's status is not a string
            results = [{"event_id": e["event_id"], "status": ["accepted"]} for e in events]
            return self.Response(json.dumps({"results": results}), 200, content_type="application/json")
        self._store(events)
        if not batch:
            answer = {"accepted": True, "event_id": 1, "deduplicated": False}
        else:
            results = [{"event_id": e["event_id"], "status": "accepted", "db_id": 1, "error": None} for e in events]
            answer = {"accepted": len(events), "rejected": 0, "results": results}
        return self.Response(json.dumps(answer), 200, content_type="application/json")


@pytest.mark.parametrize("durable", [False, True], ids=["memory", "durable"])
@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("odd", ["html", "no-results", "partial", "list-status"])
def test_a_200_that_acknowledges_no_event_keeps_the_events(httpserver, spill_dir, monkeypatch, caplog, odd, transport,
                                                           durable):
    """Issue 10: a 200 whose body is not JSON, or has no per-event results, counted as
    delivered: 200 of 200 were lost with nothing printed, on both transports. (An event
    missing from a partial ``results`` list must stay pending too.)"""
    monkeypatch.setenv("ARGUS_TRANSPORT", transport)
    monkeypatch.setattr(argus, "RETRY_BASE_S", 0.01)  # the retries after each odd answer, quickly
    caplog.set_level("ERROR", logger="argus")
    server = Ingest(httpserver, [odd] * 3)
    with argus.Reporter(monitor_url=server.url, batch_id="odd-1", durable=durable, **QUIET) as r:
        with r.job("train") as job:
            for i in range(200):
                job.epoch(i)
    in_run, waiting = len(server.events), len(on_disk(spill_dir))
    assert "delivery worker hit an error" not in caplog.text  # an odd answer is no fault
    if waiting:
        sync("--url", server.url)
    stored = list(server.events.values())
    line("200 %s via %s" % (odd, transport), emitted=204, delivered=len(stored), delivered_in_run=in_run,
         on_disk_after_run=waiting, lost=204 - len(stored))
    assert epochs(stored, "train") == list(range(200))
    assert len(stored) == 204
    assert server.odd == []  # (the test's own check: every odd answer was given)


@pytest.mark.parametrize(
    "status, transport", [(302, t) for t in TRANSPORTS] + ([(301, "requests")] if "requests" in TRANSPORTS else [])
)
def test_a_redirect_to_a_page_answering_200_keeps_the_events(httpserver, spill_dir, monkeypatch, status, transport):
    """Issue 10: a 301/302 that `requests` turned into a GET answered 200 lost every event.
    A redirect that changes the method is not followed, and acknowledges nothing."""
    from werkzeug.wrappers import Response

    monkeypatch.setenv("ARGUS_TRANSPORT", transport)
    moved = {"on": True, "gets": 0}
    real = Ingest(httpserver)

    def ingest(request):
        if moved["on"]:
            return Response("", status, headers={"Location": "/login"})
        return real.handle(request)

    def login(request):
        moved["gets"] += 1
        return Response(json.dumps({"status": "ok"}), 200, content_type="application/json")

    httpserver.clear()
    httpserver.expect_request("/api/events", method="POST").respond_with_handler(ingest)
    httpserver.expect_request("/api/events/batch", method="POST").respond_with_handler(ingest)
    httpserver.expect_request("/login").respond_with_handler(login)
    with argus.Reporter(monitor_url=real.url, batch_id="moved-1", **QUIET) as r:
        with r.job("train") as job:
            for i in range(20):
                job.epoch(i)
    waiting = len(on_disk(spill_dir))
    moved["on"] = False  # the URL is fixed
    sync("--url", real.url)
    stored = list(real.events.values())
    line("%d redirect via %s" % (status, transport), emitted=24, on_disk_after_run=waiting,
         delivered=len(stored), lost=24 - len(stored), login_gets=moved["gets"])
    assert waiting == 24  # nothing was taken for delivered while the URL redirected
    assert epochs(stored, "train") == list(range(20)) and len(stored) == 24


# ---------------------------------------------------------------------------------------
# spill files belong to their server
# ---------------------------------------------------------------------------------------

RUN_A = """
import argus
with argus.Reporter(batch_id="run-a", heartbeat=False, stop_polling=False, resource_snapshot=False) as r:
    with r.job("train") as job:
        for i in range(10):
            job.epoch(i)
"""


def test_spill_files_for_server_a_are_left_alone_by_a_run_against_b_and_synced_to_a(fake, spill_dir, tmp_path, monkeypatch):
    """Issue 10: spill files did not record where they were going; a later run against
    another server replayed them there, under that server's token: run A's batch appeared
    on server B."""
    server_a, server_b = fake, FakeArgus()
    try:
        server_a.script = [503] * 100_000  # A is down during its run: its events go to disk
        script = tmp_path / "train.py"
        script.write_text(RUN_A)
        proc = run_script(script, [], {"ARGUS_URL": server_a.url, "ARGUS_TOKEN": "token-of-a-0123456789"})
        assert proc.returncode == 0, proc.stderr[-2000:]
        spilled_a = len(on_disk(spill_dir))
        with server_a.lock:
            server_a.script.clear()

        # run B, in the same spill directory, against another server with another token
        monkeypatch.setenv("ARGUS_TOKEN", "token-of-b-9876543210")
        with argus.Reporter(monitor_url=server_b.url, batch_id="run-b", **QUIET) as r:
            with r.job("other") as job:
                job.epoch(0)
        on_b = sorted({e["batch_id"] for e in server_b.events.values()})
        left_for_a = len(on_disk(spill_dir))

        # `argus sync` with A's token and no URL: each file goes to the server it was for
        monkeypatch.setenv("ARGUS_TOKEN", "token-of-a-0123456789")
        monkeypatch.delenv("ARGUS_URL", raising=False)
        status, out = sync()
        on_a = [e for e in server_a.events.values() if e["batch_id"] == "run-a"]
        line("spill for A, run against B", emitted_a=14, on_disk_after_a=spilled_a, on_b=on_b,
             left_for_a=left_for_a, synced_to_a=len(on_a), sync_status=status)
        assert spilled_a == 14
        assert on_b == ["run-b"] and len(server_b.events) == 5  # nothing of run A reached B
        assert left_for_a == 14
        assert status == 0, out
        assert epochs(on_a, "train") == list(range(10)) and len(on_a) == 14
        assert on_disk(spill_dir) == {}
    finally:
        server_b.close()


# ---------------------------------------------------------------------------------------
# replays interrupted or raced
# ---------------------------------------------------------------------------------------


def test_a_killed_argus_sync_orphans_no_pending_uploads(fake, spill_dir, tmp_path, monkeypatch):
    """Issue 10: a killed `argus sync` left `pending-uploads.jsonl.sync-<pid>`, which nothing
    read again: the offline run's uploads were never sent."""
    png = write_png(tmp_path / "plots" / "curve.png")
    monkeypatch.setenv("ARGUS_OFFLINE", "1")
    with argus.Reporter(batch_id="offline-up-1", **QUIET) as r:
        with r.job("train") as job:
            job.epoch(0)
            job.upload(png)
    monkeypatch.delenv("ARGUS_OFFLINE")
    arrived, release = hold_artifacts(fake, monkeypatch, first=1, store=False)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "argus", "sync", "--url", fake.url], env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        assert arrived.wait(30)  # the killed sync was uploading
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        release.set()
        if proc.poll() is None:
            proc.kill()
    status, out = sync("--url", fake.url)
    leftovers = sorted(p.name for p in spill_dir.iterdir() if p.name.startswith("pending-uploads"))
    line("argus sync killed mid-upload", uploads=1, stored=len(fake.artifacts), leftovers=leftovers,
         events=len(fake.events))
    assert [a["filename"] for a in fake.artifacts] == ["curve.png"]
    assert leftovers == []  # nothing orphaned that no later sync would read
    assert status == 0, out


def test_an_empty_part_file_under_a_live_writer_is_not_deleted(fake, spill_dir):
    """Issue 10: claim_next deleted an empty `.part` file older than 60 s without asking
    whether its writer (which holds its lock) was alive."""
    import fcntl

    spill_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = spill_dir / ("spill-%020d-%d-%s.jsonl.part" % (time.time_ns() - 120 * 10**9, os.getpid(), "0a1b2c"))
    fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a live writer, as the SDK's are
        old = time.time() - 120
        os.utime(str(path), (old, old))  # a long quiet spell: nothing written for 2 minutes
        sync("--url", fake.url)
        exists = path.exists()
        line("empty .part under a live writer", exists_after_sync=exists)
        assert exists
    finally:
        os.close(fd)


def test_an_upload_whose_answer_comes_after_the_timeout_is_stored_once(fake, tmp_path, monkeypatch):
    """Issue 10: an upload retried after a timeout was stored three times (the server had
    stored the first try; only its answer was late)."""
    png = write_png(tmp_path / "plots" / "curve.png")
    handler = fake.server.RequestHandlerClass
    original = handler._artifact

    def stored_then_late(self, raw):
        answer = self._answer

        def late(*args, **kwargs):
            time.sleep(1.5)  # stored already; the answer leaves after the client's 0.5 s
            return answer(*args, **kwargs)

        self._answer = late
        return original(self, raw)

    monkeypatch.setattr(handler, "_artifact", stored_then_late)
    sender = argus.ExperimentReporter(fake.url, "late", timeout=0.5, batch_id="late-1")
    try:
        sender.job_start("train")
        sender.job_artifact("train", png)
    finally:
        sender.close(2.0)
    copies = [a for a in fake.artifacts if a["filename"] == "curve.png"]
    line("upload answered after the timeout", uploads=1, stored=len(copies))
    assert len(copies) == 1


# ---------------------------------------------------------------------------------------
# secrets on the command line
# ---------------------------------------------------------------------------------------

SECRETS = {
    "password in a URL": ("--db", "postgresql://alice:S3cret@db/runs", "S3cret"),
    "--auth": ("--auth", "AUTHSECRET1", "AUTHSECRET1"),
    "--wandb-key": ("--wandb-key", "WANDBSECRET2", "WANDBSECRET2"),
    "-p": ("-p", "PSECRET3", "PSECRET3"),
    "the configured token": ("--argus", "plain-token-TOKSECRET4", "TOKSECRET4"),
}


def test_secrets_on_the_command_line_never_reach_the_server(fake, spill_dir, tmp_path):
    """Issue 10: the recorded command line kept `postgresql://alice:S3cret@db`, `--auth X`,
    `--wandb-key X`, `-p X`, and the configured token itself when it is not em_live_...;
    it goes to the server with every event."""
    script = tmp_path / "train.py"
    script.write_text(
        "import argus\n"
        "with argus.Reporter(heartbeat=False, stop_polling=False, resource_snapshot=False) as r:\n"
        "    with r.job('train') as job:\n"
        "        job.epoch(0)\n"
    )
    args = [arg for option, value, _ in SECRETS.values() for arg in (option, value)]
    proc = run_script(script, args, {"ARGUS_URL": fake.url, "ARGUS_TOKEN": "plain-token-TOKSECRET4"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    sent = json.dumps(list(fake.events.values()))
    leaked = [name for name, (_, _, secret) in SECRETS.items() if secret in sent]
    command = list(fake.events.values())[0]["source"].get("command", "")
    line("secrets on the command line", events=len(fake.events), leaked=leaked, command=command)
    assert len(fake.events) == 5
    assert leaked == []
    assert "train.py" in command and "--wandb-key" in command  # the command is still there


# --- a batch split to find a bad event ----------------------------------------------------


def test_a_batch_split_after_a_422_sends_nothing_after_a_half_that_was_not_delivered(fake, spill_dir, monkeypatch):
    """A 422 for a batch splits it in halves to find the bad event. When the first half
    then fails (the server goes down), the second half must wait with it: sent alone, it
    would be stored first, and a job_done before its job_start leaves the job RUNNING."""
    monkeypatch.setattr(argus, "RETRY_BASE_S", 0.01)
    fake.script = [422] + [503] * argus.RETRY_ATTEMPTS  # the batch, then every try of its first half
    with argus.Reporter(monitor_url=fake.url, batch_id="split-1", **QUIET) as r:
        with r.job("j") as job:
            for i in range(10):
                job.epoch(i)
    first_run = [(e["event_type"], e["data"].get("epoch")) for e in fake.events.values()]
    assert argus.main(["sync", "--url", fake.url]) == 0  # what the run kept, sent now
    arrived = [(e["event_type"], e["data"].get("epoch")) for e in fake.events.values()]
    line("422 split, first half down", emitted=len(arrived), first_run=len(first_run),
         delivered=len(fake.events), on_disk=len(on_disk(spill_dir)))
    assert arrived == [("batch_start", None), ("job_start", None)] + [("job_epoch", i) for i in range(10)] + [
        ("job_done", None), ("batch_done", None)]
    assert [n for _, _, n in fake.requests[:2]] == [-422, -503]  # the split happened as scripted
    assert not on_disk(spill_dir)


def test_events_a_batch_answer_left_unacknowledged_are_retried_in_the_order_sent(fake, spill_dir, monkeypatch):
    """The answer to [job_start, epoch 0] has no result for job_start and an "internal"
    rejection for epoch 0: both are retried, and job_start must still go first (the retry
    sent [epoch 0, job_start], and the job's epoch was stored before its start)."""
    fake.reject = lambda event: "internal: database busy" if len(fake.requests) <= 1 else None
    handler = fake.server.RequestHandlerClass
    real_answer = handler._answer

    def answer(self, status, payload, headers=None):
        if isinstance(payload, dict) and "results" in payload and len(fake.requests) == 1:
            payload = dict(payload, results=payload["results"][1:])  # job_start's result left out
        return real_answer(self, status, payload, headers)

    monkeypatch.setattr(handler, "_answer", answer)
    facade = argus.ExperimentReporter(fake.url, "partial", batch_id="partial-1")
    facade.job_start("j")
    facade.job_epoch("j", 0, train_loss=0.5)
    assert facade.flush(15)
    facade.close(5)
    assert [e["event_type"] for e in fake.events.values()] == ["job_start", "job_epoch"], fake.requests
