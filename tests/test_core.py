"""The public API: Reporter, JobContext, ExperimentReporter and the module-level helpers."""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import math
import os
import re
import sys
from pathlib import Path

import pytest

import argus
from conftest import run_script, validate_event


def quiet_reporter(fake, **kwargs):
    kwargs.setdefault("heartbeat", False)
    kwargs.setdefault("stop_polling", False)
    kwargs.setdefault("resource_snapshot", False)
    return argus.Reporter(monitor_url=fake.url, **kwargs)


def test_public_names_match_the_spec():
    for name in (
        "Reporter",
        "JobContext",
        "derive_batch_id",
        "emit",
        "new_batch_id",
        "set_batch_id",
        "get_batch_id",
        "sub_env",
        "ExperimentReporter",
        "SCHEMA_VERSION",
    ):
        assert name in argus.__all__ and hasattr(argus, name)
    assert argus.SCHEMA_VERSION == "1.1"
    assert re.match(r"^\d+\.\d+\.\d+", argus.__version__)


def test_a_batch_with_two_jobs_sends_the_whole_lifecycle(fake):
    with quiet_reporter(fake, source_project="paper", experiment_type="forecast", n_total=2) as r:
        with r.job("etth1_dlinear", model="dlinear", dataset="etth1") as job:
            for epoch in range(3):
                job.epoch(epoch, train_loss=1.0 / (epoch + 1), val_loss=0.5, lr=1e-3, batch_time_ms=12.5)
            job.metrics({"MSE": 0.44, "MAE": 0.42})
            job.log("done training", level="WARNING")
        with r.job("etth1_patchtst") as job:
            job.epoch(0, train_loss=0.9)
    assert fake.types() == [
        "batch_start",
        "job_start",
        "job_epoch",
        "job_epoch",
        "job_epoch",
        "log_line",
        "job_done",
        "job_start",
        "job_epoch",
        "job_done",
        "batch_done",
    ]
    start = fake.of_type("batch_start")[0]
    assert start["batch_id"] == r.batch_id and start["job_id"] is None
    assert start["source"]["project"] == "paper"
    assert start["data"]["experiment_type"] == "forecast" and start["data"]["n_total_jobs"] == 2
    done = {e["job_id"]: e["data"] for e in fake.of_type("job_done")}
    assert done["etth1_dlinear"]["status"] == "DONE"
    assert done["etth1_dlinear"]["metrics"] == {"MSE": 0.44, "MAE": 0.42}
    assert done["etth1_dlinear"]["train_epochs"] == 3
    assert done["etth1_dlinear"]["elapsed_s"] >= 0
    assert "metrics" not in done["etth1_patchtst"]  # nothing stashed: key left out
    epochs = sorted((e["data"]["epoch"], e["data"]) for e in fake.of_type("job_epoch") if e["job_id"] == "etth1_dlinear")
    assert epochs[0][1] == {"epoch": 0, "train_loss": 1.0, "val_loss": 0.5, "lr": 1e-3, "batch_time_ms": 12.5}
    log = fake.of_type("log_line")[0]["data"]
    assert log == {"line": "done training", "level": "warning"}
    batch_done = fake.of_type("batch_done")[0]["data"]
    assert batch_done["n_done"] == 2 and batch_done["n_failed"] == 0 and batch_done["total_elapsed_s"] >= 0
    start_job = [e for e in fake.of_type("job_start") if e["job_id"] == "etth1_dlinear"][0]
    assert start_job["data"] == {"model": "dlinear", "dataset": "etth1"}


def test_break_out_of_a_job_is_a_clean_job_done(fake):
    with quiet_reporter(fake) as r:
        with r.job("j") as job:
            for epoch in range(10):
                if epoch == 2:
                    break
                job.epoch(epoch)
    assert [e["data"]["status"] for e in fake.of_type("job_done")] == ["DONE"]
    assert fake.of_type("job_done")[0]["data"]["train_epochs"] == 2
    assert not fake.of_type("job_failed") and fake.of_type("batch_done")


