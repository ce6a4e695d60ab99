"""The Reporter's daemon threads: the Stop poller, the heartbeat and the resource sampler.

Intervals are fractions of a second so that each test sees several rounds quickly. The
resource sampler is driven with a folder of fixed /proc files, a fake clock and fake
``nvidia-smi`` scripts so that its figures can be checked to the decimal.
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import os
import re
import shutil
import stat
import sys
import time

import pytest

import argus
from conftest import serve_ingest, spilled_events, validate_event

LINUX_PROC = sys.platform.startswith("linux") and os.path.exists("/proc/self/stat")


def daemon_reporter(fake, **kwargs):
    """A Reporter with every daemon off unless the test turns it on."""
    kwargs.setdefault("heartbeat", False)
    kwargs.setdefault("stop_polling", False)
    kwargs.setdefault("resource_snapshot", False)
    return argus.Reporter(monitor_url=fake.url, **kwargs)


def stop_polls(fake) -> int:
    with fake.lock:
        return sum(1 for method, _path, _n in fake.requests if method == "GET")


def messages(caplog, level=logging.WARNING) -> list:
    return [r.getMessage() for r in caplog.records if r.name == "argus" and r.levelno >= level]


# ---------------------------------------------------------------------------------------
# The Stop poller
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["requested", "stop_requested"])
def test_stop_is_seen_under_either_key_and_polling_ends(fake, caplog, key):
    caplog.set_level(logging.WARNING, logger="argus")
    fake.stop = True
    fake.stop_key = key  # "stop_requested" is what the upstream client reads
    with daemon_reporter(fake, stop_polling=0.05) as r:
        with r.job("j") as job:
            assert fake.wait_for(lambda: r.stopped, 5)
            assert job.stopped is True
            polls = stop_polls(fake)
            time.sleep(0.15)  # three more intervals: the poller has returned
            assert stop_polls(fake) == polls
    assert polls >= 1
    assert all(path == "/api/batches/%s/stop-requested" % r.batch_id for m, path, _ in fake.requests if m == "GET")
    assert "argus: Stop was requested for batch %s" % r.batch_id in messages(caplog)
    assert fake.of_type("job_done") and fake.of_type("batch_done")  # stopping is the user's call


def test_stop_false_is_polled_again_and_again_without_stopping(fake):
    fake.stop = False
    with daemon_reporter(fake, stop_polling=0.05) as r:
        assert fake.wait_for(lambda: stop_polls(fake) >= 4, 5)
        assert r.stopped is False


def test_stop_after_404_while_the_server_does_not_know_the_batch(fake):
    fake.stop = None  # 404 "batch not found"
    with daemon_reporter(fake, stop_polling=0.05) as r:
        assert fake.wait_for(lambda: stop_polls(fake) >= 3, 5)
        assert r.stopped is False
        fake.stop = True
        assert fake.wait_for(lambda: r.stopped, 5)


def test_stop_after_scripted_404s_then_true(fake):
    fake.stop = True
    fake.stop_script = [404, 404, 404]
    with daemon_reporter(fake, stop_polling=0.05) as r:
        assert fake.wait_for(lambda: r.stopped, 5)
    assert fake.stop_script == [] and stop_polls(fake) >= 4


def test_stop_after_429_is_still_seen(fake):
    fake.stop = True
    fake.stop_script = [429, 429]  # answered with Retry-After: 0
    with daemon_reporter(fake, stop_polling=0.05) as r:
        assert fake.wait_for(lambda: r.stopped, 5)
    assert fake.stop_script == [] and stop_polls(fake) >= 3


def _serve_ingest(httpserver, stop_handler):
    """pytest-httpserver as an Argus server: ingest accepted, the stop route by ``stop_handler``."""
    url = serve_ingest(httpserver)
    httpserver.expect_request(re.compile(r"^/api/batches/[^/]+/stop-requested$"), method="GET").respond_with_handler(
        stop_handler
    )
    return url


def test_stop_poller_waits_out_retry_after_of_a_429(httpserver):
    from werkzeug.wrappers import Response

    seen = []

    def stop(request):
        seen.append(time.monotonic())
        if len(seen) == 1:
            return Response('{"detail": "Rate limit exceeded"}', 429, {"Retry-After": "0.3"})
        return Response(json.dumps({"requested": True, "requested_at": None, "requested_by": None}), 200)

    url = _serve_ingest(httpserver, stop)
    # 0.1 s: each poll may take that long to be answered (the poll's timeout is its interval).
    with argus.Reporter(monitor_url=url, heartbeat=False, resource_snapshot=False, stop_polling=0.1) as r:
        deadline = time.monotonic() + 5
        while not r.stopped and time.monotonic() < deadline:
            time.sleep(0.01)
    assert r.stopped and len(seen) == 2
    assert seen[1] - seen[0] >= 0.28  # Retry-After (0.3 s), not the 0.1 s interval


@pytest.mark.parametrize("status", [401, 403])
def test_a_refused_stop_poll_ends_the_poller_with_one_error_line(fake, caplog, status):
    caplog.set_level(logging.WARNING, logger="argus")
    fake.stop = True
    fake.stop_script = [status]
    with daemon_reporter(fake, stop_polling=0.1) as r:
        poller = r._threads[0]
        assert poller.name == "argus-stop-poller"
        poller.join(2)
        assert not poller.is_alive()
        time.sleep(0.25)  # two more intervals: nobody polls
        assert stop_polls(fake) == 1
        assert r.stopped is False
    errors = [m for m in messages(caplog, logging.ERROR) if "stop poller" in m]
    assert errors == [
        "argus: the stop poller was refused (%d scripted); the Stop button will not work for this run" % status
    ]
    assert fake.of_type("batch_done")  # the rest of the run goes on


def test_offline_mode_does_not_poll_for_stop(fake, monkeypatch):
    monkeypatch.setenv("ARGUS_OFFLINE", "1")
    with daemon_reporter(fake, stop_polling=0.05) as r:
        time.sleep(0.2)
        assert r._threads == []
    assert fake.requests == []


# ---------------------------------------------------------------------------------------
# The heartbeat
# ---------------------------------------------------------------------------------------


def test_heartbeat_is_silent_while_epochs_flow_and_beats_when_quiet(fake):
    with daemon_reporter(fake, heartbeat=0.2) as r:
        with r.job("j") as job:
            for epoch in range(20):  # 0.4 s of epochs, one every 20 ms: never quiet for 0.2 s
                job.epoch(epoch, train_loss=1.0)
                time.sleep(0.02)
            assert fake.wait_for(lambda: len(fake.of_type("job_epoch")) == 20, 5)
            assert fake.of_type("resource_snapshot") == []
            last_epoch = max(e["timestamp"] for e in fake.of_type("job_epoch"))
            assert fake.wait_for(lambda: len(fake.of_type("resource_snapshot")) >= 2, 5)
    beats = sorted(fake.of_type("resource_snapshot"), key=lambda e: e["timestamp"])
    assert 2 <= len(beats)
    for beat in beats:
        validate_event(beat)
        assert beat["job_id"] is None  # not attributed to the open job
        assert beat["batch_id"] == r.batch_id
        assert beat["data"]["heartbeat"] is True
        # A cheap real sample, not a row of nulls (an empty point in the server's charts).
        assert set(beat["data"]) == {"heartbeat", "elapsed_s", "proc_ram_mb", "proc_cpu_pct"}
        assert beat["data"]["proc_ram_mb"] > 1 and beat["data"]["proc_cpu_pct"] >= 0
        assert beat["timestamp"] > last_epoch
    elapsed = [b["data"]["elapsed_s"] for b in beats]
    assert elapsed == sorted(elapsed) and elapsed[0] >= 0.4
    # No phantom job: the only job the server knows is the real one.
    assert fake.jobs_started == {"j"}
    assert {e["job_id"] for e in fake.events.values()} == {None, "j"}


def test_heartbeat_beats_about_once_per_interval_in_a_quiet_batch(fake):
    # A lone event waits up to LINGER_S (0.75 s) for company before it leaves, and a beat
    # waiting to leave is activity: beats come about once per max(interval, LINGER_S).
    assert argus.LINGER_S == 0.75
    with daemon_reporter(fake, heartbeat=0.3):
        assert fake.wait_for(lambda: fake.of_type("batch_start"), 5)
        time.sleep(2.0)
    beats = fake.of_type("resource_snapshot")
    assert 2 <= len(beats) <= 7  # 2 s of quiet at one per 0.3-1.1 s, whatever the load
    assert all(b["data"]["heartbeat"] is True and b["job_id"] is None for b in beats)
    assert fake.jobs_started == set()
    assert set(fake.types()) == {"batch_start", "resource_snapshot", "batch_done"}


# ---------------------------------------------------------------------------------------
# The resource sampler on fixed /proc files
# ---------------------------------------------------------------------------------------


class FakeClock:
    """Monotonic seconds handed out one call at a time."""

    def __init__(self, *moments):
        self.moments = list(moments)

    def __call__(self):
        return self.moments.pop(0)


def write_proc(root, cpu, mem_total_kb, mem_available_kb, utime, stime, rss_kb):
    """A minimal /proc: stat, meminfo, self/stat and self/status."""
    (root / "self").mkdir(parents=True, exist_ok=True)
    (root / "stat").write_text(
        "cpu  %s\ncpu0 1 2 3 4 5 6 7 8 0 0\nintr 12345 0 0\nctxt 999\n" % " ".join(str(v) for v in cpu)
    )
    mem = "MemTotal:       %d kB\nMemFree:         1000 kB\n" % mem_total_kb
    if mem_available_kb is not None:
        mem += "MemAvailable:   %d kB\n" % mem_available_kb
    mem += "Buffers:          100 kB\nHugePages_Total:       0\nHugepagesize:       2048 kB\n"
    (root / "meminfo").write_text(mem)
    # The command name holds ") " on purpose: fields are counted from the last ")".
    # After it: state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime
    # cutime cstime ... (cutime/cstime belong to children and must not count).
    (root / "self" / "stat").write_text(
        "4242 (py (a) b) R 1 4242 4242 0 -1 4194304 100 0 0 0 %d %d 77 33 20 0 3 0 5000 1 2\n"
        % (utime, stime)
    )
    (root / "self" / "status").write_text(
        "Name:\tpython3\nVmPeak:\t 9999999 kB\nVmHWM:\t 8888888 kB\nVmRSS:\t  %d kB\nThreads:\t3\n" % rss_kb
    )


@pytest.fixture
def fake_disk(monkeypatch, tmp_path):
    """shutil.disk_usage of tmp_path answers fixed figures (500 GiB, 123456.5 MiB free)."""
    usage = collections.namedtuple("usage", "total used free")
    real = shutil.disk_usage

    def disk_usage(path):
        if os.fspath(path) == str(tmp_path):
            return usage(500 * 1024**3, 10, 123456 * 1048576 + 524288)
        return real(path)

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    return {"disk_free_mb": 123456.5, "disk_total_mb": 512000.0}


def test_resource_snapshot_from_fixed_proc_files_has_exact_numbers(tmp_path, fake_disk):
    proc = tmp_path / "proc"
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    write_proc(proc, (100, 0, 50, 800, 50, 0, 0, 0, 0, 0), 16384000, 4096000, 100, 50, 524288)
    clock = FakeClock(10.0, 14.0, 16.0, 16.0)
    sampler = argus._ResourceSampler(
        proc_root=str(proc), disk_path=str(tmp_path), nvidia_smi=None, clock=clock, use_pynvml=False
    )
    # 4 s later: 800 jiffies of which 500 idle/iowait; the process used 2 s of CPU.
    write_proc(proc, (300, 0, 150, 1300, 50, 0, 0, 0, 0, 0), 16384000, 2048000, 100 + hz, 50 + hz, 1048576)
    assert sampler.sample() == dict(
        cpu_util_pct=37.5,
        ram_total_mb=16000.0,
        ram_mb=14000.0,
        proc_cpu_pct=50.0,
        proc_ram_mb=1024.0,
        **fake_disk,
    )
    # 2 s later: the machine idled (200 idle jiffies) while the process used 3 s of CPU (150 %).
    write_proc(proc, (300, 0, 150, 1500, 50, 0, 0, 0, 0, 0), 16384000, 16000000, 100 + 3 * hz, 50 + 2 * hz, 262144)
    assert sampler.sample() == dict(
        cpu_util_pct=0.0, ram_total_mb=16000.0, ram_mb=375.0, proc_cpu_pct=150.0, proc_ram_mb=256.0, **fake_disk
    )
    # No time passed and nothing changed: no rates to report (no division by zero).
    assert sampler.sample() == dict(ram_total_mb=16000.0, ram_mb=375.0, proc_ram_mb=256.0, **fake_disk)


def test_resource_snapshot_leaves_out_what_the_proc_files_lack(tmp_path):
    proc = tmp_path / "proc"
    write_proc(proc, (1, 0, 1, 8, 0, 0, 0, 0, 0, 0), 2048, None, 1, 1, 1024)  # no MemAvailable
    (proc / "self" / "status").unlink()
    sampler = argus._ResourceSampler(
        proc_root=str(proc), disk_path=str(tmp_path / "gone"), nvidia_smi=None, clock=FakeClock(1.0, 1.0),
        use_pynvml=False,
    )
    assert sampler.sample() == {"ram_total_mb": 2.0}


@pytest.mark.skipif(not LINUX_PROC, reason="needs a Linux /proc")
def test_resource_snapshot_from_the_live_proc(tmp_path):
    import resource

    sampler = argus._ResourceSampler(disk_path=str(tmp_path), nvidia_smi=None, use_pynvml=False)
    start = time.process_time()
    while time.process_time() - start < 0.1:  # at least ten clock ticks of CPU
        sum(range(1000))
    out = sampler.sample()
    assert set(out) == {
        "cpu_util_pct", "ram_total_mb", "ram_mb", "proc_cpu_pct", "proc_ram_mb", "disk_free_mb", "disk_total_mb"
    }
    assert 0.0 < out["cpu_util_pct"] <= 100.0
    assert 0.0 < out["ram_mb"] < out["ram_total_mb"]
    assert out["proc_cpu_pct"] > 0.0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux
    assert 1.0 < out["proc_ram_mb"] <= peak_mb + 1.0
    assert 0.0 < out["disk_free_mb"] <= out["disk_total_mb"]


@pytest.mark.skipif(not LINUX_PROC, reason="needs a Linux /proc")
def test_cost_of_one_resource_sample_is_printed(tmp_path):
    """A figure for the report, not a limit: the sampler runs on its own thread."""
    sampler = argus._ResourceSampler(disk_path=str(tmp_path), nvidia_smi=None, use_pynvml=False)
    n = 100
    start = time.perf_counter()
    for _ in range(n):
        sampler.sample()
    proc_us = (time.perf_counter() - start) / n * 1e6
    smi = fake_nvidia_smi(tmp_path / "bin", GPU_CSV, apps="")
    sampler = argus._ResourceSampler(disk_path=str(tmp_path), nvidia_smi=smi, use_pynvml=False)
    n = 5
    start = time.perf_counter()
    for _ in range(n):
        assert "gpus" in sampler.sample()
    smi_ms = (time.perf_counter() - start) / n * 1e3
    print("\nresource sample: %.0f us from /proc; %.1f ms with a (fake) nvidia-smi" % (proc_us, smi_ms))


# ---------------------------------------------------------------------------------------
# GPUs through nvidia-smi
# ---------------------------------------------------------------------------------------

GPU_CSV = (
    "0, GPU-aaaa1111-2222-3333-4444-555555555555, NVIDIA H100 80GB HBM3, 87, 40960, 81559, 61\n"
    "1, GPU-bbbb1111-2222-3333-4444-555555555555, NVIDIA H100 80GB HBM3, 3, 512.5, 81559, [N/A]\n"
)


def fake_nvidia_smi(folder, gpu_csv, apps, body=None):
    """Write an executable ``nvidia-smi`` that prints ``gpu_csv`` / ``apps`` for the two queries
    the sampler makes, and records its arguments in ``calls`` beside it."""
    if sys.platform == "win32":
        pytest.skip("the fake nvidia-smi is a shell script")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "gpus.csv").write_text(gpu_csv)
    (folder / "apps.csv").write_text(apps)
    path = folder / "nvidia-smi"
    path.write_text(
        body
        or (
            "#!/bin/sh\n"
            'here=$(dirname "$0")\n'
            'echo "$*" >> "$here/calls"\n'
            'case "$1" in\n'
            '  --query-gpu=*) cat "$here/gpus.csv" ;;\n'
            '  --query-compute-apps=*) cat "$here/apps.csv" ;;\n'
            "  *) exit 6 ;;\n"
            "esac\n"
        )
    )
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return str(path)


def gpu_sampler(tmp_path, monkeypatch, smi="auto", **kwargs):
    """A sampler whose only figures are the GPUs' (no /proc, no psutil, no disk)."""
    monkeypatch.setitem(sys.modules, "psutil", None)  # import psutil fails
    return argus._ResourceSampler(
        proc_root=str(tmp_path / "no-proc"), disk_path=str(tmp_path / "no-disk"), nvidia_smi=smi,
        use_pynvml=False, **kwargs
    )


