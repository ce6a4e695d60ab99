"""The command line (`python -m argus`, `python argus.py`, the `argus` script) and offline mode.

Every command runs at least once in a subprocess, as users run it; the variations run
in-process through ``argus.main`` to keep the suite fast.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

import argus
from conftest import ROOT, dead_letters, free_port, refused_url, run_script, spilled_events

ARGUS_PY = ROOT / "argus.py"
COMMANDS = ("sync", "status", "emit", "batch-id", "serve", "stop", "demo")
TOKEN = "em_live_0123456789abcdefSECRET"
SUMMARY = re.compile(
    r"^argus sync: (\d+) event\(s\) sent, (\d+) upload\(s\) sent; (\d+) event\(s\) left in (.+), "
    r"(\d+) rejected \(in deadletter\.jsonl\)$"
)


def cli(*args, env=None, entry="module", timeout=60, **kwargs) -> subprocess.CompletedProcess:
    """Run the command line in a fresh interpreter, as ``python -m argus`` or ``python argus.py``."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    full_env["PYTHONPATH"] = str(ROOT)
    command = [sys.executable, "-m", "argus"] if entry == "module" else [sys.executable, str(ARGUS_PY)]
    return subprocess.run(
        command + [str(a) for a in args], env=full_env, capture_output=True, text=True, timeout=timeout, **kwargs
    )


def summary(stdout: str) -> tuple:
    """(sent, uploads sent, left, rejected) from the last line of `argus sync`."""
    match = SUMMARY.match(stdout.strip().splitlines()[-1])
    assert match, stdout
    sent, uploads, left, _directory, rejected = match.groups()
    return int(sent), int(uploads), int(left), int(rejected)


def spill(n: int, batch_id: str = "b-spill", directory=None) -> list:
    """Write ``n`` valid log_line events to a closed spill file; return their event ids."""
    sender = argus.ExperimentReporter(None, "p", batch_id=batch_id, _worker=False)
    pairs = [
        sender._encode(("log_line", batch_id, "j", time.time(), {"line": "l", "level": "info", "i": i}, 0))
        for i in range(n)
    ]
    store = argus.SpillStore(directory)
    store.append([line for _, line in pairs])
    store.close()
    return [event_id for event_id, _ in pairs]