def test_an_exception_fails_job_and_batch_and_still_propagates(fake):
    with pytest.raises(ZeroDivisionError):
        with quiet_reporter(fake) as r:
            with r.job("ok"):
                pass
            with r.job("bad") as job:
                job.epoch(0, train_loss=1.0)
                1 / 0  # noqa: B018
    failed = fake.of_type("job_failed")[0]
    assert failed["job_id"] == "bad"
    assert failed["data"]["status"] == "FAILED"
    assert failed["data"]["reason"] == "ZeroDivisionError: division by zero"
    batch = fake.of_type("batch_failed")[0]["data"]
    assert batch["reason"] == "ZeroDivisionError: division by zero"
    assert batch["total_elapsed_s"] >= 0
    assert not fake.of_type("batch_done")


def test_batch_id_precedence(fake):
    assert quiet_reporter(fake, batch_id="explicit-1", resume_from="resume-1").batch_id == "explicit-1"
    assert quiet_reporter(fake, resume_from="resume-1").batch_id == "resume-1"
    auto = quiet_reporter(fake, batch_prefix="sweep").batch_id
    assert re.match(r"^sweep-[0-9a-f]{12}$", auto)


def test_command_defaults_to_the_real_command_line(fake, tmp_path):
    script = tmp_path / "train.py"
    script.write_text(
        "import argus\n"
        "with argus.Reporter(heartbeat=False, stop_polling=False, resource_snapshot=False):\n"
        "    pass\n"
    )
    env = dict(os.environ, ARGUS_URL=fake.url, PYTHONPATH=str(Path(argus.__file__).parent))
    import subprocess

    subprocess.run([sys.executable, str(script), "--epochs", "5", "model=a b"], env=env, check=True, timeout=60)
    start = fake.of_type("batch_start")[0]
    command = start["data"]["command"]
    assert command.endswith("train.py --epochs 5 'model=a b'")
    assert start["source"]["command"] == command


def test_an_explicit_command_is_recorded(fake):
    with quiet_reporter(fake, command="python run.py -j 3"):
        pass
    start = fake.of_type("batch_start")[0]
    assert start["data"]["command"] == "python run.py -j 3"
    assert start["source"]["command"] == "python run.py -j 3"


class FakeScalar:
    """Stands in for a numpy scalar / 0-d tensor: shape () and item()."""

    shape = ()

    def __init__(self, value):
        self.value = value

    def item(self):
        return self.value


class FakeTensor:
    """A torch-like 2x2 tensor: size() is a method, numel() the count."""

    def __init__(self, rows):
        self.rows = rows
        self.shape = (len(rows), len(rows[0]))

    def size(self):
        return self.shape

    def numel(self):
        return self.shape[0] * self.shape[1]

    def item(self):
        raise ValueError("only one element tensors can be converted")

    def tolist(self):
        return [list(r) for r in self.rows]


def test_values_become_json_safe_and_keep_their_information(fake):
    class Color:
        def __str__(self):
            return "Color(red)"

    with quiet_reporter(fake) as r:
        with r.job("values") as job:
            job.epoch(
                FakeScalar(3),
                train_loss=FakeScalar(0.25),
                val_loss=float("nan"),
                lr=float("inf"),
                when=datetime.datetime(2026, 4, 23, 9, 23, 6),
                path=Path("/data/run"),
                tags={"b", "a"},
                shape=(2, 3),
                keyed={1: "one", None: "none", (1, 2): "pair"},
                neg=-math.inf,
                nested={"deep": [1.0, float("nan")]},
                weights=FakeTensor([[1, 2], [3, 4]]),
                color=Color(),
                blob=b"bytes",
                long="x" * 20000,
                missing=None,
            )
    data = fake.of_type("job_epoch")[0]["data"]
    assert data["epoch"] == 3 and data["train_loss"] == 0.25
    assert data["val_loss"] is None and data["lr"] is None and data["neg"] is None
    assert data["nonfinite"] == {
        "val_loss": "NaN",
        "lr": "Infinity",
        "neg": "-Infinity",
        "nested.deep[1]": "NaN",
    }
    assert data["nested"] == {"deep": [1.0, None]}
    assert data["when"] == "2026-04-23T09:23:06"
    assert data["path"] == "/data/run"
    assert data["tags"] == ["a", "b"]
    assert data["shape"] == [2, 3]
    assert data["keyed"] == {"1": "one", "null": "none", "(1, 2)": "pair"}
    assert data["weights"] == [[1, 2], [3, 4]]
    assert data["color"] == "Color(red)"
    assert data["blob"] == "bytes"
    assert data["long"].startswith("x" * 16384) and data["long"].endswith("...[truncated 3616 chars]")
    assert "missing" not in data