@pytest.fixture
def two_gpus(tmp_path, monkeypatch):
    """A fake nvidia-smi first on PATH: two GPUs; this process holds memory on both."""
    pid = os.getpid()
    apps = "%d, GPU-aaaa1111-2222-3333-4444-555555555555, 30000\n" % pid
    apps += "99999999, GPU-aaaa1111-2222-3333-4444-555555555555, 7000\n"  # someone else's
    apps += "%d, GPU-bbbb1111-2222-3333-4444-555555555555, 100\n" % pid
    apps += "%d, GPU-bbbb1111-2222-3333-4444-555555555555, [N/A]\n" % pid
    folder = tmp_path / "bin"
    fake_nvidia_smi(folder, GPU_CSV, apps)
    monkeypatch.setenv("PATH", str(folder) + os.pathsep + os.environ.get("PATH", ""))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return folder


GPU0 = {"gpu_util_pct": 87, "gpu_mem_mb": 40960, "gpu_mem_total_mb": 81559, "gpu_temp_c": 61, "proc_gpu_mem_mb": 30000}
GPU1 = {"gpu_util_pct": 3, "gpu_mem_mb": 512.5, "gpu_mem_total_mb": 81559, "proc_gpu_mem_mb": 100}


def test_fake_nvidia_smi_on_path_gives_exact_figures_for_every_gpu(tmp_path, monkeypatch, two_gpus):
    sampler = gpu_sampler(tmp_path, monkeypatch)
    assert sampler._smi == str(two_gpus / "nvidia-smi")
    out = sampler.sample()
    assert out == dict(
        gpus=[
            {
                "index": 0, "uuid": "GPU-aaaa1111-2222-3333-4444-555555555555", "name": "NVIDIA H100 80GB HBM3",
                "util_pct": 87, "mem_mb": 40960, "mem_total_mb": 81559, "temp_c": 61, "proc_mem_mb": 30000,
            },
            {
                "index": 1, "uuid": "GPU-bbbb1111-2222-3333-4444-555555555555", "name": "NVIDIA H100 80GB HBM3",
                "util_pct": 3, "mem_mb": 512.5, "mem_total_mb": 81559, "temp_c": None, "proc_mem_mb": 100,
            },
        ],
        **GPU0,
    )
    assert (two_gpus / "calls").read_text().splitlines() == [
        "--query-gpu=index,uuid,name,utilization.gpu,memory.used,memory.total,temperature.gpu "
        "--format=csv,noheader,nounits",
        "--query-compute-apps=pid,gpu_uuid,used_memory --format=csv,noheader,nounits",
    ]