def start(args, env=None) -> subprocess.Popen:
    """Start ``python args...`` in the background, with SIGINT raising KeyboardInterrupt in it
    even where this test process inherited SIGINT ignored (a background job, nohup)."""
    full_env = dict(os.environ, PYTHONPATH=str(ROOT))
    full_env.update(env or {})
    return subprocess.Popen(
        [sys.executable] + list(args), env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def interrupt(proc: subprocess.Popen, timeout: float = 20) -> tuple:
    """Ctrl-C: SIGINT, then (stdout, stderr); a process that does not end is killed."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise


def dead_url() -> str:
    return refused_url()


@pytest.fixture
def fast_retries(monkeypatch):
    """Retries of a dead server in milliseconds instead of 0.5 + 1 + 2 + 4 s."""
    monkeypatch.setattr(argus, "RETRY_BASE_S", 0.001)


# -- Entry points, --help and exit statuses -----------------------------------------------------


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        argus.main([command, "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("usage: argus %s" % command)


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        argus.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in COMMANDS:
        assert re.search(r"^\s+%s\s" % command, out, re.M), command
    with pytest.raises(SystemExit) as exit_info:
        argus.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == "argus-reporter %s\n" % argus.__version__


@pytest.mark.parametrize("argv", [[], ["nonsense"], ["stop"], ["emit", "batch_start"], ["sync", "--watch", "x"]])
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        argus.main(argv)
    assert exit_info.value.code == 2
    assert "usage: argus" in capsys.readouterr().err


@pytest.mark.parametrize("entry", ["module", "script"])
def test_python_m_argus_and_python_argus_py_run_the_same_cli(entry):
    out = cli("batch-id", "--project", "paper", "--experiment", "sweep", "--git-sha", "abc123", entry=entry)
    assert out.returncode == 0, out.stderr
    assert out.stdout == argus.derive_batch_id("paper", "sweep", "abc123") + "\n"
    if entry == "module":
        bad = cli("--no-such-option", entry=entry)
        assert bad.returncode == 2 and "usage: argus" in bad.stderr


def _console_script_of_this_checkout():
    script = shutil.which("argus")
    if script is None:
        return None
    with open(script, "rb") as f:
        shebang = f.readline()
    if not shebang.startswith(b"#!"):
        return None
    python = shebang[2:].decode(errors="replace").split()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    try:
        found = subprocess.run(
            python + ["-c", "import argus; print(argus.__file__)"],
            env=env, cwd=str(Path(script).parent), capture_output=True, text=True, timeout=30,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    if not found or not os.path.exists(found):
        return None
    same = os.path.realpath(found) == os.path.realpath(ARGUS_PY)
    return script if same or Path(found).read_bytes() == ARGUS_PY.read_bytes() else None


def test_the_console_script_runs_the_same_cli():
    script = _console_script_of_this_checkout()
    if script is None:
        pytest.skip("no `argus` console script from this checkout on PATH")
    out = subprocess.run([script, "batch-id", "--new", "--prefix", "cs"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert re.fullmatch(r"cs-[0-9a-f]{12}\n", out.stdout)
    bad = subprocess.run([script, "nonsense"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2


# -- Offline mode and `argus sync` ----------------------------------------------------------------

OFFLINE_RUN = """
import logging, os, argus
logging.basicConfig(level=logging.INFO, format="%(message)s")
os.makedirs("plots")
with open(os.path.join("plots", "summary.png"), "wb") as f:
    f.write(b"s" * 300)
with argus.Reporter(source_project="offline", experiment_type="e", n_total=2, batch_id="off-1",
                    heartbeat=False, resource_snapshot=False, stop_polling=0.01,
                    auto_upload_dirs=["plots"]) as r:
    for name in ("j1", "j2"):
        with r.job(name, model="m") as job:
            for epoch in range(25):
                job.epoch(epoch, train_loss=1.0 / (epoch + 1))
            job.log("done " + name)
            with open(name + ".png", "wb") as f:
                f.write(b"x" * 100)
            print("uploaded now:", job.upload(name + ".png"))
            job.metrics({"MSE": 0.1})
"""


def test_an_offline_run_then_sync_delivers_everything_exactly_once(fake, spill_dir, tmp_path):
    run = run_script(OFFLINE_RUN, {"ARGUS_OFFLINE": "1", "ARGUS_URL": fake.url})
    assert run.returncode == 0, run.stderr
    assert fake.requests == [] and fake.artifacts == []  # no network at all, not even the stop poll
    assert run.stderr.count("Stop button is not polled") == 1
    assert run.stdout.count("uploaded now: 0") == 2  # recorded for sync, not sent

    waiting = spilled_events(spill_dir)
    assert Counter(e["event_type"] for e in waiting) == {
        "batch_start": 1, "job_start": 2, "job_epoch": 50, "log_line": 2, "job_done": 2, "batch_done": 1,
    }
    assert len({e["event_id"] for e in waiting}) == len(waiting) == 58
    pending = [json.loads(line) for line in (spill_dir / "pending-uploads.jsonl").read_text().splitlines()]
    assert sorted((Path(p["path"]).name, p["size"], p["route"]) for p in pending) == [
        ("j1.png", 100, "/api/jobs/j1/artifacts"),
        ("j2.png", 100, "/api/jobs/j2/artifacts"),
        ("summary.png", 300, "/api/batches/off-1/artifacts"),
    ]
    (tmp_path / "j2.png").unlink()  # gone before sync: dropped with a message

    out = cli("sync", "--url", fake.url)
    assert out.returncode == 0, out.stderr
    assert summary(out.stdout) == (len(waiting), 2, 0, 0)
    assert len(out.stdout.splitlines()) == 1 and "\r" not in out.stderr  # no terminal: no progress
    assert "argus sync: %s no longer exists; upload dropped" % (tmp_path / "j2.png") in out.stderr.splitlines()
    assert set(fake.events) == {e["event_id"] for e in waiting} and fake.duplicates == 0
    assert all(fake.events[e["event_id"]] == e for e in waiting)  # sent as they were spilled
    assert sorted((a["kind"], a["id"], a["filename"]) for a in fake.artifacts) == [
        ("batches", "off-1", "summary.png"),
        ("jobs", "j1", "j1.png"),
    ]
    assert spilled_events(spill_dir) == []
    assert not (spill_dir / "pending-uploads.jsonl").exists()

    requests = len(fake.requests)
    assert argus.main(["sync", "--url", fake.url]) == 0  # nothing left: nothing sent
    assert len(fake.requests) == requests and len(fake.artifacts) == 2


def test_argus_mode_offline_spills_everything_and_records_uploads(fake, spill_dir, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("ARGUS_MODE", "offline")
    monkeypatch.setattr(argus, "_logged_once", set())  # once per process: forget earlier tests
    caplog.set_level("INFO", logger="argus")
    png = tmp_path / "curve.png"
    png.write_bytes(b"p" * 64)
    with argus.Reporter(
        monitor_url=fake.url, batch_id="mode-1", heartbeat=False, resource_snapshot=False, stop_polling=0.01
    ) as r:
        with r.job("j") as job:
            job.epoch(0, train_loss=1.0)
            assert job.upload(png) == 0
    assert fake.requests == [] and not r.stopped
    assert [e["event_type"] for e in spilled_events(spill_dir)].count("job_epoch") == 1
    assert caplog.text.count("Stop button is not polled") == 1
    pending = json.loads((spill_dir / "pending-uploads.jsonl").read_text())
    assert (pending["path"], pending["size"], pending["route"]) == (str(png), 64, "/api/jobs/j/artifacts")


WRITER = """
import os, sys, time, argus
sender = argus.ExperimentReporter(None, "conc", batch_id="conc-1", queue_size=1000000)
i, deadline = 0, time.monotonic() + 30
while not os.path.exists("stop-writing") and time.monotonic() < deadline:
    for _ in range(10):
        sender.log_line("j", "line", i=i)
        i += 1
    time.sleep(0.01)
sender.close()
print(i, sender.spill.spilled, sender.spill.dropped)
"""


def test_sync_next_to_a_running_writer_delivers_each_event_once(fake, spill_dir, tmp_path):
    writer = start(["-c", WRITER], {"ARGUS_OFFLINE": "1", "ARGUS_SPILL_ROTATE_S": "0.1"})
    watcher = start(["-m", "argus", "sync", "--url", fake.url, "--watch", "0.05"])
    try:
        # A second replayer in this process, one-shot passes while the writer writes.
        deadline = time.monotonic() + 20
        while len(fake.events) < 300 and writer.poll() is None and time.monotonic() < deadline:
            argus.main(["sync", "--url", fake.url])
            time.sleep(0.02)
        assert len(fake.events) >= 300, "nothing was synced while the writer ran"
        assert writer.poll() is None, writer.communicate()
        (tmp_path / "stop-writing").touch()
        out, err = writer.communicate(timeout=30)
        assert writer.returncode == 0, err
        written, spilled, dropped = map(int, out.split())
        assert written == spilled and dropped == 0
        # Every file acknowledged and deleted: the interrupt below finds the watcher idle.
        assert fake.wait_for(lambda: len(fake.events) >= written and not list(spill_dir.glob("spill-*")), 20)
    finally:
        if writer.poll() is None:  # only when the test failed
            interrupt(writer)
        out, err = interrupt(watcher)
    assert watcher.returncode == 0, err  # interrupted with nothing left
    assert summary(out)[2:] == (0, 0)
    assert fake.duplicates == 0
    assert sorted(e["data"]["i"] for e in fake.events.values()) == list(range(written))
    assert spilled_events(spill_dir) == [] and dead_letters(spill_dir) == []


def test_sync_stops_at_a_failing_server_and_keeps_exactly_the_rest(fake, spill_dir, fast_retries, capsys):
    ids = spill(1200)
    fake.script = [None] + [503] * argus.RETRY_ATTEMPTS  # the 2nd chunk of 500 fails for good
    assert argus.main(["sync", "--url", fake.url]) == 1
    assert summary(capsys.readouterr().out) == (500, 0, 700, 0)
    assert set(fake.events) == set(ids[:500])
    assert sorted(e["event_id"] for e in spilled_events(spill_dir)) == sorted(ids[500:])

    assert argus.main(["sync", "--url", fake.url]) == 0
    assert summary(capsys.readouterr().out) == (700, 0, 0, 0)
    assert set(fake.events) == set(ids) and fake.duplicates == 0


def test_sync_against_a_dead_server_leaves_the_spill_alone(spill_dir, fast_retries, capsys):
    ids = spill(30)
    assert argus.main(["sync", "--url", dead_url()]) == 1
    assert summary(capsys.readouterr().out) == (0, 0, 30, 0)
    assert sorted(e["event_id"] for e in spilled_events(spill_dir)) == sorted(ids)


def test_sync_without_a_url_is_a_usage_error(spill_dir, capsys):
    spill(3)
    assert argus.main(["sync"]) == 2
    assert "--url" in capsys.readouterr().err
    assert len(spilled_events(spill_dir)) == 3


def test_sync_sets_rejected_events_aside(fake, spill_dir, capsys):
    ids = spill(10)
    fake.reject = lambda event: "bad value" if event["data"]["i"] in (3, 7) else None
    assert argus.main(["sync", "--url", fake.url]) == 0  # set aside, not left
    assert summary(capsys.readouterr().out) == (8, 0, 0, 2)
    assert set(fake.events) == set(ids) - {ids[3], ids[7]}
    assert sorted(d["event"]["data"]["i"] for d in dead_letters(spill_dir)) == [3, 7]


def test_sync_takes_a_dead_writers_open_file_but_not_a_live_one(fake, spill_dir, capsys):
    dead_ids = spill(4)
    for path in spill_dir.glob("spill-*.jsonl"):  # as a killed process leaves it
        path.rename(str(path) + ".part")
    live = argus.SpillStore()
    live.append([argus.ExperimentReporter(None, "p", _worker=False)._encode(
        ("batch_start", "live-1", None, time.time(), {}, 0))[1]])  # open and locked (flock) by `live`
    assert argus.main(["sync", "--url", fake.url]) == 1  # the live file is left
    assert summary(capsys.readouterr().out) == (4, 0, 1, 0)
    assert set(fake.events) == set(dead_ids)
    live.close()
    assert argus.main(["sync", "--url", fake.url]) == 0
    assert len(fake.events) == 5 and fake.duplicates == 0


def test_sync_removes_the_rewrite_a_killed_sync_left_half_written(fake, spill_dir, capsys):
    """A sync killed while it rewrote a file it had partly sent leaves ``<file>.tmp`` (the
    file itself is whole). Nothing read it or removed it: 14-33 MB each in a review."""
    ids = spill(3)
    (path,) = spill_dir.glob("spill-*.jsonl")
    stale = Path(str(path) + ".tmp")
    stale.write_text(path.read_text()[:50])
    assert argus.main(["sync", "--url", fake.url]) == 0
    assert set(fake.events) == set(ids)
    assert not stale.exists() and not list(spill_dir.glob("spill-*"))


def test_sync_dir_and_dry_run(fake, spill_dir, tmp_path, capsys):
    other = tmp_path / "elsewhere"
    spill(7, directory=str(other))
    argus.SpillStore(str(other)).record_upload({"path": str(tmp_path / "x.png"), "size": 1, "route": "/r"})
    spill(2)
    assert argus.main(["sync", "--dry-run", "--url", fake.url, "--dir", str(other)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("argus sync --dry-run: 7 event(s) in 1 file(s) (")
    assert out.rstrip().endswith("1 pending upload(s) in %s" % other)
    assert fake.requests == []
    assert argus.main(["sync", "--url", fake.url, "--dir", str(other)]) == 0
    assert summary(capsys.readouterr().out) == (7, 0, 0, 0)
    assert len(spilled_events(spill_dir)) == 2  # the default directory was not touched


def test_sync_dry_run_needs_no_server(spill_dir, capsys):
    spill(3)
    assert argus.main(["sync", "--dry-run"]) == 0
    assert "3 event(s) in 1 file(s)" in capsys.readouterr().out


def test_an_interrupted_sync_keeps_its_pending_uploads(fake, spill_dir, tmp_path, monkeypatch, capsys):
    png = tmp_path / "curve.png"
    png.write_bytes(b"p" * 10)
    fake.jobs_started.add("j")
    argus.SpillStore().record_upload({"path": str(png), "size": 10, "route": "/api/jobs/j/artifacts"})

    def ctrl_c(self, upload):
        raise KeyboardInterrupt

    upload = argus._Sender._upload
    monkeypatch.setattr(argus._Sender, "_upload", ctrl_c)
    assert argus.main(["sync", "--url", fake.url, "--watch", "60"]) == 1  # something is left
    assert argus.SpillStore().backlog()["pending_uploads"] == 1
    monkeypatch.setattr(argus._Sender, "_upload", upload)
    assert argus.main(["sync", "--url", fake.url]) == 0
    assert [a["filename"] for a in fake.artifacts] == ["curve.png"]


def test_sync_shows_progress_on_a_terminal(fake, spill_dir, capsys):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    spill(600)
    terminal = Terminal()
    # Swapped back inside the test, while capsys's stream is still open: a monkeypatch
    # would restore that stream after capsys closed it, and with -s every later test
    # would find sys.stderr closed.
    with contextlib.redirect_stderr(terminal):
        assert argus.main(["sync", "--url", fake.url]) == 0
    progress = terminal.getvalue()
    assert progress.startswith("\rargus sync: 500 sent (") and "\rargus sync: 600 sent (" in progress
    assert progress.endswith("\n")
    assert summary(capsys.readouterr().out) == (600, 0, 0, 0)


# -- `argus status` ------------------------------------------------------------------------------


def _prepare_backlog(spill_dir):
    spill(3)
    spill(2)
    store = argus.SpillStore()
    store.dead_letter([("{}", 422, "bad")])
    store.record_upload({"path": "/nowhere.png", "size": 1, "route": "/api/jobs/j/artifacts"})
    files = sorted(spill_dir.glob("spill-*.jsonl"))
    return len(files), sum(f.stat().st_size for f in files), min(f.stat().st_mtime for f in files)


def test_status_json_resolves_configuration_redacts_the_token_and_checks_the_server(fake, spill_dir):
    files, nbytes, oldest = _prepare_backlog(spill_dir)
    out = cli("status", "--json", env={"ARGUS_URL": fake.url, "ARGUS_TOKEN": TOKEN, "ARGUS_TRANSPORT": "urllib"})
    assert out.returncode == 0, out.stderr
    assert TOKEN not in out.stdout + out.stderr and "SECRET" not in out.stdout
    report = json.loads(out.stdout)
    assert report["version"] == argus.__version__
    assert (report["url"], report["url_source"]) == (fake.url, "environment (ARGUS_URL)")
    assert (report["token"], report["token_source"]) == ("em_live_…ET", "environment (ARGUS_TOKEN)")
    assert (report["transport"], report["transport_source"]) == ("urllib", "environment (ARGUS_TRANSPORT)")
    assert (report["spill_dir"], report["spill_dir_source"]) == (str(spill_dir), "environment (ARGUS_SPILL_DIR)")
    assert report["offline"] is False and report["disabled"] is False
    backlog = report["backlog"]
    assert (backlog["files"], backlog["events"], backlog["bytes"]) == (files, 5, nbytes)
    assert (backlog["dead_letter"], backlog["pending_uploads"]) == (1, 1)
    assert backlog["oldest"] == argus._format_ts(oldest)
    assert report["server"]["answer"] == "ok" and "token accepted" in report["server"]["detail"]
    assert fake.events == {}  # the probe stores nothing


def test_status_text_shows_each_value_and_its_source(fake, spill_dir, capsys):
    _prepare_backlog(spill_dir)
    assert argus.main(["status", "--url", fake.url, "--token", TOKEN, "--dir", str(spill_dir)]) == 0
    out = capsys.readouterr().out
    assert TOKEN not in out
    rows = {line.split()[0]: line for line in out.splitlines()}
    assert fake.url in rows["url"] and "(argument)" in rows["url"]
    assert "em_live_…ET" in rows["token"] and "(argument)" in rows["token"]
    assert "(argument)" in rows["spill"]
    assert "5 event(s) in 2 file(s)" in rows["backlog"]
    assert "1 event(s)" in rows["dead"] and re.search(r"server\s+ok\b", rows["server"])


@pytest.mark.parametrize("token", ["short", "em_live_1234", ""])
def test_status_never_shows_a_short_token(token, capsys, monkeypatch):
    monkeypatch.setenv("ARGUS_OFFLINE", "1")
    argus.main(["status", "--json", "--url", "http://127.0.0.1:9", "--token", token])
    report = json.loads(capsys.readouterr().out)
    assert report["token"] in (None, "…", "em_live_…")  # no character of the secret part
    secret = token[len("em_live_"):] if token.startswith("em_live_") else token
    if secret:
        assert secret not in json.dumps(report, ensure_ascii=False)


def test_status_reports_a_refused_token_and_a_dead_server(capsys):
    with argus._Collector(token=TOKEN) as collector:
        assert argus.main(["status", "--json", "--url", collector.url, "--token", "em_live_wrong"]) == 1
        assert json.loads(capsys.readouterr().out)["server"]["answer"] == "token refused"
        assert argus.main(["status", "--json", "--url", collector.url, "--token", TOKEN]) == 0
        assert json.loads(capsys.readouterr().out)["server"]["answer"] == "ok"
    assert argus.main(["status", "--json", "--url", dead_url()]) == 1
    assert json.loads(capsys.readouterr().out)["server"]["answer"] == "unreachable"


def test_status_offline_probes_nothing(fake, monkeypatch, capsys):
    monkeypatch.setenv("ARGUS_OFFLINE", "1")
    assert argus.main(["status", "--json", "--url", fake.url]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["offline"] is True and report["server"] is None
    assert fake.requests == []


def test_status_finds_the_url_in_monitor_yaml(fake, tmp_path, capsys):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "monitor.yaml").write_text("url: %s  # local\n" % fake.url)
    assert argus.main(["status", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["url"], report["url_source"]) == (fake.url, os.path.join("configs", "monitor.yaml"))
    assert (report["token"], report["token_source"]) == (None, "default")


# -- `argus emit` ---------------------------------------------------------------------------------


def test_emit_sends_one_event_with_json_values(fake):
    out = cli(
        "emit", "job_epoch", "epoch=3", "train_loss=0.25", "note=hello world", 'tags=["a", 1]', 'quoted="7"',
        "flag=true", "nothing=null", "expr=1+1",
        "--batch-id", "emit-1", "--job-id", "j1", "--project", "slurm", "--url", fake.url,
    )
    assert out.returncode == 0, out.stderr
    (event,) = fake.events.values()
    assert out.stdout == event["event_id"] + "\n"
    assert (event["event_type"], event["batch_id"], event["job_id"]) == ("job_epoch", "emit-1", "j1")
    assert event["source"]["project"] == "slurm"
    assert event["data"] == {
        "epoch": 3, "train_loss": 0.25, "note": "hello world", "tags": ["a", 1], "quoted": "7",
        "flag": True, "nothing": None, "expr": "1+1",
    }


def test_emit_takes_fields_after_the_options_as_documented(fake):
    assert argus.main(["emit", "job_epoch", "--batch-id", "emit-2", "--job-id", "j1", "--url", fake.url,
                       "epoch=3"]) == 0
    assert [e["data"] for e in fake.events.values()] == [{"epoch": 3}]


def test_emit_to_a_dead_server_spills_the_event_for_sync(fake, spill_dir):
    out = cli("emit", "batch_done", "n_done=2", "--batch-id", "emit-3", "--url", dead_url())
    assert out.returncode == 1
    assert "not delivered" in out.stderr and str(spill_dir) in out.stderr
    (event,) = spilled_events(spill_dir)
    assert (event["event_type"], event["batch_id"], event["data"]) == ("batch_done", "emit-3", {"n_done": 2})
    # The file records the server it was meant for: a sync to another server leaves it alone
    # (and says so) unless asked to --retarget.
    assert argus.main(["sync", "--url", fake.url]) == 1
    assert fake.events == {} and len(spilled_events(spill_dir)) == 1
    assert argus.main(["sync", "--url", fake.url, "--retarget"]) == 0
    assert list(fake.events) == [event["event_id"]]


def test_emit_rejected_by_the_server_goes_to_the_dead_letter(fake, spill_dir, capsys):
    fake.reject = lambda event: "no such batch"
    assert argus.main(["emit", "batch_start", "--batch-id", "emit-4", "--url", fake.url]) == 1
    assert "rejected" in capsys.readouterr().err
    assert spilled_events(spill_dir) == [] and len(dead_letters(spill_dir)) == 1


@pytest.mark.parametrize("env", [{"ARGUS_OFFLINE": "1", "ARGUS_URL": "set"}, {}])
def test_emit_offline_or_without_a_url_saves_the_event(env, fake, spill_dir, monkeypatch, capsys):
    for name, value in env.items():
        monkeypatch.setenv(name, fake.url if value == "set" else value)
    assert argus.main(["emit", "batch_start", "--batch-id", "emit-5"]) == 1
    assert "saved to %s" % spill_dir in capsys.readouterr().err
    assert [e["batch_id"] for e in spilled_events(spill_dir)] == ["emit-5"]
    assert fake.requests == []


@pytest.mark.parametrize(
    "argv, message",
    [
        (["emit", "heartbeat", "--batch-id", "b"], "unknown event type"),
        (["emit", "job_epoch", "--batch-id", "b"], "needs --job-id"),
        (["emit", "log_line", "novalue", "--batch-id", "b", "--job-id", "j"], "expected key=value"),
        (["emit", "log_line", "=1", "--batch-id", "b", "--job-id", "j"], "expected key=value"),
    ],
)
def test_emit_usage_errors_exit_2_and_send_nothing(argv, message, fake, spill_dir, capsys):
    assert argus.main(argv + ["--url", fake.url]) == 2
    assert message in capsys.readouterr().err
    assert fake.requests == [] and spilled_events(spill_dir) == []


@pytest.mark.parametrize("batch_id", ["", "b" * 129])
def test_emit_with_an_invalid_batch_id_is_a_usage_error(batch_id, fake, capsys):
    assert argus.main(["emit", "batch_start", "--batch-id", batch_id, "--url", fake.url]) == 2
    assert "batch" in capsys.readouterr().err


# -- `argus batch-id` ----------------------------------------------------------------------------


def test_batch_id_derived_and_new(capsys):
    assert argus.main(["batch-id", "--project", "p", "--experiment", "e", "--git-sha", "s"]) == 0
    assert capsys.readouterr().out == argus.derive_batch_id("p", "e", "s", prefix="bench") + "\n"
    assert argus.main(["batch-id", "--project", "p", "--experiment", "e", "--git-sha", "s", "--prefix", "x"]) == 0
    assert capsys.readouterr().out == argus.derive_batch_id("p", "e", "s", prefix="x") + "\n"
    # Not a git checkout (the test's own folder): the formula's "no-git".
    assert argus.main(["batch-id", "--project", "p", "--experiment", "e"]) == 0
    assert capsys.readouterr().out == argus.derive_batch_id("p", "e", "") + "\n"
    assert argus.main(["batch-id", "--new"]) == 0
    assert re.fullmatch(r"batch-[0-9a-f]{12}\n", capsys.readouterr().out)
    assert argus.main(["batch-id", "--new", "--prefix", "run"]) == 0
    assert re.fullmatch(r"run-[0-9a-f]{12}\n", capsys.readouterr().out)
    assert argus.main(["batch-id", "--project", "p"]) == 2
    assert "--experiment" in capsys.readouterr().err


# -- `argus serve` and `argus stop` ------------------------------------------------------------------


def _wait_for_port(port: int, proc, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert proc.poll() is None, proc.communicate()
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.02)
    raise AssertionError("argus serve did not listen on %d" % port)


def test_serve_then_stop_a_batch(tmp_path, spill_dir, capsys):
    port, db = free_port(), tmp_path / "argus.db"
    url = "http://127.0.0.1:%d" % port
    server = start(["-m", "argus", "serve", "--port", str(port), "--db", str(db)])
    try:
        _wait_for_port(port, server)
        assert argus.main(["emit", "batch_start", "--batch-id", "srv-1", "--url", url]) == 0
        stop = cli("stop", "srv-1", "--url", url, entry="script")
        assert (stop.returncode, stop.stdout) == (0, "stop requested for srv-1\n"), stop.stderr
        assert argus.main(["stop", "srv-nope", "--url", url]) == 1
    finally:
        out, err = interrupt(server)
    assert server.returncode == 0, err
    assert "argus stop: 404 batch not found" in capsys.readouterr().err
    assert out.startswith("argus collector listening on %s (database %s)" % (url, db))
    with argus._Collector(db=str(db)) as collector:  # the state outlives the server
        assert collector.event_count() == 1
        assert collector.batch("srv-1")["stop_requested_by"] == "api"


def test_stop_needs_a_server_and_its_token(capsys):
    assert argus.main(["stop", "b1"]) == 2
    assert "--url" in capsys.readouterr().err
    assert argus.main(["stop", "b1", "--url", dead_url()]) == 1
    with argus._Collector(token=TOKEN) as collector:
        assert argus.main(["emit", "batch_start", "--batch-id", "b1", "--url", collector.url, "--token", TOKEN]) == 0
        assert argus.main(["stop", "b1", "--url", collector.url]) == 1
        assert "401" in capsys.readouterr().err
        assert collector.batch("b1")["stop_requested_at"] is None
        assert argus.main(["stop", "b1", "--url", collector.url, "--token", TOKEN]) == 0
        assert collector.batch("b1")["stop_requested_at"] is not None


# -- `argus demo` -----------------------------------------------------------------------------------


def test_demo_runs_on_a_bare_python_without_third_party_packages(tmp_path):
    venv = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / ("Scripts" if os.name == "nt" else "bin") / ("python.exe" if os.name == "nt" else "python")
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(str(ARGUS_PY), str(alone / "argus.py"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["TMPDIR"] = str(tmp_path)  # the demo's working folder
    check = "import importlib.util as u; print([m for m in ('requests', 'jsonschema', 'pytest') if u.find_spec(m)])"
    bare = subprocess.run([str(python), "-c", check], cwd=str(alone), env=env, capture_output=True, text=True)
    assert bare.stdout.strip() == "[]", bare.stderr

    out, again = (
        subprocess.run(
            [str(python), "argus.py", "demo"], cwd=str(alone), env=env, capture_output=True, text=True, timeout=120
        )
        for _ in range(2)
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert again.stdout == out.stdout  # the same output on every run
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alone", "bare"]  # nothing left behind
    tables, title = {}, None
    for line in out.stdout.splitlines():
        if line in ("batch", "jobs", "artifacts"):
            title, tables[line] = line, []
        elif title and line.startswith("  "):
            tables[title].append(re.split(r"\s{2,}", line.strip()))
        else:
            title = None
    for table in tables.values():  # header, then a rule of dashes
        assert set("".join(table[1])) == {"-"} and len(table[1]) == len(table[0])
    assert tables["batch"][0] == ["batch_id", "status", "experiment_type", "n_total"]
    (batch,) = tables["batch"][2:]
    assert re.fullmatch(r"demo-[0-9a-f]{16}", batch[0]) and batch[1:] == ["DONE", "demo", "2"]
    assert tables["jobs"][0] == ["job_id", "status", "epochs", "last train_loss", "last val_loss", "metrics"]
    linear, mlp = tables["jobs"][2:]
    assert linear == ["demo-linear", "DONE", "5", "0.2", "0.22", '{"MSE":0.2,"R2":0.91}']
    assert mlp[:3] == ["demo-mlp", "DONE (stopped early)", "3"]  # Stop pressed after epoch 2
    assert tables["artifacts"][0] == ["job_id", "filename", "bytes"]
    assert [row[:2] for row in tables["artifacts"][2:]] == [["demo-linear", "loss.png"], ["(batch)", "loss.png"]]
    assert re.search(r"^events delivered: (\d+) \(stored by the collector: \1\); spilled: 0; stop honoured: yes$",
                     out.stdout, re.M)