def test_a_value_changed_after_the_call_is_sent_as_it_was(fake):
    metrics = {"acc": [0.1]}
    with quiet_reporter(fake) as r:
        with r.job("snap") as job:
            job.epoch(0, history=metrics["acc"])
            metrics["acc"].append(0.2)
    assert fake.of_type("job_epoch")[0]["data"]["history"] == [0.1]


def test_timestamps_are_fixed_width_and_taken_at_the_call(fake, monkeypatch):
    moments = iter([1776936186.0, 1776936186.5, 1776936187.25])
    with quiet_reporter(fake) as r:
        with r.job("t") as job:
            monkeypatch.setattr(argus, "_now", lambda: next(moments))
            job.epoch(0)
            job.epoch(1)
            job.epoch(2)
            monkeypatch.undo()
    stamps = sorted(e["timestamp"] for e in fake.of_type("job_epoch"))
    assert stamps == ["2026-04-23T09:23:06.000Z", "2026-04-23T09:23:06.500Z", "2026-04-23T09:23:07.250Z"]


def test_many_events_travel_in_batches_of_at_most_500(fake):
    with quiet_reporter(fake) as r:
        with r.job("burst") as job:
            for i in range(3000):
                job.epoch(i, train_loss=0.1)
    assert len(fake.of_type("job_epoch")) == 3000
    sizes = [n for method, path, n in fake.requests if path == "/api/events/batch"]
    assert sizes and max(sizes) <= 500
    assert sum(n for m, p, n in fake.requests if p.startswith("/api/events")) == 3004


def test_argus_disable_makes_everything_a_no_op(fake, monkeypatch):
    for value in ("1", "true", "yes", "on"):
        monkeypatch.setenv("ARGUS_DISABLE", value)
        with quiet_reporter(fake) as r:
            with r.job("j") as job:
                job.epoch(0, train_loss=1.0)
                job.log("x")
                job.metrics({"a": 1})
                assert job.upload(".") == 0
            r.emit("log_line", job_id="j", line="x")
        assert r.stopped is False
    assert fake.events == {} and fake.requests == []


def test_no_url_anywhere_is_a_no_op_with_one_warning(caplog):
    caplog.set_level(logging.WARNING, logger="argus")
    argus._logged_once.discard("no-url")
    for _ in range(2):
        with argus.Reporter(heartbeat=False, stop_polling=False, resource_snapshot=False) as r:
            with r.job("j") as job:
                job.epoch(0)
    warnings = [rec.getMessage() for rec in caplog.records if "no Argus server" in rec.getMessage()]
    assert len(warnings) == 1 and "ARGUS_URL" in warnings[0]


def test_url_from_environment_and_from_monitor_yaml(fake, monkeypatch, tmp_path):
    os.makedirs("configs")
    Path("configs/monitor.yaml").write_text("# monitor\nmonitor_url: '%s'  # local\n" % fake.url)
    with argus.Reporter(heartbeat=False, stop_polling=False, resource_snapshot=False, batch_id="from-yaml"):
        pass
    assert fake.of_type("batch_start")[0]["batch_id"] == "from-yaml"
    Path("configs/monitor.yaml").write_text("url: http://127.0.0.1:9\n")
    monkeypatch.setenv("ARGUS_URL", fake.url)  # the environment wins over the file
    with argus.Reporter(heartbeat=False, stop_polling=False, resource_snapshot=False, batch_id="from-env"):
        pass
    assert {e["batch_id"] for e in fake.of_type("batch_start")} == {"from-yaml", "from-env"}