@pytest.mark.parametrize(
    "visible, flat",
    [
        ("0", GPU0),
        ("1", GPU1),
        ("1,0", GPU1),
        (" 1 , 0", GPU1),
        ("GPU-bbbb1111", GPU1),  # a UUID prefix, as CUDA accepts
        ("GPU-aaaa1111-2222-3333-4444-555555555555", GPU0),
        ("", {}),  # no device visible
        ("-1", {}),
        ("7,0", {}),  # an invalid first entry hides everything after it
        ("MIG-cccc", {}),
    ],
)
def test_cuda_visible_devices_picks_the_gpu_of_the_flat_fields(tmp_path, monkeypatch, two_gpus, visible, flat):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    out = gpu_sampler(tmp_path, monkeypatch).sample()
    assert len(out.pop("gpus")) == 2  # the per-GPU list always holds every GPU
    assert out == flat


def test_no_nvidia_smi_on_path_means_no_gpu_fields_and_no_error(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.WARNING, logger="argus")
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    sampler = gpu_sampler(tmp_path, monkeypatch)
    assert sampler._smi is None
    assert sampler.sample() == {} and sampler.sample() == {}
    assert messages(caplog) == []


def test_a_failing_nvidia_smi_is_turned_off_after_three_tries(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.WARNING, logger="argus")
    smi = fake_nvidia_smi(tmp_path / "bin", GPU_CSV, "", body="#!/bin/sh\necho broken >&2\nexit 9\n")
    sampler = gpu_sampler(tmp_path, monkeypatch, smi=smi)
    assert [sampler.sample() for _ in range(4)] == [{}, {}, {}, {}]
    assert sampler._smi is None
    assert messages(caplog) == [
        "argus: GPU sampling failed 3 times (OSError('nvidia-smi exited with 9')); it is turned off"
    ]