def test_bad_configuration_gets_one_clear_line(caplog, monkeypatch):
    caplog.set_level(logging.WARNING, logger="argus")
    monkeypatch.setenv("ARGUS_URL", "argus.example.org:8000")
    assert argus._resolve_url() == (None, None)
    assert any("has no scheme" in r.getMessage() for r in caplog.records)
    assert argus._resolve_token(" em_live_abc\n") == ("em_live_abc", "argument")
    assert any("surrounding whitespace" in r.getMessage() for r in caplog.records)


def test_token_and_user_agent_are_sent(httpserver):
    from werkzeug.wrappers import Response

    seen = []

    def handler(request):
        seen.append(dict(request.headers))
        return Response(json.dumps({"accepted": True, "event_id": 1, "deduplicated": False}), 200)

    httpserver.expect_request("/api/events", method="POST").respond_with_handler(handler)
    with argus.ExperimentReporter(httpserver.url_for("/").rstrip("/"), "proj", auth_token="em_live_secret") as rep:
        rep.batch_start("forecast", 1)
    assert seen and seen[0]["Authorization"] == "Bearer em_live_secret"
    assert seen[0]["User-Agent"].startswith("argus-reporter/%s (schema=1.1" % argus.__version__)
    assert seen[0]["Content-Type"] == "application/json"


def test_legacy_experiment_reporter_keeps_its_signature(fake):
    with argus.ExperimentReporter(
        fake.url, "legacy", auth_token=None, host="node-12", user="alice", commit="a1b2c3d", timeout=5.0,
        queue_size=10, batch_id="legacy-1",
    ) as rep:
        assert rep.batch_start("forecast", 3, command="run.py", batch_id="legacy-2", extra_key=1) == "legacy-2"
        rep.job_start("j", model="m", dataset="d", seed=1)
        rep.job_epoch("j", 0, train_loss=0.5, val_loss=0.6, lr=0.1, acc=0.9)
        rep.log_line("j", "hello")
        rep.resource_snapshot(cpu_util_pct=12.5, ram_mb=100)
        rep.job_done("j", metrics={"MSE": 1.0}, elapsed_s=2.0, train_epochs=1, resources={"gpu_mem_peak_mb": 1})
        rep.job_failed("k", reason="boom", elapsed_s=1.0)
        rep.batch_failed(reason="oops")
        rep.batch_done(1, n_failed=1, total_elapsed_s=3.0)
    events = list(fake.events.values())
    assert len(events) == 9
    assert {e["batch_id"] for e in events} == {"legacy-2"}
    assert events[0]["source"] == {
        "project": "legacy", "host": "node-12", "user": "alice", "commit": "a1b2c3d", "command": "run.py"
    }
    assert fake.of_type("log_line")[0]["data"] == {"line": "hello", "level": "info"}
    assert fake.of_type("job_done")[0]["data"]["resources"] == {"gpu_mem_peak_mb": 1}
    assert fake.of_type("batch_start")[0]["data"] == {
        "experiment_type": "forecast", "n_total_jobs": 3, "command": "run.py", "extra_key": 1
    }


def test_misuse_gets_a_clear_error_that_says_what_to_do(fake):
    r = quiet_reporter(fake)
    with pytest.raises(TypeError, match="job_id must be a non-empty string"):
        r.job(123)
    with pytest.raises(TypeError, match="unexpected keyword"):
        argus.Reporter(monitor_urll="http://x")
    with pytest.raises(ValueError, match="heartbeat must be True, False or a number"):
        argus.Reporter(heartbeat="often")
    with pytest.raises(RuntimeError, match="as a context manager"):
        r.job("j").epoch(0)
    with r:
        with pytest.raises(ValueError, match="unknown event type 'heartbeat'"):
            r.emit("heartbeat")
        with pytest.raises(TypeError, match=r"metrics\(\) takes a dict"):
            with r.job("j") as job:
                job.metrics([1, 2])