def test_a_hanging_nvidia_smi_is_bounded_by_its_timeout_then_turned_off(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.WARNING, logger="argus")
    # exec: the timeout's kill reaches the sleeping process itself, so nothing lingers.
    smi = fake_nvidia_smi(tmp_path / "bin", GPU_CSV, "", body="#!/bin/sh\nexec sleep 30\n")
    sampler = gpu_sampler(tmp_path, monkeypatch, smi=smi, smi_timeout=0.1)
    took = []
    for _ in range(4):
        start = time.monotonic()
        assert sampler.sample() == {}
        took.append(time.monotonic() - start)
    assert all(t < 1.5 for t in took[:3]), took
    assert took[3] < 0.05  # off: no more waiting
    assert len(messages(caplog)) == 1 and "GPU sampling failed 3 times" in messages(caplog)[0]


def test_gpu_sampling_recovers_when_nvidia_smi_fails_only_now_and_then(tmp_path, monkeypatch):
    folder = tmp_path / "bin"
    smi = fake_nvidia_smi(folder, GPU_CSV, "")
    sampler = gpu_sampler(tmp_path, monkeypatch, smi=smi)
    (folder / "gpus.csv").unlink()  # cat fails: nvidia-smi exits 1
    assert sampler.sample() == {} and sampler.sample() == {}
    (folder / "gpus.csv").write_text(GPU_CSV)
    assert sampler.sample()["gpu_util_pct"] == 87
    (folder / "gpus.csv").unlink()
    assert sampler.sample() == {} and sampler.sample() == {}  # the count started again
    assert sampler._smi == smi