def test_emit_inside_a_reporter_uses_its_batch(fake):
    with quiet_reporter(fake, batch_id="outer-1"):
        argus.emit("log_line", job_id="j", line="from emit", level="info")
        argus.emit("env_snapshot", git_sha="abc", packages=["argus"])
    line = fake.of_type("log_line")[0]
    assert line["batch_id"] == "outer-1" and line["job_id"] == "j" and line["data"]["line"] == "from emit"
    assert fake.of_type("env_snapshot")[0]["data"] == {"git_sha": "abc", "packages": ["argus"]}


def test_emit_without_a_reporter_sends_under_the_published_batch_id():
    code = (
        "import argus\n"
        "argus.set_batch_id('child-batch-7')\n"
        "import os; print(os.environ['ARGUS_BATCH_ID'])\n"
        "argus.emit('resource_snapshot', cpu_util_pct=5.0)\n"
    )
    from conftest import FakeArgus

    server = FakeArgus()
    try:
        out = run_script(code, {"ARGUS_URL": server.url})
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "child-batch-7"
        snap = server.of_type("resource_snapshot")
        assert len(snap) == 1 and snap[0]["batch_id"] == "child-batch-7"
        assert snap[0]["data"] == {"cpu_util_pct": 5.0}
    finally:
        server.close()


def test_get_batch_id_falls_back_to_the_inherited_variable(monkeypatch):
    monkeypatch.setattr(argus, "_explicit_batch_id", None)
    assert argus.get_batch_id() is None
    monkeypatch.setenv("ARGUS_BATCH_ID", "from-parent")
    assert argus.get_batch_id() == "from-parent"


def test_reporter_publishes_its_batch_id_for_child_processes(fake):
    with quiet_reporter(fake, batch_id="published-1"):
        out = run_script("import argus; print(argus.get_batch_id())", {})
        assert out.stdout.strip() == "published-1"
    assert os.environ.get("ARGUS_BATCH_ID") is None


def test_sub_env_substitutes_argus_values_environment_and_keywords(fake, monkeypatch):
    monkeypatch.setenv("DATA_ROOT", "/scratch/data")
    template = "${argus_batch_id}/${argus_job_id}/${argus_project}/${DATA_ROOT}/${seed}/${unknown}/$DATA_ROOT"
    with quiet_reporter(fake, batch_id="sub-1", source_project="proj") as r:
        with r.job("job-9"):
            assert argus.sub_env(template, seed=3) == (
                "sub-1/job-9/proj//scratch/data/3/${unknown}/$DATA_ROOT"
            )
            assert argus.sub_env("${argus_url}") == fake.url
            assert argus.sub_env("${argus_batch_id}", argus_batch_id="kw-wins") == "kw-wins"


def test_new_batch_id_and_derive_batch_id_follow_the_shared_formula(tmp_path):
    assert re.match(r"^batch-[0-9a-f]{12}$", argus.new_batch_id())
    assert re.match(r"^sweep-[0-9a-f]{12}$", argus.new_batch_id("sweep"))
    expected = "bench-" + hashlib.sha256(b"proj|exp|abc123").hexdigest()[:16]
    assert argus.derive_batch_id("proj", "exp", "abc123") == expected
    no_git = "x-" + hashlib.sha256(b"proj|exp|no-git").hexdigest()[:16]
    assert argus.derive_batch_id("proj", "exp", "", prefix="x") == no_git
    # tmp_path is no git checkout: git fails and "no-git" is used
    assert argus.derive_batch_id("proj", "exp", prefix="x") == no_git


def test_derive_batch_id_reads_the_checkout_commit(tmp_path):
    import subprocess

    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-c", "user.email=a@b", "-c", "user.name=a", "-C", str(repo)]
    subprocess.run(git + ["init", "-q"], check=True)
    (repo / "f").write_text("x")
    subprocess.run(git + ["add", "f"], check=True)
    subprocess.run(git + ["commit", "-qm", "x"], check=True)
    sha = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    os.chdir(repo)
    assert argus.derive_batch_id("p", "e") == argus.derive_batch_id("p", "e", sha)