# ---------------------------------------------------------------------------------------
# All three daemons in a Reporter
# ---------------------------------------------------------------------------------------


def test_all_three_daemons_run_and_stop_promptly_on_exit(fake, two_gpus, monkeypatch):
    monkeypatch.setattr(argus, "_init_nvml", lambda: None)  # the fake nvidia-smi, even beside pynvml
    with daemon_reporter(fake, heartbeat=0.05, stop_polling=0.05, resource_snapshot=0.05) as r:
        with r.job("j") as job:
            job.epoch(0, train_loss=1.0)
        assert fake.wait_for(lambda: len(fake.of_type("resource_snapshot")) >= 2 and stop_polls(fake) >= 2, 5)
        threads = list(r._threads)
        assert sorted(t.name for t in threads) == ["argus-heartbeat", "argus-resources", "argus-stop-poller"]
        assert all(t.is_alive() for t in threads)
        started = time.perf_counter()
    exit_s = time.perf_counter() - started
    print("\nReporter exit with all three daemons at 0.05 s: %.3f s" % exit_s)
    assert not any(t.is_alive() for t in threads)
    assert exit_s < argus.THREAD_JOIN_S  # no thread needed its join timeout
    samples = [e["data"] for e in fake.of_type("resource_snapshot") if "heartbeat" not in e["data"]]
    assert samples and all(s["gpu_util_pct"] == 87 and s["proc_gpu_mem_mb"] == 30000 for s in samples)
    assert all(s["gpus"][1]["mem_mb"] == 512.5 for s in samples)
    assert fake.types()[-1] == "batch_done"


def test_a_sample_that_outlives_the_exit_is_dropped_not_spilled(fake, tmp_path, monkeypatch, spill_dir):
    # A hanging nvidia-smi keeps the sampler busy past the join; THREAD_JOIN_S and the
    # sampler's smi_timeout are shrunk so that this takes a fraction of a second, as with
    # the real 2 s each when nvidia-smi answers the first query and hangs on the second.
    smi = fake_nvidia_smi(tmp_path / "bin", GPU_CSV, "", body="#!/bin/sh\nexec sleep 30\n")
    monkeypatch.setattr(argus, "_ResourceSampler", functools.partial(
        argus._ResourceSampler, nvidia_smi=smi, smi_timeout=0.3, use_pynvml=False
    ))
    monkeypatch.setattr(argus, "THREAD_JOIN_S", 0.05)
    with daemon_reporter(fake, resource_snapshot=0.01) as r:
        time.sleep(0.1)  # the first sample is inside nvidia-smi
    sampler = [t for t in r._threads if t.name == "argus-resources"][0]
    sampler.join(2)
    assert not sampler.is_alive()
    assert fake.types()[-1] == "batch_done"
    assert [e["event_type"] for e in spilled_events(spill_dir)] == []