def test_both_transports_deliver(fake, monkeypatch):
    for choice in ("urllib", "requests"):
        monkeypatch.setenv("ARGUS_TRANSPORT", choice)
        with quiet_reporter(fake, batch_id="via-" + choice) as r:
            with r.job("j") as job:
                job.epoch(0)
        expected = choice
        if choice == "requests":
            try:
                import requests  # noqa: F401
            except ImportError:
                expected = "urllib"  # falls back with a warning
        assert r._sender.transport_name == expected
    assert {e["batch_id"] for e in fake.of_type("job_epoch")} == {"via-urllib", "via-requests"}


def test_events_go_through_an_http_proxy_and_no_proxy_is_honoured(fake, monkeypatch):
    """A forwarding proxy on 127.0.0.1 sees the requests when HTTP_PROXY points at it."""
    import threading
    import urllib.request
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen = []

    class Proxy(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def do_POST(self):
            seen.append(self.path)
            body = self.rfile.read(int(self.headers["Content-Length"]))
            req = urllib.request.Request(self.path, data=body, method="POST", headers={"Content-Type": "application/json"})
            with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req, timeout=5) as resp:
                payload = resp.read()
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    proxy = ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        for transport in ("urllib", "requests"):
            seen.clear()
            monkeypatch.setenv("ARGUS_TRANSPORT", transport)
            monkeypatch.setenv("HTTP_PROXY", "127.0.0.1:%d" % proxy.server_address[1])  # no scheme
            monkeypatch.setenv("NO_PROXY", "example.org")
            with argus.ExperimentReporter(fake.url, "p") as rep:
                rep.batch_start("t", 1)
            assert seen and seen[0].startswith(fake.url + "/api/events"), (transport, seen)
            seen.clear()
            monkeypatch.setenv("NO_PROXY", "127.0.0.1")
            with argus.ExperimentReporter(fake.url, "p") as rep:
                rep.batch_start("t", 1)
            assert seen == [], transport
    finally:
        proxy.shutdown()
        proxy.server_close()
    assert len(fake.of_type("batch_start")) == 4


def test_import_is_standard_library_only_and_lazy():
    code = (
        "import sys, argus\n"
        "heavy = [m for m in ('requests', 'json', 'logging', 'ssl', 'http.client', 'numpy', 'torch',"
        " 'lightning', 'keras', 'hydra', 'subprocess') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    out = run_script(code, {})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_copying_argus_py_alone_gives_the_whole_sdk(fake, tmp_path):
    import shutil
    import subprocess

    project = tmp_path / "vendored"
    project.mkdir()
    shutil.copy(argus.__file__, project / "argus.py")
    code = (
        "import argus\n"
        "with argus.Reporter(heartbeat=False, stop_polling=False, resource_snapshot=False, batch_id='vend-1') as r:\n"
        "    with r.job('j') as job:\n"
        "        job.epoch(0, train_loss=1.0)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["ARGUS_URL"] = fake.url
    subprocess.run([sys.executable, "-c", code], cwd=project, env=env, check=True, timeout=60)
    assert [e["event_type"] for e in fake.events.values() if e["batch_id"] == "vend-1"].count("job_epoch") == 1


def test_every_captured_event_is_schema_valid(fake):
    with quiet_reporter(fake) as r:
        with r.job("j") as job:
            job.epoch(0, train_loss=1.0)
    for event in fake.events.values():
        validate_event(event)
    assert len(fake.events) == 5


def test_secrets_on_the_command_line_are_not_recorded(fake, tmp_path):
    import subprocess

    script = tmp_path / "train.py"
    script.write_text(
        "import argus\n"
        "with argus.Reporter(heartbeat=False, stop_polling=False, resource_snapshot=False):\n"
        "    pass\n"
    )
    env = dict(os.environ, ARGUS_URL=fake.url, PYTHONPATH=str(Path(argus.__file__).parent))
    args = ["--token", "em_live_SECRET1", "--api-key=SECRET2", "db.password=SECRET3", "--tokenizer", "bpe"]
    subprocess.run([sys.executable, str(script), *args], env=env, check=True, timeout=60)
    command = fake.of_type("batch_start")[0]["data"]["command"]
    assert "SECRET" not in json.dumps(list(fake.events.values()))
    assert command.endswith("train.py --token '***' '--api-key=***' 'db.password=***' --tokenizer bpe")
