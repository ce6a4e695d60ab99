"""argus-reporter: push experiment events from training scripts into an Argus server.

A single file with no dependencies other than the standard library (``requests`` is used
when it is importable). Calls cost microseconds, delivery happens on one background
thread, and nothing is lost: what cannot be delivered is spilled to disk and re-sent.

    from argus import Reporter

    with Reporter(source_project="my-paper", experiment_type="forecast") as r:
        with r.job("etth1_dlinear", model="dlinear", dataset="etth1") as job:
            for epoch in range(10):
                job.epoch(epoch, train_loss=0.3, val_loss=0.4, lr=1e-3)

Configure with ``ARGUS_URL`` and ``ARGUS_TOKEN``; ``python argus.py demo`` shows it working.

Contents: the sections below, under these titles, in the order an event travels.

    Constants and configuration     protocol constants, environment variables, url and token
    Reporter and JobContext         the public API: batches, jobs, epochs, artifacts
    Module-level helpers            batch ids, emit(), sub_env()
    Job logs                        tracebacks, LogHandler, console capture
    The delivery core               ExperimentReporter, a facade over the queue it holds and
                                    its parts: _Worker (thread, lifecycle), _Sender (one
                                    request, its answer, pacing), _Replayer (spill -> server)
    The spill store on disk         SpillStore, _Claim
    Transports                      http.client, or requests where it is installed
    Values and events               values made JSON-safe, event ids, timestamps, the source
    Process lifecycle               one shutdown path: SIGTERM, atexit, fork
    Appendices                      Resource sampling, Framework integrations, Local
                                    collector, Command-line interface (main)
"""

from __future__ import annotations

__version__ = "0.2.0"

__all__ = [
    "SCHEMA_VERSION",
    "EVENT_TYPES",
    "Reporter",
    "JobContext",
    "LogHandler",  # noqa: F822 - made on first access by the module's __getattr__
    "ExperimentReporter",
    "SpillStore",
    "derive_batch_id",
    "emit",
    "new_batch_id",
    "set_batch_id",
    "get_batch_id",
    "sub_env",
    "main",
]

import atexit
import itertools
import operator
import os
import sys
import threading
import time
import weakref
from collections import deque

# json, logging, signal, ssl, http.client, subprocess and hashlib are imported where they
# are first needed: together they cost more than the whole budget for `import argus`.

# ---------------------------------------------------------------------------------------
# Constants and configuration
# ---------------------------------------------------------------------------------------

SCHEMA_VERSION = "1.1"

# The nine event types of schema 1.1, and the extra one the server stores once per batch.
EVENT_TYPES = (
    "batch_start",
    "batch_done",
    "batch_failed",
    "job_start",
    "job_epoch",
    "job_done",
    "job_failed",
    "resource_snapshot",
    "log_line",
)
_SERVER_EXTRA_TYPES = ("env_snapshot",)
_JOB_EVENT_TYPES = frozenset(("job_start", "job_epoch", "job_done", "job_failed", "log_line"))
_SOURCE_KEYS = ("project", "host", "user", "commit", "command")
_ACKED = frozenset(("accepted", "deduplicated"))  # the per-event results that mean stored

ARTIFACT_EXTENSIONS = (".png", ".jpg", ".jpeg", ".pdf", ".svg")
ARTIFACT_MAX_BYTES = 50 * 1024 * 1024  # the server's per-file cap (413 above it)
ARTIFACT_MAX_JOB_BYTES = 500 * 1024 * 1024  # the server's artifact quota per job

DEFAULT_HEARTBEAT_S = 300.0
DEFAULT_STOP_POLL_S = 10.0
DEFAULT_RESOURCE_S = 30.0
THREAD_JOIN_S = 2.0  # Reporter.__exit__ waits at most this long for each daemon thread
DRAIN_S = 3.0  # ... and at most this long for the queue to drain (ARGUS_DRAIN_S: longer)
JOURNAL_AFTER_S = 1.0  # an event the server has not acknowledged is on disk after this long

MAX_BATCH_EVENTS = 500  # the server's limit per /api/events/batch request
MAX_BATCH_BYTES = 2 * 1024 * 1024  # keep request bodies bounded
MAX_STRING_CHARS = 16 * 1024  # longer strings (log lines, reasons) are truncated
TRACEBACK_MAX_BYTES = 16 * 1024  # a failed job's traceback keeps its last 16 KiB
CAPTURE_MAX_LINES_S = 20  # console lines sent per second per job; the rest are counted
_MAX_EVENT_CHARS = 64 * 1024  # an encoded event above this is re-encoded with truncation
_MAX_DEPTH = 16  # nesting depth of values kept as structures

RETRY_ATTEMPTS = 5  # 5xx / network failures before a chunk is spilled
TARGET_REQUEST_S = 1.5  # requests are sized so that the server answers in about this long
MIN_BATCH_EVENTS = 10  # ... but never smaller than this
REQUEST_TIMEOUT_MAX_S = 120.0  # the timeout grows with what a request carries, up to this
PACE_MAX_S = 30.0  # after 429s, the gap between requests grows up to this
LINGER_S = 0.75  # a request with less than a full batch leaves at most this often
RETRY_BASE_S = 0.5
RETRY_MAX_S = 30.0  # cap of the backoff between probes of a down server
RETRY_AFTER_CAP_S = 60.0  # a 429's Retry-After is honoured up to this
AUTH_PROBE_S = 60.0  # after 401/403/404, try again this often (doubling, up to 10 min)
UPLOAD_WAIT_S = 120.0  # job.upload() waits at most this long for its files
AUTO_UPLOAD_WAIT_S = 30.0  # the batch's auto_upload_dirs, at exit, wait at most this long

ENV_URL = "ARGUS_URL"
ENV_TOKEN = "ARGUS_TOKEN"
ENV_DISABLE = "ARGUS_DISABLE"  # 1/true/yes/on: the SDK becomes a no-op
ENV_BATCH_ID = "ARGUS_BATCH_ID"  # set by set_batch_id() for child processes
ENV_TRANSPORT = "ARGUS_TRANSPORT"  # "requests" or "urllib" (standard library)
ENV_CA_BUNDLE = "ARGUS_CA_BUNDLE"  # CA file used by this SDK only
ENV_SPILL_DIR = "ARGUS_SPILL_DIR"  # where undeliverable events wait (default ~/.argus-reporter)
ENV_SPILL_MAX_MB = "ARGUS_SPILL_MAX_MB"  # cap on the spill directory's total size
ENV_SPILL_ROTATE_S = "ARGUS_SPILL_ROTATE_S"  # an open spill file is closed for replay after this
ENV_QUEUE_SIZE = "ARGUS_QUEUE_SIZE"  # in-memory queue bound of a Reporter, in events
ENV_HANDLE_SIGTERM = "ARGUS_HANDLE_SIGTERM"  # 0 leaves SIGTERM alone
ENV_ALL_RANKS = "ARGUS_ALL_RANKS"  # 1: every DDP/SLURM rank reports, not only rank 0
ENV_OFFLINE = "ARGUS_OFFLINE"  # 1: no network, every event goes to the spill store
ENV_DURABLE = "ARGUS_DURABLE"  # 1: every event reaches the kernel before the call returns
ENV_DRAIN_S = "ARGUS_DRAIN_S"  # seconds the exit may wait for delivery (default DRAIN_S)
ENV_SYNC_ON_EXIT = "ARGUS_SYNC_ON_EXIT"  # 1: hand a backlog left at exit to a detached `argus sync`
ENV_MODE = "ARGUS_MODE"  # "offline" is the same as ARGUS_OFFLINE=1
ENV_CAPTURE_OUTPUT = "ARGUS_CAPTURE_OUTPUT"  # 1: Reporter(capture_output=True) by default
ENV_TRACEBACKS = "ARGUS_TRACEBACKS"  # 0: a failed job's traceback is not sent to its log

DEFAULT_SPILL_MAX_MB = 1024.0
DEFAULT_SPILL_ROTATE_S = 30.0
DEFAULT_QUEUE_SIZE = 100_000
QUEUE_MAX_BYTES = 64 * 1024 * 1024  # bound on the bytes of strings waiting in memory
_SPILL_ROTATE_BYTES = 16 * 1024 * 1024
_MAP_CHUNK = 256 * 1024  # durable mode's spill file grows (and is mapped) this much at a time
_MONITOR_YAML = os.path.join("configs", "monitor.yaml")
_USER_AGENT = "argus-reporter/%s (schema=%s; python/%d.%d)" % (
    __version__,
    SCHEMA_VERSION,
    sys.version_info[0],
    sys.version_info[1],
)

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")

_now = time.time
_mono = time.monotonic


def _env_flag(name: str, default: bool = False) -> bool:
    value = os.environ.get(name, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    return default


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        return float(raw)
    except ValueError:
        _log_once("env:" + name, "warning", "%s=%r is not a number; using %s", name, raw, default)
        return default


_LOG = None
_logged_once = set()


def _logger():
    global _LOG
    if _LOG is None:
        import logging

        _LOG = logging.getLogger(__name__)
    return _LOG


def _log(level: str, msg: str, *args) -> None:
    try:
        getattr(_logger(), level)(msg, *args)
    except Exception:  # logging must never break the caller
        pass


_serials = itertools.count(1)


def _said_key(owner) -> int:
    """A number for ``owner`` in _log_once's keys, its own for the life of the process:
    unlike id(), not reused by a later object (whose line would then never be said)."""
    serial = owner.__dict__.get("_said_serial")
    if serial is None:
        serial = owner.__dict__["_said_serial"] = next(_serials)
    return serial


def _log_once(key: str, level: str, msg: str, *args) -> None:
    if key not in _logged_once:
        _logged_once.add(key)
        _log(level, msg, *args)


def _offline_mode() -> bool:
    return _env_flag(ENV_OFFLINE) or os.environ.get(ENV_MODE, "").strip().lower() == "offline"


def _read_monitor_yaml(path: str = _MONITOR_YAML) -> dict:
    """Read the flat ``key: value`` lines of configs/monitor.yaml without PyYAML."""
    values = {}
    with open(path, encoding="utf-8") as f:
        for raw in f:
            line = raw.split(" #", 1)[0].strip()
            if not line or line.startswith("#") or ":" not in line:
                continue
            key, _, value = line.partition(":")
            value = value.strip().strip("'\"")
            if value:
                values[key.strip()] = value
    return values


def _resolve_url(monitor_url: str | None = None) -> tuple:
    """Return ``(url, source)``; ``(None, None)`` when no URL is configured or it is invalid."""
    if monitor_url:
        url, source = monitor_url.strip(), "argument"
    elif os.environ.get(ENV_URL, "").strip():
        url, source = os.environ[ENV_URL].strip(), "environment (%s)" % ENV_URL
    else:
        url = source = None
        if os.path.exists(_MONITOR_YAML):
            try:
                cfg = _read_monitor_yaml()
            except (OSError, UnicodeDecodeError) as exc:
                _log_once("yaml", "error", "argus: cannot read %s: %s", _MONITOR_YAML, exc)
                cfg = {}
            url = cfg.get("url") or cfg.get("monitor_url")
            source = _MONITOR_YAML if url else None
    if url and not url.lower().startswith(("http://", "https://")):
        _log_once(
            "url:" + url,
            "error",
            "argus: the server URL %r (from %s) has no scheme; write it as http://host:port "
            "or https://host. Events are not sent.",
            url,
            source,
        )
        return None, None
    return (url.rstrip("/"), source) if url else (None, None)


def _resolve_token(token: str | None = None) -> tuple:
    """Return ``(token, source)``; surrounding whitespace is removed with a warning."""
    if token is not None:
        source = "argument"
    elif os.environ.get(ENV_TOKEN) is not None:
        token, source = os.environ[ENV_TOKEN], "environment (%s)" % ENV_TOKEN
    else:
        return None, None
    if token != token.strip():
        _log_once(
            "token-ws",
            "warning",
            "argus: the token from %s has surrounding whitespace; it was stripped",
            source,
        )
        token = token.strip()
    if any(c.isspace() for c in token):
        _log_once(
            "token-inner-ws",
            "error",
            "argus: the token from %s contains whitespace; the server will refuse it. "
            "Copy the em_live_... token again.",
            source,
        )
    if token and len(token) >= 6:
        _known_secrets.add(token)
    return (token or None), (source if token else None)


def _ca_bundle() -> str | None:
    for name in (ENV_CA_BUNDLE, "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"):
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return None


def _default_spill_dir() -> str:
    configured = os.environ.get(ENV_SPILL_DIR, "").strip()
    return os.path.expanduser(configured or os.path.join("~", ".argus-reporter"))


# ---------------------------------------------------------------------------------------
# Reporter and JobContext
# ---------------------------------------------------------------------------------------


def _interval(value, default: float, name: str):
    if value is True:
        return default
    if value is False or value is None:
        return None
    if isinstance(value, (int, float)) and value > 0:
        return float(value)
    raise ValueError("%s must be True, False or a number of seconds > 0; got %r" % (name, value))


def _rank_elsewhere():
    """The (variable, rank) of a DDP/SLURM rank other than 0, else None."""
    for name in ("RANK", "SLURM_PROCID"):
        raw = os.environ.get(name, "").strip()
        if raw:
            try:
                return (name, int(raw)) if int(raw) != 0 else None
            except ValueError:
                return None
    return None


class Reporter:
    """Context manager for one experiment batch.

    ``__enter__`` emits ``batch_start`` and starts the heartbeat, stop-poll and
    resource-snapshot daemon threads; ``__exit__`` emits ``batch_done`` (or ``batch_failed``
    when the block raised), uploads ``auto_upload_dirs`` on a clean exit, stops the daemons
    (at most 2 s each) and drains the queue (at most 3 s; the rest is spilled to disk).
    """

    def __init__(
        self,
        batch_prefix: str = "batch",
        *,
        experiment_type: str | None = None,
        source_project: str | None = None,
        command: str | None = None,
        n_total: int | None = None,
        heartbeat: bool | float = True,
        stop_polling: bool | float = True,
        resource_snapshot: bool | float = True,
        monitor_url: str | None = None,
        token: str | None = None,
        auto_upload_dirs=None,
        batch_id: str | None = None,
        resume_from: str | None = None,
        all_ranks: bool | None = None,
        durable: bool | None = None,
        drain_timeout: float | None = None,
        capture_output: bool | None = None,
    ):
        if not isinstance(batch_prefix, str) or not batch_prefix:
            raise TypeError("batch_prefix must be a non-empty string; got %r" % (batch_prefix,))
        for value in (batch_id, resume_from):
            if value is not None:
                _check_batch_id(value)
        if isinstance(auto_upload_dirs, (str, bytes)) or hasattr(auto_upload_dirs, "__fspath__"):
            auto_upload_dirs = [auto_upload_dirs]
        if drain_timeout is not None and not (isinstance(drain_timeout, (int, float)) and drain_timeout >= 0):
            raise ValueError("drain_timeout must be a number of seconds >= 0; got %r" % (drain_timeout,))
        self._batch_id = batch_id or resume_from or new_batch_id(batch_prefix)
        self.experiment_type = experiment_type
        self.source_project = source_project or "default"
        self.command = command
        self.n_total = n_total
        self._intervals = (
            _interval(heartbeat, DEFAULT_HEARTBEAT_S, "heartbeat"),
            _interval(stop_polling, DEFAULT_STOP_POLL_S, "stop_polling"),
            _interval(resource_snapshot, DEFAULT_RESOURCE_S, "resource_snapshot"),
        )
        self._monitor_url = monitor_url
        self._token = token
        self._auto_upload_dirs = list(auto_upload_dirs or ())
        self._all_ranks = all_ranks
        self._durable = durable
        self._drain_timeout = drain_timeout
        self._job_ids = {}  # job id -> how many jobs used it (a repeat is renamed id-2, id-3...)
        self._end_sent = False
        self._capture = _env_flag(ENV_CAPTURE_OUTPUT) if capture_output is None else bool(capture_output)
        self._sender = None
        self._stopped = False
        self._jobs = []
        self._n_done = 0
        self._n_failed = 0
        self._threads = []
        self._halt = threading.Event()
        self._poll_transport = None
        self._entered = False
        self._finishing = False
        self._finished = False
        self._pid = None
        self._t0 = 0.0
        self._env_thread = None

    @property
    def batch_id(self) -> str:
        return self._batch_id

    @property
    def stopped(self) -> bool:
        """True once the Argus UI's Stop button was pressed for this batch."""
        return self._stopped

    def job(self, job_id: str, *, model: str | None = None, dataset: str | None = None) -> JobContext:
        """A job of this batch: ``with r.job("etth1_dlinear", model=..., dataset=...) as job:``."""
        return JobContext(self, job_id, model=model, dataset=dataset)

    def _claim_job_id(self, job_id: str) -> str:
        """The id a new job is recorded under: a repeat in this batch gets a suffix."""
        uses = self._job_ids.get(job_id, 0) + 1
        self._job_ids[job_id] = uses
        if "/" in job_id and uses == 1:
            _log_once(
                "slash:" + job_id,
                "warning",
                "argus: job id %r contains '/': its events are recorded, but the server cannot "
                "address its artifacts, so its uploads are skipped. Use another separator, "
                "e.g. %r.",
                job_id,
                job_id.replace("/", ":"),
            )
        if uses == 1:
            return job_id
        renamed = "%s-%d" % (job_id, uses)
        while renamed in self._job_ids:
            uses += 1
            renamed = "%s-%d" % (job_id, uses)
        self._job_ids[renamed] = 1
        _log(
            "warning",
            "argus: job id %r was already used in batch %s; this job is recorded as %r. "
            "Give each job of a batch its own id.",
            job_id,
            self._batch_id,
            renamed,
        )
        return renamed

    def emit(self, event: str, **fields) -> None:
        """Send one event of any type in this batch (escape hatch for unusual events)."""
        if event not in EVENT_TYPES and event not in _SERVER_EXTRA_TYPES:
            raise ValueError(
                "unknown event type %r: use one of %s" % (event, ", ".join(EVENT_TYPES + _SERVER_EXTRA_TYPES))
            )
        if "batch_id" in fields:
            _emit_batch_id(fields, "Reporter.emit")
        if self._sender is not None:
            self._sender.emit(event, batch_id=self._batch_id, **fields)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until what was emitted so far is delivered or spilled."""
        return self._sender.flush(timeout) if self._sender is not None else True

    def __enter__(self) -> Reporter:
        if self._entered:
            raise RuntimeError("a Reporter can be entered once; create a new one for a new batch")
        self._entered = True
        self._pid = os.getpid()
        self._t0 = _mono()
        elsewhere = _rank_elsewhere()
        all_ranks = _env_flag(ENV_ALL_RANKS) if self._all_ranks is None else self._all_ranks
        if elsewhere and not all_ranks:
            _log_once(
                "rank",
                "info",
                "argus: this process is rank %d (%s); only rank 0 reports. Set %s=1 or "
                "Reporter(all_ranks=True) to report from every rank.",
                elsewhere[1],
                elsewhere[0],
                ENV_ALL_RANKS,
            )
        else:
            sender = ExperimentReporter(
                self._monitor_url,
                self.source_project,
                auth_token=self._token,
                queue_size=int(_env_float(ENV_QUEUE_SIZE, DEFAULT_QUEUE_SIZE)),
                batch_id=self._batch_id,
                durable=self._durable,
            )
            if sender.enabled:
                self._sender = sender
                sender.batch_start(
                    self.experiment_type,
                    self.n_total,
                    command=self.command if self.command is not None else _process_command(),
                )
        _active.append(self)
        self._env_thread = threading.get_ident()
        _publish_batch_env()
        if self._sender is not None:
            _install_sigterm()
            self._start_daemons()
            _capture_start(self)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self._finishing or os.getpid() != self._pid:
            return False  # a forked child leaving the block does not end the parent's batch
        if exc_type is not None and issubclass(exc_type, GeneratorExit):
            exc_type = exc = None
        try:
            self._finish(exc_type, exc)
        except Exception as exc2:  # never out of __exit__
            _log("error", "argus: error while ending batch %s: %r", self._batch_id, exc2)
        return False

    def _finish(self, exc_type, exc, reason: str | None = None) -> None:
        self._finishing = True
        self._halt.set()
        if self._poll_transport is not None:  # a poll that a server dribbles out ends now
            self._poll_transport.abort()
        for thread in self._threads:
            thread.join(THREAD_JOIN_S)
        sender = self._sender
        if sender is not None:
            try:
                if exc_type is None and reason is None:
                    self._upload_dirs(sender)  # a SIGTERM here ends the batch as failed instead
                    self._send_end(None)
                else:
                    self._send_end(reason or _reason(exc_type, exc))
            finally:
                sender.close(_drain_s(self._drain_timeout))
        self._finished = True
        self._leave()

    def _send_end(self, failure: str | None) -> None:
        """batch_done, or batch_failed with ``failure``: exactly one of them, once."""
        if self._end_sent or self._sender is None:
            return
        self._end_sent = True
        elapsed = round(_mono() - self._t0, 3)
        if failure is None:
            self._sender.batch_done(self._n_done, self._n_failed, total_elapsed_s=elapsed)
        else:
            self._sender.batch_failed(failure, total_elapsed_s=elapsed)

    def _leave(self) -> None:
        _capture_stop(self)
        if self in _active:
            _active.remove(self)
        if threading.get_ident() == self._env_thread:
            _publish_batch_env()
        _uninstall_sigterm()

    def _terminate(self, reason: str) -> None:
        """SIGTERM: fail the open jobs and the batch, then flush or spill within the bounds."""
        if self._finished or self._pid != os.getpid():
            return
        self._finishing = True
        self._halt.set()
        if self._poll_transport is not None:  # a poll that a server dribbles out ends now
            self._poll_transport.abort()
        for job in reversed(list(self._jobs)):
            job._end(None, None, reason)
        self._send_end(reason)
        if self._sender is not None:
            self._sender.close(_drain_s(self._drain_timeout))
        self._finished = True
        self._leave()

    def _upload_dirs(self, sender: ExperimentReporter) -> None:
        uploads = []
        for directory in self._auto_upload_dirs:
            for path in _artifact_files(os.fsdecode(directory), "**/*"):
                route = "/api/batches/%s/artifacts" % _quote(self._batch_id)
                uploads.append(_Upload(route, path, None, None, True))
        if uploads:
            sender._uploads(uploads, AUTO_UPLOAD_WAIT_S)

    # -- daemon threads -------------------------------------------------------------------

    def _start_daemons(self) -> None:
        heartbeat, stop_poll, resources = self._intervals
        if stop_poll and self._sender._offline:
            _log_once("offline-stop", "info", "argus: offline mode: the Stop button is not polled")
            stop_poll = None
        for name, target, interval in (
            ("argus-stop-poller", self._poll_stop, stop_poll),
            ("argus-heartbeat", self._beat, heartbeat),
            ("argus-resources", self._sample, resources),
        ):
            if interval:
                thread = threading.Thread(target=target, args=(interval,), name=name, daemon=True)
                thread.start()
                self._threads.append(thread)

    def _poll_stop(self, interval: float) -> None:
        sender = self._sender
        route = "/api/batches/%s/stop-requested" % _quote(self._batch_id)
        transport = None
        delay = interval
        backoff = 1.0  # doubles on each 429 of the poll itself, halves on each answer
        try:
            while not self._halt.wait(delay):
                # A shared token's budget goes to the events first: while ingest is being
                # paced (429s), the poll waits several of its gaps.
                delay = interval * backoff + 4.0 * sender.sender._pace_gap
                try:
                    if transport is None:
                        transport = self._poll_transport = _make_transport(sender.url, sender._token)
                    status, headers, body = transport.request(
                        "GET", route, timeout=min(THREAD_JOIN_S, max(1.0, interval))
                    )
                except _NetworkError:
                    continue
                except Exception as exc:  # a fault costs this poll, never the poller
                    _log_once("poll:%d" % _said_key(self), "warning", "argus: a stop poll failed: %r", exc)
                    continue
                if status != 429:
                    backoff = max(1.0, backoff / 2)
                if status == 200:
                    try:
                        answer = _loads(body.decode("utf-8"))
                    except ValueError:
                        continue
                    if isinstance(answer, dict) and (
                        answer.get("requested") is True or answer.get("stop_requested") is True
                    ):
                        self._stopped = True
                        _log("warning", "argus: Stop was requested for batch %s", self._batch_id)
                        return
                elif status == 429:
                    backoff = min(32.0, backoff * 2)
                    delay = max(interval * backoff, _retry_after(headers, interval)) + 4.0 * sender.sender._pace_gap
                elif status in (401, 403):
                    _log(
                        "error",
                        "argus: the stop poller was refused (%d %s); the Stop button will not "
                        "work for this run",
                        status,
                        _error_text(body),
                    )
                    return
                # 404: the server has not stored the batch yet; anything else: try again
        except Exception as exc:
            _log("error", "argus: the stop poller stopped: %r", exc)
        finally:
            if transport is not None:
                transport.close()

    def _beat(self, interval: float) -> None:
        """A batch-level resource_snapshot when nothing was sent for ``interval`` seconds, so
        that a quiet but healthy run does not look stalled. It carries a cheap real sample
        (this process's memory and CPU): a row of nulls is an empty point in the charts."""
        sender = self._sender
        sample = _ProcessSample()
        try:
            while True:
                if sender._queue or sender.worker._inflight:  # events are on their way: not quiet
                    sender.sender._last_activity = _mono()
                quiet = _mono() - sender.sender._last_activity
                if self._halt.wait(max(0.05, interval - quiet)):
                    return
                if sender._queue or sender.worker._inflight:
                    sender.sender._last_activity = _mono()
                if _mono() - sender.sender._last_activity >= interval:
                    sender.resource_snapshot(
                        heartbeat=True, elapsed_s=round(_mono() - self._t0, 1), **sample.take()
                    )
                    sender.sender._last_activity = _mono()
        except Exception as exc:
            _log("error", "argus: the heartbeat stopped: %r", exc)

    def _sample(self, interval: float) -> None:
        try:
            sampler = _ResourceSampler()
            while not self._halt.wait(interval):
                fields = sampler.sample()
                if fields and not self._halt.is_set():  # a late sample would outlive the batch
                    self._sender.resource_snapshot(**fields)
        except Exception as exc:
            _log("error", "argus: resource sampling stopped: %r", exc)

    def _after_fork(self) -> None:
        self._threads = []  # they do not exist in the child
        self._halt = threading.Event()


class _ProcessSample:
    """This process's resident memory (MB) and CPU use (% of one core since the last take):
    two cheap reads, no /proc walk, no GPU query."""

    def __init__(self):
        self._cpu = self._cpu_s()
        self._at = _mono()

    @staticmethod
    def _cpu_s() -> float:
        times = os.times()
        return times[0] + times[1]

    def take(self) -> dict:
        out = {}
        now, cpu = _mono(), self._cpu_s()
        if now > self._at:
            out["proc_cpu_pct"] = round(100.0 * (cpu - self._cpu) / (now - self._at), 1)
        self._cpu, self._at = cpu, now
        try:
            with open("/proc/self/statm", "rb") as f:
                resident = int(f.read().split()[1])
            out["proc_ram_mb"] = round(resident * os.sysconf("SC_PAGE_SIZE") / 1048576.0, 1)
        except (OSError, ValueError, IndexError, AttributeError):
            try:
                import resource

                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB on Linux, bytes on macOS
                out["proc_ram_mb"] = round(peak / (1048576.0 if sys.platform == "darwin" else 1024.0), 1)
            except (ImportError, OSError, AttributeError):
                pass
        return out


def _artifact_files(path, pattern: str) -> list:
    from pathlib import Path

    root = Path(path)
    if root.is_file():
        files = [root]
    elif root.is_dir():
        files = sorted(p for p in root.glob(pattern) if p.is_file())
    else:
        _log("warning", "argus: %s does not exist; nothing uploaded", root)
        return []
    kept = [str(p) for p in files if p.suffix.lower() in ARTIFACT_EXTENSIONS]
    if len(kept) < len(files):
        _log(
            "info",
            "argus: %d file(s) under %s skipped: only %s are uploaded",
            len(files) - len(kept),
            root,
            "/".join(ARTIFACT_EXTENSIONS),
        )
    return kept


class _Ended:
    """Stands in for the sender of a job whose block ended: its calls are refused, once loudly."""

    _slow = True


_ENDED = _Ended()


class JobContext:
    """Context manager for one job of a batch: ``job_start`` in, ``job_done``/``job_failed`` out."""

    def __init__(self, parent: Reporter, job_id: str, *, model: str | None = None, dataset: str | None = None):
        if not isinstance(parent, Reporter):
            raise TypeError("JobContext needs a Reporter: use `with reporter.job(job_id) as job:`")
        _check_job_id(job_id)
        self._parent = parent
        self._job_id = job_id
        self._model = model
        self._dataset = dataset
        self._sender = None
        self._metrics = {}
        self._epochs = 0
        self._entered = False
        self._done = False
        self._pid = None
        self._t0 = 0.0

    @property
    def job_id(self) -> str:
        return self._job_id

    @property
    def stopped(self) -> bool:
        return self._parent._stopped

    def __enter__(self) -> JobContext:
        if self._entered:
            raise RuntimeError("a JobContext can be entered once; call reporter.job(...) again")
        self._entered = True
        self._pid = os.getpid()
        self._t0 = _mono()
        self._job_id = self._parent._claim_job_id(self._job_id)
        self._sender = self._parent._sender
        self._parent._jobs.append(self)
        if self._sender is not None:
            self._sender.job_start(self._job_id, model=self._model, dataset=self._dataset)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self._done or os.getpid() != self._pid:
            return False
        if exc_type is not None and issubclass(exc_type, GeneratorExit):
            exc_type = exc = None
        try:
            self._end(exc_type, exc)
        except Exception as exc2:  # never out of __exit__
            _log("error", "argus: error while ending job %s: %r", self._job_id, exc2)
        return False

    def _end(self, exc_type, exc, reason: str | None = None) -> None:
        self._done = True
        try:
            _end_job_log(self, exc)  # its last console lines, then the traceback of a failure
        except Exception as exc2:
            _log("error", "argus: could not send the end of job %s's log: %r", self._job_id, exc2)
        self._sender_after = self._sender
        self._sender = _ENDED
        parent = self._parent
        if self in parent._jobs:
            parent._jobs.remove(self)
        elapsed = round(_mono() - self._t0, 3)
        sender = self._sender_after
        if exc_type is None and reason is None:
            parent._n_done += 1
            if sender is not None:
                sender.job_done(
                    self._job_id, metrics=self._metrics or None, elapsed_s=elapsed, train_epochs=self._epochs
                )
        else:
            parent._n_failed += 1
            if sender is not None:
                sender.job_failed(self._job_id, reason=reason or _reason(exc_type, exc), elapsed_s=elapsed)

    def _not_entered(self) -> None:
        if not self._entered:
            raise RuntimeError("use the job as a context manager: `with reporter.job(job_id) as job:`")

    def _after_end(self, call: str) -> None:
        _log_once(
            "ended:%d" % _said_key(self),
            "warning",
            "argus: job.%s() for job %r after its `with` block ended is not sent. Call it "
            "inside the block.",
            call,
            self._job_id,
        )

    def epoch(
        self, epoch: int, *, train_loss=None, val_loss=None, lr=None, batch_time_ms=None, **extra
    ) -> None:
        """Emit one ``job_epoch`` event (None values are left out)."""
        # The hot path of every training loop: ExperimentReporter._submit inlined.
        sender = self._sender
        if sender is None or sender._slow or extra:
            return self._epoch(epoch, train_loss, val_loss, lr, batch_time_ms, extra)
        self._epochs += 1
        data = {"epoch": epoch}
        check = type(epoch) is not int  # an int epoch and float values need no look
        if type(train_loss) is float:
            data["train_loss"] = train_loss
        elif train_loss is not None:
            data["train_loss"] = train_loss
            check = True
        if type(val_loss) is float:
            data["val_loss"] = val_loss
        elif val_loss is not None:
            data["val_loss"] = val_loss
            check = True
        if type(lr) is float:
            data["lr"] = lr
        elif lr is not None:
            data["lr"] = lr
            check = True
        if type(batch_time_ms) is float:
            data["batch_time_ms"] = batch_time_ms
        elif batch_time_ms is not None:
            data["batch_time_ms"] = batch_time_ms
            check = True
        if check:
            for value in data.values():
                if type(value) not in _PLAIN_TYPES:
                    data = _jsonable(data)
                    data["epoch"] = _epoch_number(epoch)
                    break
        if sender.durable:
            if check:  # not an int epoch and floats: a compact journal line
                return sender._submit_durable("job_epoch", self._job_id, data)
            return sender._submit_durable(
                "job_epoch", self._job_id, data, None, (train_loss, val_loss, lr, batch_time_ms)
            )
        queue = sender._queue
        if len(queue) >= sender._qmax:
            return sender._overflow(("job_epoch", sender._batch_id, self._job_id, _now(), data, 0))
        queue.append(("job_epoch", sender._batch_id, self._job_id, _now(), data, 0))
        if sender._idle:
            sender._wake()

    def _epoch(self, epoch, train_loss, val_loss, lr, batch_time_ms, extra) -> None:
        sender = self._sender
        if sender is None:
            return self._not_entered()
        if sender is _ENDED:
            return self._after_end("epoch")
        self._epochs += 1
        data = {"epoch": _epoch_number(epoch)}
        for key, value in (
            ("train_loss", train_loss),
            ("val_loss", val_loss),
            ("lr", lr),
            ("batch_time_ms", batch_time_ms),
        ):
            if value is not None:
                data[key] = value
        data.update({k: v for k, v in extra.items() if v is not None})
        sender._submit("job_epoch", self._job_id, data)

    def metrics(self, m: dict) -> None:
        """Stash final metrics; they are sent with ``job_done``."""
        if not isinstance(m, dict):
            raise TypeError("metrics() takes a dict, e.g. job.metrics({'MSE': 0.44}); got %r" % (m,))
        if self._sender is _ENDED:
            return self._after_end("metrics")
        self._metrics.update(_jsonable(m))

    def log(self, message, level: str = "INFO") -> None:
        """Emit a ``log_line`` event (level in lower case; long lines are truncated)."""
        sender = self._sender
        if sender is None:
            return self._not_entered()
        if sender is _ENDED:
            return self._after_end("log")
        sender.log_line(self._job_id, message, level=level)

    def upload(self, path, *, glob: str = "**/*.png") -> int:
        """Upload a file, or the files under a directory matching ``glob``.

        Only .png/.jpg/.jpeg/.pdf/.svg files are sent. Returns how many were uploaded; uploads
        leave after the events queued before them and are skipped while the server is
        unreachable (or recorded for ``argus sync`` in offline mode).
        """
        sender = self._sender
        if sender is None:
            self._not_entered()
            return 0
        if sender is _ENDED:
            self._after_end("upload")
            return 0
        if "/" in self._job_id:
            _log("warning", "argus: upload of %s skipped: job id %r contains '/'", path, self._job_id)
            return 0
        route = "/api/jobs/%s/artifacts" % _quote(self._job_id)
        uploads = [_Upload(route, p, None, None, False) for p in _artifact_files(path, glob)]
        if not uploads:
            return 0
        return sum(1 for result in sender._uploads(uploads) if result is not None)


# ---------------------------------------------------------------------------------------
# Module-level helpers: batch ids, emit, sub_env
# ---------------------------------------------------------------------------------------

_active = []  # entered Reporters of this process, innermost last
_state_lock = threading.Lock()
_explicit_batch_id = None
_global_sender = None


def new_batch_id(prefix: str = "batch") -> str:
    """A fresh ``<prefix>-<12 hex>`` batch id."""
    return "%s-%s" % (prefix, os.urandom(6).hex())


def derive_batch_id(
    project: str, experiment_name: str, git_sha: str | None = None, *, prefix: str = "bench"
) -> str:
    """A deterministic ``<prefix>-<16 hex>`` id: the same inputs give the same batch.

    ``git_sha=None`` asks ``git rev-parse HEAD``; when git is missing or fails, and when
    ``git_sha == ""``, the value ``"no-git"`` is used. Every Argus client uses this formula.
    """
    import hashlib

    if git_sha is None:
        git_sha = _git_commit(short=False) or "no-git"
    elif git_sha == "":
        git_sha = "no-git"
    key = "%s|%s|%s" % (project, experiment_name, git_sha)
    return "%s-%s" % (prefix, hashlib.sha256(key.encode("utf-8")).hexdigest()[:16])


def set_batch_id(batch_id: str) -> None:
    """Publish a batch id for ``emit()`` and for child processes (``ARGUS_BATCH_ID``)."""
    global _explicit_batch_id
    _check_batch_id(batch_id)
    _explicit_batch_id = batch_id
    if _env_base["saved"]:  # a Reporter is open: it names the batch until it closes
        _env_base["value"] = batch_id
    else:
        os.environ[ENV_BATCH_ID] = batch_id


_env_base = {"saved": False, "value": None}  # ARGUS_BATCH_ID as it was before any Reporter


def _publish_batch_env() -> None:
    """ARGUS_BATCH_ID names the innermost open batch; with none open, what it was before."""
    innermost = _active[-1].batch_id if _active else None
    current = os.environ.get(ENV_BATCH_ID)
    if innermost is not None:
        if not _env_base["saved"]:
            _env_base.update(saved=True, value=current)
        if current != innermost:
            os.environ[ENV_BATCH_ID] = innermost
        return
    if _env_base["saved"]:
        base = _env_base["value"]
        _env_base.update(saved=False, value=None)
        if base is None:
            os.environ.pop(ENV_BATCH_ID, None)
        elif current != base:
            os.environ[ENV_BATCH_ID] = base


def get_batch_id() -> str | None:
    """The active Reporter's batch id, else the one set or inherited, else None."""
    if _active:
        return _active[-1].batch_id
    return _explicit_batch_id or os.environ.get(ENV_BATCH_ID) or None


def _sender_for_emit() -> ExperimentReporter:
    global _global_sender
    with _state_lock:
        if _global_sender is None or _global_sender._closed:
            project = os.environ.get("ARGUS_PROJECT", "").strip() or "default"
            _global_sender = ExperimentReporter(None, project, queue_size=DEFAULT_QUEUE_SIZE)
        return _global_sender


def emit(event: str, **fields) -> None:
    """Send one event: through the active Reporter, or else under ``get_batch_id()``."""
    if "batch_id" in fields:
        _emit_batch_id(fields, "argus.emit")
    if _active:
        return _active[-1].emit(event, **fields)
    batch_id = get_batch_id()
    if batch_id is None:
        _log_once(
            "emit-no-batch",
            "warning",
            "argus.emit(%r) outside a Reporter needs a batch id: call argus.set_batch_id(...) "
            "or set %s; the event is not sent",
            event,
            ENV_BATCH_ID,
        )
        return None
    return _sender_for_emit().emit(event, batch_id=batch_id, **fields)


def _emit_batch_id(fields: dict, call: str) -> None:
    """A ``batch_id=`` field given to an emit that sends into the open batch: left out, said once."""
    fields.pop("batch_id")
    _log_once(
        "emit-batch-id:" + call,
        "warning",
        "argus: %s sends into the open batch; its batch_id=... argument is left out. To send "
        "into another batch, use ExperimentReporter.emit(event, batch_id=..., **fields).",
        call,
    )


def sub_env(template: str, **extra) -> str:
    """Replace ``${name}`` placeholders: argus values, environment variables, then ``extra``.

    Known argus names: ``argus_batch_id``, ``argus_job_id``, ``argus_project``, ``argus_url``.
    Keyword arguments win; unknown placeholders stay as written.
    """
    import re

    values = dict(os.environ)
    reporter = _active[-1] if _active else None
    argus_values = {
        "argus_batch_id": get_batch_id(),
        "argus_job_id": (reporter._jobs[-1].job_id if reporter and reporter._jobs else None)
        or os.environ.get("ARGUS_JOB_ID"),
        "argus_project": (reporter.source_project if reporter else None)
        or os.environ.get("ARGUS_PROJECT"),
        "argus_url": (reporter._sender.url if reporter and reporter._sender else None)
        or _resolve_url()[0],
    }
    values.update({k: v for k, v in argus_values.items() if v})
    values.update({k: str(v) for k, v in extra.items()})
    return re.sub(
        r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}",
        lambda m: values.get(m.group(1), m.group(0)),
        template,
    )


# ---------------------------------------------------------------------------------------
# Job logs: tracebacks, logging handler, console capture
# ---------------------------------------------------------------------------------------
# Three ways into a job's log pane besides job.log(): the traceback of a failure (always),
# records of the `logging` module (argus.LogHandler) and console output
# (Reporter(capture_output=True)). Each sends log_line events to the innermost open job of
# the innermost active Reporter. A log_line needs a job id (PROTOCOL.md), so a batch that
# fails outside any job has no log to put its traceback in: its cause is in batch_failed.


def _send_traceback(sender: ExperimentReporter, job_id: str, exc) -> None:
    """One ``log_line`` (level error) with the scrubbed, bounded traceback of ``exc``."""
    if not isinstance(exc, BaseException) or not _env_flag(ENV_TRACEBACKS, True):
        return
    try:
        sender.log_line(job_id, _traceback_text(exc, sender._token), level="error")
    except Exception as error:  # a failure report must not fail
        _log("warning", "argus: could not send the traceback of job %s: %r", job_id, error)


def _traceback_text(exc: BaseException, token: str | None = None) -> str:
    """The formatted traceback, secrets hidden, cut from the front to TRACEBACK_MAX_BYTES."""
    import traceback

    full = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip("\n")
    text = _scrub_text(full[-4 * TRACEBACK_MAX_BYTES :], token)  # bound the scrubbing too
    data = text.encode("utf-8", "replace")
    if len(full) <= 4 * TRACEBACK_MAX_BYTES and len(data) <= TRACEBACK_MAX_BYTES:
        return text
    # Keep the end: the exception itself and its innermost frames, from a line start on.
    marker = "[argus: this traceback was cut to its last %d KiB]\n" % (TRACEBACK_MAX_BYTES // 1024)
    tail = data[-(TRACEBACK_MAX_BYTES - len(marker)) :].decode("utf-8", "ignore")
    line_start = tail.find("\n", 0, 1024)
    return marker + tail[line_start + 1 :]


def _scrub_text(text: str, token: str | None = None) -> str:
    """Hide secrets in free text with the command line's rules (see _scrub_args).

    ``--token X``, ``password=X``, ``api_key: X``, ``"secret": "X"``, em_live_ tokens,
    ``Bearer X``, the password of ``scheme://user:password@host`` and the configured token.
    """
    import re

    if token and len(token) >= 4:
        text = text.replace(token, "***")

    value = r"(\"[^\"\n]*\"|'[^'\n]*'|[^\s'\",;()\[\]{}]+)"
    for pattern in (
        r"(?<![\w-])(--?[A-Za-z][\w.-]*)(\s+)" + value,  # --token X
        r"\b([A-Za-z_][\w.-]*)(['\"]?\s*(?:=(?!=)|:)\s*)" + value,  # password=X, "secret": "X"
    ):
        # name, separator, value; after a name that is no secret, the search goes on from
        # its value, which may be a pair itself ("error: password=X")
        pattern, out, pos = re.compile(pattern), [], 0
        m = pattern.search(text)
        while m:
            if _is_secret_name(m.group(1)):
                quote = m.group(3)[0] if m.group(3)[0] in "'\"" else ""
                out.append(text[pos : m.start(3)] + quote + "***" + quote)
                pos = m.end()
            else:
                out.append(text[pos : m.end(2)])
                pos = m.end(2)
            m = pattern.search(text, pos)
        text = "".join(out) + text[pos:]
    text = re.sub(r"(\b[A-Za-z][\w+.-]*://[^/\s:@]*:)[^/\s@]+@", r"\1***@", text)
    text = re.sub(r"(?i)\b(bearer)(\s+)[\w.~+/-]+=*", r"\1\2***", text)
    text = re.sub(r"\b(Basic)(\s+)[A-Za-z0-9+/]{12,}={0,2}(?!\w)", r"\1\2***", text)
    return re.sub(r"em_live_[A-Za-z0-9_-]+", "em_live_***", text)


def _end_job_log(job: JobContext, exc) -> None:
    """Before ``job_done``/``job_failed``: the job's last console lines, then its traceback."""
    sender = job._sender
    if sender is None or sender is _ENDED:
        return
    if _capture_users and job._parent._capture:
        _capture_flush(job)
    if exc is not None:
        _send_traceback(sender, job._job_id, exc)


def _send_line(sender: ExperimentReporter, job_id: str, line: str, level: str) -> None:
    """``log_line`` for a checked job id and a lower-case level: the short way, per record."""
    text = _truncate(line)
    sender._submit("log_line", job_id, {"line": text, "level": level}, size=len(text) + 64)


def _open_job():
    """The innermost open job of the innermost active Reporter, if that Reporter sends."""
    try:
        jobs = _active[-1]._jobs if _active else None
        job = jobs[-1] if jobs else None
    except IndexError:  # a Reporter or a job ended on another thread just now
        return None
    return job if job is not None and job._sender is not None else None


_LEVEL_NAMES = {10: "debug", 20: "info", 30: "warning", 40: "error", 50: "critical"}


def _level_name(levelno: int) -> str:
    """A logging level as the server stores it; custom levels go to the standard one below."""
    if levelno >= 40:
        return "critical" if levelno >= 50 else "error"
    if levelno >= 30:
        return "warning"
    return "info" if levelno >= 20 else "debug"


def _on_argus_thread(name: str | None = None) -> bool:
    # Records and output of the SDK's own threads (urllib3's debug lines about the worker's
    # requests) would feed themselves: each would make another request.
    return (name or threading.current_thread().name).startswith("argus-")


def __getattr__(name: str):
    # PEP 562: LogHandler subclasses logging.Handler, and `import argus` must not import
    # logging; the class is made on first access and then is a plain module attribute.
    if name == "LogHandler":
        with _state_lock:
            cls = globals().get("LogHandler")
            if cls is None:
                cls = _build_log_handler()
                cls.__module__, cls.__qualname__ = __name__, "LogHandler"  # pickle finds it here
                globals()["LogHandler"] = cls
        return cls
    raise AttributeError("module %r has no attribute %r" % (__name__, name))


def __dir__():
    return sorted(set(globals()) | {"LogHandler"})


def _build_log_handler():
    import logging

    own, own_prefix = __name__, __name__ + "."

    class LogHandler(logging.Handler):
        """Send ``logging`` records to the open job's log in Argus.

        ``logging.getLogger().addHandler(argus.LogHandler())`` is all it takes. A record
        emitted while a job is open goes to the innermost open job of the innermost active
        Reporter, at its level in lower case (debug/info/warning/error/critical). A record
        outside any job goes to ``job_id`` when one is given (in the active batch, or under
        ``get_batch_id()``), else it is skipped. Records of the SDK's own logger are never
        forwarded. ``self.format(record)`` makes the line: set a Formatter to change it.
        """

        def __init__(self, job_id: str | None = None, level: int = logging.NOTSET) -> None:
            super().__init__(level)
            if job_id is not None:
                _check_job_id(job_id)
            self.job_id = job_id

        def emit(self, record) -> None:
            name = record.name
            if name == own or name.startswith(own_prefix) or _on_argus_thread(record.threadName):
                return
            try:
                job = _open_job()
                if job is not None:
                    sender, job_id, batch_id = job._sender, job._job_id, None
                elif self.job_id is None:
                    _log_once(
                        "loghandler-outside",
                        "debug",
                        "argus: LogHandler skips records emitted outside a job "
                        "(LogHandler(job_id=...) sends them to that job)",
                    )
                    return
                elif _active:
                    sender, job_id, batch_id = _active[-1]._sender, self.job_id, None
                else:
                    batch_id = get_batch_id()
                    sender, job_id = (_sender_for_emit() if batch_id else None), self.job_id
                if sender is None:
                    return  # a disabled Reporter, or no batch to send to
                line = self.format(record)
                if record.exc_info or record.exc_text:
                    line = _scrub_text(line, sender._token)
                level = _LEVEL_NAMES.get(record.levelno) or _level_name(record.levelno)
                if batch_id is None:
                    _send_line(sender, job_id, line, level)
                else:
                    sender.emit("log_line", batch_id=batch_id, job_id=job_id, line=_truncate(line), level=level)
            except Exception:
                self.handleError(record)

    return LogHandler


# Console capture. While a capturing Reporter is active, sys.stdout and sys.stderr are
# _Tee objects: every write goes first, unchanged, to the stream they replaced, and complete
# lines are then copied to the open job's log. Only Python-level writes are seen: output
# written to the file descriptors (child processes, C extensions, os.write) is not.

_capture_users = []  # capturing Reporters, innermost last
_capture_tees = []  # (name in sys, _Tee) in the order they were installed
_capture_lock = threading.RLock()  # reentrant: a SIGTERM handler may flush mid-write


class _CaptureGuard(threading.local):
    busy = False  # this thread is inside the capture: what it writes is not captured again


_capture_guard = _CaptureGuard()


class _Tee:
    """A text stream that writes through to ``stream`` and copies its lines to the job log.

    Every attribute it does not define (flush, fileno, isatty, encoding, buffer...) is the
    wrapped stream's, so it works over a terminal, a pipe, Jupyter's stream or pytest's.
    """

    __slots__ = ("_stream", "_level", "_on", "_parts", "_bar_since", "_bar_sent")

    def __init__(self, stream, level: str) -> None:
        object.__setattr__(self, "_stream", stream)
        object.__setattr__(self, "_level", level)
        object.__setattr__(self, "_on", True)
        object.__setattr__(self, "_parts", [])  # the line being written, not yet ended
        object.__setattr__(self, "_bar_since", None)  # when a \r line began or last went out
        object.__setattr__(self, "_bar_sent", None)  # the state that went out then

    def __getattr__(self, name: str):
        return getattr(object.__getattribute__(self, "_stream"), name)

    def __setattr__(self, name: str, value) -> None:
        if name in _Tee.__slots__:
            object.__setattr__(self, name, value)
        else:
            setattr(self._stream, name, value)

    def __repr__(self) -> str:
        return "<argus console capture of %r>" % (self._stream,)

    def write(self, text):
        count = self._stream.write(text)
        if self._on and _active and type(text) is str:
            if "\n" in text or "\r" in text:
                self._feed(text)
            else:  # the middle of a line (print writes each argument): kept for its end
                parts = self._parts
                parts.append(text)  # atomic: no lock on this path
                if len(parts) > 256:
                    self._feed("")
        return count

    def writelines(self, lines) -> None:
        lines = list(lines)
        self._stream.writelines(lines)
        if self._on and _active:
            for text in lines:
                if type(text) is str:
                    self._feed(text)

    def _feed(self, text: str) -> None:
        if _capture_guard.busy:
            return
        job = _open_job()
        if job is None or not job._parent._capture:
            self._parts = []  # output between jobs is not kept
            return
        if _on_argus_thread():
            return
        _capture_guard.busy = True
        try:
            with _capture_lock:
                parts, self._parts = self._parts, []
                parts.append(text)
                buf = "".join(parts)
                if "\n" in text:
                    lines = buf.split("\n")
                    buf = lines.pop()
                    for line in lines:
                        line = _final_state(line)
                        if line != self._bar_sent:  # a bar whose last state went out already
                            _capture_line(job, line, self._level)
                        self._bar_since = self._bar_sent = None
                if "\r" in buf:
                    buf = _final_state(buf, keep_cr=True)
                    now = _mono()
                    if self._bar_since is None:
                        self._bar_since = now
                    elif now - self._bar_since >= 1.0:  # a progress bar: its state once a second
                        self._bar_since, self._bar_sent = now, buf.rstrip("\r")
                        _capture_line(job, self._bar_sent, self._level)
                if len(buf) > MAX_STRING_CHARS:  # a line without an end: send what there is
                    _capture_line(job, buf, self._level)
                elif buf:
                    self._parts.insert(0, buf)  # before what other threads added meanwhile
        except Exception:
            pass  # the program's output went through already; only the copy is lost
        finally:
            _capture_guard.busy = False


def _final_state(line: str, keep_cr: bool = False) -> str:
    """What a terminal shows of a line written with carriage returns: its last non-empty part.

    ``keep_cr`` keeps the carriage returns after that part (more text may overwrite it).
    """
    i = line.rstrip("\r").rfind("\r")
    tail = line[i + 1 :] if i >= 0 else line
    return tail if keep_cr else tail.rstrip("\r")


def _capture_line(job: JobContext, line: str, level: str) -> None:
    """Send one console line, at most CAPTURE_MAX_LINES_S a second per job; count the rest."""
    if not line.strip():
        return
    now = _mono()
    rate = job.__dict__.get("_console_rate")  # [window start, sent, not sent]
    if rate is None or now - rate[0] >= 1.0:
        if rate is not None and rate[2]:
            _capture_note(job, rate[2])
        rate = job._console_rate = [now, 0, 0]
    if rate[1] >= CAPTURE_MAX_LINES_S:
        rate[2] += 1
        return
    rate[1] += 1
    _send_line(job._sender, job._job_id, line, level)


def _capture_note(job: JobContext, count: int) -> None:
    job._sender.log_line(
        job._job_id,
        "[argus: %d console line(s) not sent: more than %d lines/s]" % (count, CAPTURE_MAX_LINES_S),
        level="warning",
    )


def _capture_flush(job: JobContext) -> None:
    """At the end of ``job``: its unfinished console lines and the count of lines not sent."""
    busy, _capture_guard.busy = _capture_guard.busy, True
    try:
        with _capture_lock:
            for _name, tee in _capture_tees:
                if tee._parts and tee._on:
                    line, sent = _final_state("".join(tee._parts)), tee._bar_sent
                    tee._parts, tee._bar_since, tee._bar_sent = [], None, None
                    if line != sent:
                        _capture_line(job, line, tee._level)
            rate = job.__dict__.pop("_console_rate", None)
            if rate is not None and rate[2]:
                _capture_note(job, rate[2])
    except Exception as exc:
        _log("warning", "argus: could not send the last console lines of job %s: %r", job._job_id, exc)
    finally:
        _capture_guard.busy = busy


def _capture_start(reporter: Reporter) -> None:
    """Wrap sys.stdout and sys.stderr for a Reporter made with capture_output=True."""
    if not reporter._capture or reporter._sender is None:
        return
    with _capture_lock:
        if not _capture_users:  # at exit: after the integrations close their jobs
            atexit.unregister(_capture_stop_all)
            atexit.register(_capture_stop_all)
        _capture_users.append(reporter)
        for name, level in (("stdout", "info"), ("stderr", "warning")):
            stream = getattr(sys, name, None)
            if stream is None or (isinstance(stream, _Tee) and stream._on):
                continue  # no console (pythonw), or captured already
            tee = _Tee(stream, level)
            _capture_tees.append((name, tee))
            setattr(sys, name, tee)


def _capture_stop(reporter: Reporter) -> None:
    """Restore the streams when the last capturing Reporter ends (never someone else's)."""
    with _capture_lock:
        if reporter not in _capture_users:
            return
        _capture_users.remove(reporter)
        if not _capture_users:
            _capture_stop_all()


def _capture_stop_all() -> None:
    with _capture_lock:
        del _capture_users[:]
        while _capture_tees:
            name, tee = _capture_tees.pop()
            tee._on = False  # if it is still in use somewhere, it only writes through
            if getattr(sys, name, None) is tee:
                setattr(sys, name, tee._stream)


def _capture_after_fork() -> None:
    global _capture_lock
    _capture_lock = threading.RLock()  # a parent's thread may have held it at the fork


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_capture_after_fork)


# ---------------------------------------------------------------------------------------
# The delivery core: queue, worker, sender, replayer
# ---------------------------------------------------------------------------------------
# An event travels: caller's thread -> the in-memory queue (a cache) -> the worker thread,
# which sends it; or, once the server falls behind, -> the spill file (the buffer of record)
# -> the replayer -> the server. A guard thread makes sure no unacknowledged event stays in
# memory only for longer than JOURNAL_AFTER_S, and ends requests that pass their deadline.

_live = weakref.WeakSet()  # every open ExperimentReporter of this process

_OPEN, _DRAINING, _CLOSED = "open", "draining", "closed"


class _Upload:
    __slots__ = ("route", "path", "label", "meta", "batch_level", "done", "result")

    def __init__(self, route, path, label, meta, batch_level):
        self.route, self.path, self.label, self.meta = route, path, label, meta
        self.batch_level = batch_level
        self.done = threading.Event()
        self.result = None


class _Flush:
    __slots__ = ("done",)

    def __init__(self):
        self.done = threading.Event()


def _quote(text: str) -> str:
    from urllib.parse import quote

    return quote(text, safe="")


class ExperimentReporter:
    """The low-level sender: one bounded queue, one worker thread, disk as the buffer of record.

    Every method returns at once and never raises because of the network, the server, the
    disk or a value. An event the server has not acknowledged within about a second is
    written to the spill store; from then on this run's events go through disk, in order,
    until the backlog is gone. What is on disk is re-sent when the server answers again (in
    this run), at the next start, or by ``argus sync``.

    A thin facade: it owns the configuration, the queue (the deque, its bound and its byte
    count, with the ``_slow``/``_idle`` flags that the hot path reads without a hop) and
    value encoding; ``worker`` (_Worker), ``sender`` (_Sender) and ``replayer`` (_Replayer)
    own the rest, and ``spill`` (SpillStore) the disk.
    """

    def __init__(
        self,
        url: str | None,
        project: str,
        auth_token: str | None = None,
        host: str | None = None,
        user: str | None = None,
        commit: str | None = None,
        timeout: float = 10.0,
        queue_size: int = 1000,
        spill_path: str | os.PathLike | None = None,
        batch_id: str | None = None,
        *,
        durable: bool | None = None,
        _worker: bool = True,
    ):
        if not isinstance(project, str) or not project:
            raise TypeError("project must be a non-empty string, e.g. ExperimentReporter(url, 'my-paper')")
        if batch_id is not None:
            _check_batch_id(batch_id)
        self.project = project
        self.timeout = float(timeout)
        self._host, self._user, self._commit = host, user, commit
        self._command = None
        self._source_json = None
        self._envelopes = {}  # (type, batch, job) -> the envelope around timestamp and data
        self._batch_id = batch_id or new_batch_id()
        self._offline = _offline_mode() if _worker else False  # the CLI sends synchronously
        disabled = _env_flag(ENV_DISABLE)
        self.url, self.url_source = (None, None) if disabled else _resolve_url(url)
        self._token = _resolve_token(auth_token)[0] if not disabled else None
        self.enabled = not disabled and bool(self._offline or self.url)
        if not self.enabled and not disabled and not _url_was_invalid(url):
            _log_once(
                "no-url",
                "warning",
                "argus: no Argus server is configured, so events are not recorded. Set %s "
                "(e.g. export %s=http://argus-host:8000), pass monitor_url=..., or add "
                "'url: ...' to %s.",
                ENV_URL,
                ENV_URL,
                _MONITOR_YAML,
            )
        if spill_path is not None:
            spill_path = os.fspath(spill_path)
            if spill_path.endswith(_SPILL_SUFFIX):
                spill_path = os.path.dirname(spill_path) or "."
        self.spill = SpillStore(spill_path, url=self.url, token=self._token)
        self.spill.summarise = _worker and not self._offline  # not the CLI, nor offline mode
        self.spill.mapped = self.durable = bool(
            self.enabled and _worker and (_env_flag(ENV_DURABLE) if durable is None else durable)
        )
        if self.spill.summarise and self.url:
            _destinations[self.spill.directory] = (self.url, self._token)
        self._qmax = max(1, int(queue_size))
        self._journaling = False  # durable: between an event's journal line and its queue entry
        self._records_uploads = _worker
        self.lost = 0  # events that could be neither delivered nor saved (queue full, disk refused)
        # The parts, each the one owner of its state; they reach each other through these.
        worker, sender, replayer = _Worker(self), _Sender(self), _Replayer(self)
        worker.sender, worker.replayer = sender, replayer
        sender.worker, sender.replayer = worker, replayer
        replayer.worker, replayer.sender = worker, sender
        self.worker, self.sender, self.replayer = worker, sender, replayer
        self._reset_runtime()
        self._slow = not self.enabled  # True: _submit takes the careful path
        if self.enabled and _worker:
            _live.add(self)
            _prepare_process(self.url)
            self.worker._start()

    def _reset_runtime(self) -> None:
        """Queue, events, locks and thread state: built at start and again after a fork."""
        self._queue = deque()
        self._bytes_in = 0
        self._bytes_out = 0
        self._idle = True
        self.worker._reset_runtime()
        self.sender._reset_runtime()
        self.replayer._reset_runtime()

    # -- the caller's side --------------------------------------------------------------

    @property
    def batch_id(self) -> str:
        return self._batch_id

    @property
    def transport_name(self) -> str:
        return self.sender._transport.name if self.sender._transport is not None else _transport_name()

    @property
    def delivered(self) -> int:
        """Events the server acknowledged (accepted or deduplicated), counted by the sender."""
        return self.sender.delivered

    @property
    def _closed(self) -> bool:
        return self.worker._state is not _OPEN

    def _submit(self, etype: str, job_id, data: dict, size: int = 0, batch_id=None) -> None:
        if self._slow:
            return self._submit_slow(etype, job_id, data, size, batch_id)
        for value in data.values():
            if type(value) not in _PLAIN_TYPES:
                data = _jsonable(data)
                break
        if self.durable:
            return self._submit_durable(etype, job_id, data, batch_id)
        queue = self._queue
        if len(queue) >= self._qmax or (size and self._bytes_in - self._bytes_out > QUEUE_MAX_BYTES):
            return self._overflow((etype, batch_id or self._batch_id, job_id, _now(), data, 0))
        if size:
            self._bytes_in += size
        queue.append((etype, batch_id or self._batch_id, job_id, _now(), data, size))
        if self._idle:
            self._wake()

    def _submit_slow(self, etype, job_id, data, size, batch_id) -> None:
        if not self.enabled:
            return
        if self.worker._state is _CLOSED or self.worker._refusing:
            return self._refuse(etype)
        for value in data.values():
            if type(value) not in _PLAIN_TYPES:
                data = _jsonable(data)
                break
        if self.durable:
            return self._submit_durable(etype, job_id, data, batch_id)
        record = (etype, batch_id or self._batch_id, job_id, _now(), data, 0)
        return self._overflow(record) if len(self._queue) >= self._qmax else self._put(record)

    def _submit_durable(self, etype: str, job_id, data: dict, batch_id=None, packed=None) -> None:
        """Durable mode: the event reaches the kernel (one write to the open spill file, a
        compact line) before the call returns; memory only sends it. Its id is drawn here:
        the id in the file is the one the worker sends, so a replay is deduplicated.
        ``packed``: job.epoch's four values, when its epoch is an int and they are floats
        or None (its fast path): the journal line is _packed's."""
        try:
            event_id = _ids.pop()
        except IndexError:
            event_id = _uuid4()
        record = (etype, batch_id or self._batch_id, job_id, _now(), data, 0)
        spill = self.spill
        source = self._source_json or self._source()
        if spill.source is not source:  # first event, or batch_start(command=...) changed it
            with self.worker._lock:
                spill.set_source(source)
        if self._offline:
            line = None
        elif packed is not None:
            line = _packed(record, event_id, packed) or _compact(record, event_id)
        else:
            line = _compact(record, event_id)
        with self.worker._lock:
            # From the write to the queue, the journal holds an event that the worker does
            # not know of: a signal handler that closes the run meanwhile must keep the file.
            self._journaling = True
            try:
                if self.worker._gap and not self._offline:
                    # An earlier event is in memory only (the journal refused it): this one
                    # waits with it, or a replay of the journal would send it first.
                    on_disk = False
                elif line is None:  # offline (the file is the delivery) or data marshal refuses
                    line = self._encode(record, event_id)[1]
                    on_disk = spill.append([line]) == 1 if self._offline else spill.journal(line)
                else:
                    on_disk = spill.journal(line)
                if not on_disk and not self._offline:
                    self.worker._gap = True
                if not on_disk and spill.at_cap and not self._offline:
                    _log_once(
                        "durable-cap:" + spill.directory,
                        "warning",
                        "argus: the spill directory %s is at its cap of %s MB: durable mode "
                        "keeps new events in memory only, until they are sent (a SIGKILL "
                        "would lose them). Run `python3 -m argus sync` or raise %s.",
                        spill.directory,
                        "%.3g" % (spill.max_bytes / 1048576.0),
                        ENV_SPILL_MAX_MB,
                    )
                if len(self._queue) < self._qmax:
                    # The worker encodes it (with this id) when it sends it.
                    self._queue.append(record + (event_id, on_disk))
                elif on_disk:
                    self.worker._disk_mode = True
                else:
                    self._lose(1)
            finally:
                self._journaling = False
        if self._idle:
            self._wake()

    def _put(self, record) -> None:
        self._queue.append(record)
        if self._idle:
            self._wake()

    def _refuse(self, etype: str) -> None:
        _log_once(
            "closed:%d" % _said_key(self),
            "warning",
            "argus: %s after the Reporter of batch %s was closed is not sent (nor saved). "
            "Emit events inside the `with Reporter(...)` block, or open a new Reporter.",
            etype,
            self._batch_id,
        )

    def _overflow(self, record) -> None:
        """The queue is full: everything queued goes to disk, then this event, in order."""
        if _mono() < self.worker._disk_retry_at:  # the disk refused moments ago: no retry per call
            return self._lose(1)
        with self.worker._lock:
            if not self.worker._journal_locked([record]):
                self._lose(1)
        if self._idle and self.worker._state is not _CLOSED:
            self._wake()

    def _lose(self, count: int, say: bool = False) -> None:
        """Events that neither memory nor disk can hold: counted, and said once."""
        if self.spill.at_cap:
            return self.spill.refuse(count, say)
        self.lost += count
        _log_once(
            "lost:%d" % _said_key(self),
            "error",
            "argus: the queue is full (%d events) and the spill directory %s cannot be "
            "written: events are being lost (counted at exit). Free the disk or point %s "
            "elsewhere.",
            self._qmax,
            self.spill.directory,
            ENV_SPILL_DIR,
        )

    def _wake(self) -> None:
        if self.worker._refusing:  # an event whose call began before close() saw the queue
            return self.worker._save_late()
        self._idle = False
        thread = self.worker._thread
        if thread is None or not thread.is_alive():
            if self.worker._state is not _OPEN:
                return
            if thread is not None:
                _log("error", "argus: the delivery worker had stopped; it is started again")
            self.worker._start()
        self.worker._wake_evt.set()

    def _data(self, fields: dict) -> dict:
        return {k: v for k, v in fields.items() if v is not None}

    def _event(self, etype: str, job_id, **fields) -> None:
        self._submit(etype, job_id, self._data(fields))

    # -- the legacy API -----------------------------------------------------------------

    def batch_start(
        self,
        experiment_type: str | None,
        n_total: int | None,
        command: str | None = None,
        batch_id: str | None = None,
        **extra,
    ) -> str:
        """Emit ``batch_start`` and return the batch id (``batch_id`` replaces the current one)."""
        if batch_id is not None:
            _check_batch_id(batch_id)
            self._batch_id = batch_id
        if command is not None and command != self._command:
            self._command = _truncate(_text(command), 4000)
            self._source_json = None
            self._envelopes = {}
        self._event(
            "batch_start",
            None,
            experiment_type=experiment_type,
            n_total_jobs=n_total,
            command=command,
            **extra,
        )
        return self._batch_id

    def batch_done(self, n_done: int, n_failed: int = 0, total_elapsed_s=None, **extra) -> None:
        self._event(
            "batch_done", None, n_done=n_done, n_failed=n_failed, total_elapsed_s=total_elapsed_s, **extra
        )

    def batch_failed(self, reason: str | None = None, **extra) -> None:
        # The server reads the cause from `error`; `reason` carries the same text for older readers.
        text = _truncate(_text(reason or "unknown"))
        self._event("batch_failed", None, error=text, reason=text, **extra)

    def job_start(self, job_id: str, model=None, dataset=None, **extra) -> None:
        _check_job_id(job_id)
        self._event("job_start", job_id, model=model, dataset=dataset, **extra)

    def job_epoch(self, job_id: str, epoch, train_loss=None, val_loss=None, lr=None, **extra) -> None:
        _check_job_id(job_id)
        self._event(
            "job_epoch",
            job_id,
            epoch=_epoch_number(epoch),
            train_loss=train_loss,
            val_loss=val_loss,
            lr=lr,
            **extra,
        )

    def job_done(
        self, job_id: str, metrics=None, elapsed_s=None, train_epochs=None, resources=None, **extra
    ) -> None:
        _check_job_id(job_id)
        self._event(
            "job_done",
            job_id,
            status="DONE",
            metrics=metrics,
            elapsed_s=elapsed_s,
            train_epochs=train_epochs,
            resources=resources,
            **extra,
        )

    def job_failed(self, job_id: str, reason: str | None = None, elapsed_s=None, **extra) -> None:
        _check_job_id(job_id)
        text = _truncate(_text(reason or "unknown"))
        self._event("job_failed", job_id, status="FAILED", error=text, reason=text, elapsed_s=elapsed_s, **extra)

    def resource_snapshot(self, **fields) -> None:
        self._event("resource_snapshot", None, **fields)

    def log_line(self, job_id: str, line: str, level: str = "info", **extra) -> None:
        _check_job_id(job_id)
        text = _truncate(_text(line))
        data = self._data(extra)
        data["line"] = text
        data["level"] = _text(level).lower()
        self._submit("log_line", job_id, data, size=len(text) + 64)

    def emit(self, event: str, batch_id: str | None = None, **fields) -> None:
        """Send one event of any type the server accepts; ``job_id`` goes to the envelope."""
        if event not in EVENT_TYPES and event not in _SERVER_EXTRA_TYPES:
            raise ValueError(
                "unknown event type %r: use one of %s" % (event, ", ".join(EVENT_TYPES + _SERVER_EXTRA_TYPES))
            )
        job_id = fields.pop("job_id", None)
        if event in _JOB_EVENT_TYPES:
            _check_job_id(job_id)
        elif job_id is not None:
            _check_job_id(job_id)
        if event in ("job_failed", "batch_failed") and "error" not in fields and fields.get("reason"):
            fields["error"] = fields["reason"]  # the key the server reads
        self._submit(event, job_id, self._data(fields), batch_id=batch_id)

    def job_artifact(self, job_id: str, path, *, label: str | None = None, meta: dict | None = None):
        """Upload one file for a job once the events queued before it are delivered.

        Returns the server's artifact record, or None when it was not uploaded (the reason
        is logged). Waits at most ``UPLOAD_WAIT_S`` seconds.
        """
        _check_job_id(job_id)
        route = "/api/jobs/%s/artifacts" % _quote(job_id)
        return self._uploads([_Upload(route, os.fsdecode(path), label, meta, False)])[0]

    def batch_artifact(self, path, *, label: str | None = None, meta: dict | None = None):
        """Upload one file for the batch (``/api/batches/{id}/artifacts``)."""
        route = "/api/batches/%s/artifacts" % _quote(self._batch_id)
        return self._uploads([_Upload(route, os.fsdecode(path), label, meta, True)])[0]

    def _uploads(self, uploads: list, wait: float | None = None) -> list:
        if not self.enabled:
            return [None] * len(uploads)
        if self.worker._state is not _OPEN:
            self._refuse("an upload of %s" % uploads[0].path)
            return [None] * len(uploads)
        self.worker._controls += len(uploads)
        for upload in uploads:
            self._queue.append(upload)
        self._wake()
        wait = UPLOAD_WAIT_S if wait is None else wait
        end = _mono() + wait
        for upload in uploads:
            if not upload.done.wait(max(0.0, end - _mono())):
                _log("warning", "argus: upload of %s still pending after %.0f s", upload.path, wait)
                break
        return [u.result for u in uploads]

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every event queued so far is delivered or on disk; False on timeout."""
        if not self.enabled or self.worker._state is not _OPEN:
            return True
        try:
            marker = _Flush()
            self.worker._controls += 1
            self._queue.append(marker)
            self._wake()
            return marker.done.wait(timeout)
        except Exception as exc:  # never into the caller
            _log("error", "argus: flush failed: %r", exc)
            return False

    # -- one shutdown path ----------------------------------------------------------------

    def close(self, timeout: float = 5.0) -> None:
        """Deliver what is queued within ``timeout`` seconds; put whatever is left on disk.

        Idempotent and safe from any thread or a signal handler: a second call while the
        first drains waits for it (within the deadline); the same thread re-entering (a
        signal during the drain) finishes the drain itself. Never raises, except that a
        KeyboardInterrupt during the drain cuts it short, saves the rest, and goes on.
        """
        try:
            self.worker._close(timeout)
        except KeyboardInterrupt:
            self.worker._finalize()
            raise
        except Exception as exc:
            _log("error", "argus: error while closing the sender: %r", exc)
            try:
                self.worker._finalize()
            except Exception:
                pass

    def __enter__(self) -> ExperimentReporter:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.close()
        return False

    # -- value encoding (on the worker's thread; the CLI's too) ---------------------------

    def _source(self) -> str:
        text = self._source_json
        if text is None:
            detected = _detected_source()
            source = {"project": self.project}
            for key, explicit in (("host", self._host), ("user", self._user), ("commit", self._commit)):
                value = explicit if explicit is not None else detected.get(key)
                if value:
                    source[key] = _text(value)
            if self._command:
                source["command"] = self._command
            text = self._source_json = _dumps_safe(source)
        return text

    def _encode(self, record, event_id=None) -> tuple:
        """``(event_id, line)``: the event's envelope as strict JSON, its id made here, once
        (durable mode made it on the caller's thread: ``event_id``). The worker encodes
        what it sends with _encode_batch, whose common case does not come here."""
        key = record[:3]  # (event type, batch id, job id)
        envelope = self._envelopes.get(key)
        if envelope is None:
            envelope = self._envelope(*key)
        data = record[4]
        if event_id is None:
            try:
                event_id = _ids.pop()
            except IndexError:
                event_id = _uuid4()
        if data and len(envelope[2]) < _MAX_DATA_FORMS and tuple(data) not in envelope[2]:
            _data_form(envelope, data)
        text = None
        if _json_encode_chunks is not None:
            try:  # the common case without the checks' function calls; else _encode_data
                text = "".join(_json_encode_chunks(data, 0))
            except Exception:
                text = None
            else:
                if len(text) > _MAX_EVENT_CHARS:
                    text = None
        line = '{"event_id":"%s%s%s%s%s}' % (
            event_id, envelope[0], _format_ts(record[3]), envelope[1], text or _encode_data(data)
        )
        return event_id, line

    def _encode_batch(self, records: list) -> list:
        """``(event_id, line)`` for each record as the caller queued it, in order. The
        common case, data of plain numbers under keys seen before, in one loop: a template
        (see _data_form) writes the data with the JSON encoder's own number formats, and
        the envelope, id and timestamp are looked up without a call. A long run of one
        kind of event (one type, batch, job and key set: a training loop's epochs) goes
        through _encode_run instead. The rest: _encode."""
        if len(records) >= _RUN_MIN:
            pairs = self._encode_run(records)
            if pairs is not None:
                return pairs
        envelopes = self._envelopes
        pairs = []
        append = pairs.append
        stamp = _ts_cache
        for record in records:
            envelope = envelopes.get(record[:3])
            if envelope is not None:
                data = record[4]
                form = envelope[2].get(tuple(data))
                if form is not None:
                    values = tuple(data.values())
                    for value in values:
                        if type(value) is not float and type(value) is not int:
                            break
                    else:
                        try:
                            total = sum(values)  # NaN or an infinity (or an overflow): NaN
                            text = None if total - total else form % values
                        except (ValueError, OverflowError):  # an int too long for str()
                            text = None
                        if text is not None and len(text) <= _MAX_EVENT_CHARS:
                            try:
                                event_id = _ids.pop()
                            except IndexError:
                                event_id = _uuid4()
                            if stamp[2] != int(record[3] * 1000):
                                _format_ts(record[3])
                                stamp = _ts_cache
                            append((
                                event_id,
                                '{"event_id":"%s%s%s%s%s}' % (event_id, envelope[0], stamp[3], envelope[1], text),
                            ))
                            continue
            append(self._encode(record))
        return pairs

    def _encode_run(self, records: list, ids=None):
        """_encode_batch for records of one type, batch and job whose data are plain,
        finite numbers under one key set with a template: every step a pass in C over the
        whole run (the checks, the values, the timestamps, the ids, the lines), none a
        Python loop per event. The values are written in the template's key order. ``ids``:
        the events' ids when they were drawn already (durable mode: the ones in the
        journal), else they are made here. None when the run is not one of those (the
        caller then takes the loop)."""
        first = records[0]
        envelope = self._envelopes.get(first[:3])
        if envelope is None:
            return None
        keys = tuple(first[4])
        form = envelope[2].get(keys)
        if form is None or len(keys) < 2:  # (itemgetter of one key gives no tuple)
            return None
        if len(set(map(_RECORD_TYPE, records))) != 1 or len(set(map(_RECORD_BATCH, records))) != 1 \
                or len(set(map(_RECORD_JOB, records))) != 1:
            return None
        datas = list(map(_RECORD_DATA, records))
        if set(map(len, datas)) != {len(keys)}:
            return None
        try:
            values = list(map(operator.itemgetter(*keys), datas))  # the same keys: each is there
        except KeyError:
            return None
        if not _NUMBER_TYPES.issuperset(map(type, _chain(values))):
            return None
        try:
            total = sum(_chain(values))  # NaN or an infinity (or an overflow): NaN
        except OverflowError:
            return None
        if total - total:
            return None
        stamps = _stamps_of(records)
        if ids is None:
            ids = _new_ids(len(records))
        try:  # the data alone is formatted: the envelope's text is copied, never scanned for "%"
            texts = list(map((form + "}").__mod__, values))  # the data, and the event's "}"
        except ValueError:  # an int too long for str()
            return None
        opening, after_id, after_stamp = _repeat('{"event_id":"'), _repeat(envelope[0]), _repeat(envelope[1])
        lines = list(map("".join, zip(opening, ids, after_id, stamps, after_stamp, texts)))
        if max(map(len, lines)) > _MAX_EVENT_CHARS:  # the loop measures the data alone
            return None
        return list(zip(ids, lines))

    def _envelope(self, etype: str, batch_id: str, job_id) -> tuple:
        """The parts of the envelope around the timestamp and the data, the same for every
        event of one type, batch and job, built once (the encoding of every event pays for
        the rest), and the templates for its data's key sets (see _data_form)."""
        source = self._source()
        if len(self._envelopes) > 4096:
            self._envelopes.clear()
        head, tail = _envelope_parts(etype, batch_id, job_id, source)
        envelope = self._envelopes[(etype, batch_id, job_id)] = (head, tail, {})
        return envelope

    def _after_fork(self) -> None:
        """In a forked child: drop the parent's queue, locks and threads; start fresh on use."""
        claim = self.replayer._claim
        if claim is not None:
            claim._close()  # the parent keeps its claim; only this copy of the fd goes
        self._reset_runtime()
        self.replayer._replay_due = None  # the parent replays; the child only sends its own events
        self.spill.after_fork()
        self.worker._state_lock = threading.RLock()
        self.worker._closed_evt = threading.Event()
        if self.worker._state is not _OPEN:
            self.worker._state = _CLOSED
            self.worker._closed_evt.set()
        else:
            _live.add(self)
        self._slow = not self.enabled or self.worker._state is not _OPEN


class _Worker:
    """The delivery worker of one ExperimentReporter.

    Owns the worker thread and the guard thread; the lifecycle state OPEN -> DRAINING ->
    CLOSED, changed under ``_state_lock`` (with the close deadline, the closer and the
    closed event); ``_lock`` over the queue, the request in flight and the journal; disk
    mode and what the disk refused; the acknowledgements of events already on disk. It
    takes from the facade's queue, has the sender deliver, writes to the spill store what
    the server does not take in time, and has the replayer send it when the server answers.
    """

    def __init__(self, facade: ExperimentReporter):
        self.facade = facade
        self.sender = self.replayer = None  # siblings: set by the facade once all parts exist
        self._state = _OPEN
        self._refusing = False  # set while the last events are being saved at close
        self._state_lock = threading.RLock()
        self._closed_evt = threading.Event()
        self._closer = None

    def _reset_runtime(self) -> None:
        """Threads, locks, the request in flight, disk mode: at start and after a fork."""
        self._thread = None
        self._guard = None
        self._lock = threading.RLock()  # re-entrant: a signal handler may close mid-take
        self._wake_evt = threading.Event()
        self._stop_evt = threading.Event()
        self._inflight = None
        self._inflight_since = 0.0
        self._inflight_journaled = False
        self._controls = 0  # uploads and flush markers queued: no lingering while one waits
        self._disk_retry_at = 0.0  # after the disk refused a write, try it again from then
        self._acked = set()  # ids acknowledged after they were written to disk: replay skips them
        self._journal_epoch = 0  # counts journal writes (a signal handler may write in between)
        self._maintain_at = 0.0  # durable mode: when the journal is looked at next
        self._disk_mode = False  # this run's events go through disk until the backlog is gone
        self._abandoned = False
        self._deadline = None
        self._journal_owner = None  # the thread in _journal_locked (a SIGTERM waits for it)
        self._gap = False  # durable: a queued event is in memory only; later ones are not journaled

    def _start(self) -> None:
        thread = threading.Thread(target=self._run, name="argus-worker", daemon=True)
        self._thread = thread
        try:
            thread.start()
        except RuntimeError:  # interpreter shutting down: events stay queued for close()
            self._thread = None
            return
        if self._guard is None or not self._guard.is_alive():
            guard = threading.Thread(target=self._guard_loop, name="argus-guard", daemon=True)
            self._guard = guard
            try:
                guard.start()
            except RuntimeError:
                self._guard = None

    def _close(self, timeout: float) -> None:
        me = threading.get_ident()
        with self._state_lock:
            state = self._state
            if state is _CLOSED:
                return
            if not self.facade.enabled:
                self._state = _CLOSED
                self._closed_evt.set()
                return
            wait = None
            if state is _OPEN:
                self._state = _DRAINING
                self._closer = me
                self._deadline = _mono() + max(0.0, float(timeout))
                self.facade._slow = True
                if self.sender._next_send > self._deadline - 0.5:
                    # The gap after 429s ends past the deadline: one try at a random moment of
                    # what is left instead (every process that shares the token exits now).
                    self.sender._next_send = _mono() + _random() * max(0.0, float(timeout) - 0.5)
                if not self.sender._up() and not self.facade._offline:
                    # Backing off from a server that did not answer: ask it once more before
                    # the exit gives up on it (one request, no retries).
                    self.sender._drain_probe = True
                    self.sender._down_until = 0.0
            elif self._closer != me:
                wait = max(0.0, self._deadline - _mono()) + 1.0
        if wait is not None:  # another thread drains: wait for it, within its deadline
            self._closed_evt.wait(wait)
            return
        self._stop_evt.set()
        self._wake_evt.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(max(0.0, self._deadline - _mono()) + 0.05)
        self._finalize()

    def _finalize(self) -> None:
        """Put what is left on disk, in order; then CLOSED. Runs once; safe to call again."""
        with self._state_lock:
            if self._state is _CLOSED:
                return
            thread = self._thread
            worker_alive = (
                thread is not None and thread.is_alive() and thread is not threading.current_thread()
            )
            with self._lock:
                if worker_alive:
                    self._abandoned = True  # a worker still blocked in a request is not trusted
                self._refusing = True  # from here on a new event is refused, with the log line
                self.facade._slow = True
                self.facade._idle = True  # a call already past the _slow check wakes _save_late
                saved = self._journal_locked(keep_controls=False)
                if saved and self.facade._queue:  # events another thread queued while we wrote
                    saved = self._journal_locked(keep_controls=False)
                if not saved:
                    self._give_up_queue()
            claim, self.replayer._claim = (self.replayer._claim, None) if not worker_alive else (None, self.replayer._claim)
            if claim is not None:
                claim.release()
            if self.facade.durable and not self._disk_mode and not worker_alive and not self.facade._journaling:
                self.facade.spill.discard_open()  # every event in the journal was acknowledged
            if self._acked and not worker_alive:
                self._prune_acked()
            self.facade.spill.rotate()
            if self.facade.spill.summarise:
                left = _left_behind.setdefault(self.facade.spill.directory, [0, 0])
                left[0] += self._own_events_on_disk()
                left[1] += self.facade.lost
            self._state = _CLOSED
            self._closed_evt.set()
            _live.discard(self.facade)
            if worker_alive and self.sender._transport is not None:
                self.sender._transport.abort()

    def _save_late(self) -> None:
        """Events that other threads queued after close() took its last look at the queue
        (their calls had begun before it): to disk, where the next start or `argus sync`
        sends them, and said once."""
        with self._lock:
            late = self._count_queued()
            if not late:
                return
            store = self.facade.spill
            if not self._journal_locked(keep_controls=False):
                return self._give_up_queue()
            store.rotate()
            if store.summarise:
                _left_behind.setdefault(store.directory, [0, 0])[0] += late
        _log_once(
            "late:%d" % _said_key(self.facade),
            "warning",
            "argus: %d event(s) emitted by another thread while the Reporter of batch %s was "
            "closing were not sent; saved to %s.",
            late,
            self.facade.batch_id,
            store.directory,
        )

    def _give_up_queue(self) -> None:
        """What neither the server nor the disk took at close: refused at the cap, or lost;
        counted and said either way."""
        left = self._count_queued()
        if left and self.facade.spill.at_cap:
            self.facade.spill.refuse(left, say=True)
        elif left:
            self.facade.lost += left
            _log(
                "error",
                "argus: %d event(s) could not be delivered nor saved to %s (disk refused)",
                left,
                self.facade.spill.directory,
            )
        self.facade._queue.clear()

    def _prune_acked(self, final: bool = True) -> None:
        """Take the events the server acknowledged after they were written out of this run's
        closed files, so that no replay makes the server process them again. ``final``
        (closing): the open file is closed first, and the acknowledgements are forgotten."""
        if final:
            self.facade.spill.rotate()
        skip = set()
        while self._acked:
            claim = self.facade.spill.claim_next(skip=skip, own_only=True)
            if claim is None:
                break
            skip.add(claim.path)
            kept = []
            for line in claim.lines:
                event_id = _line_id(line)
                if event_id in self._acked:
                    self._acked.discard(event_id)
                else:
                    kept.append(line)
            if len(kept) == len(claim.lines):
                claim.release()
            else:
                claim.rewrite(kept)
        if final:
            self._acked.clear()

    def _own_events_on_disk(self) -> int:
        total = 0
        for name in list(self.facade.spill.own):
            for suffix in (_SPILL_SUFFIX, _OPEN_SUFFIX):
                path = os.path.join(self.facade.spill.directory, name + suffix)
                if os.path.exists(path):
                    total += _file_events(path)[0]
        return total

    def _count_queued(self) -> int:
        count = len([i for i in self.facade._queue if type(i) is tuple])
        if self._inflight and not self._inflight_journaled:
            count += len(self._inflight)
        return count

    def _journal_locked(self, extra=(), keep_controls: bool = True) -> bool:
        """Write the request in flight, the queue and ``extra`` records to disk, in order.

        Called with ``self._lock`` held. The queue keeps its items until they are on disk.
        Uploads and flush markers stay queued (or, when closing, are released). Returns True
        when everything is on disk (the run is then in disk mode); otherwise what did not fit
        stays in memory, encoded, in order, and False is returned.

        A SIGTERM that arrives while the main thread is in here waits until it is done
        (_on_sigterm): its shutdown would write the same queued events again, under new ids
        (the server would store both copies).
        """
        owner = self._journal_owner
        self._journal_owner = threading.get_ident()
        try:
            return self._journal_queue(extra, keep_controls)
        finally:
            self._journal_owner = owner
            if owner is None and _signals_waiting and threading.current_thread() is threading.main_thread():
                _on_sigterm(*_signals_waiting.pop())

    def _journal_queue(self, extra, keep_controls: bool) -> bool:
        inflight = self._inflight if self._inflight and not self._inflight_journaled else ()
        queue = self.facade._queue
        items = list(queue)
        epoch = self._journal_epoch
        pairs = list(inflight)
        encoded = []  # the queue's items with every event encoded (ids fixed from here on)
        for item in items:
            if type(item) is tuple:
                if len(item) == 6:
                    if item[5]:
                        self.facade._bytes_out += item[5]
                    pair = self.facade._encode(item)
                    item = (pair[0], pair[1], False)
                elif len(item) == 8:
                    pair = self.facade._encode(item, item[6])
                    item = (pair[0], pair[1], item[7])
                if not item[2]:
                    pairs.append((item[0], item[1]))
            encoded.append(item)
        for record in extra:
            pairs.append(self.facade._encode(record))
        if self._journal_epoch != epoch:  # a handler on this thread journaled the queue meanwhile
            extra_pairs = pairs[len(pairs) - len(extra) :] if extra else []
            return self.facade.spill.append([line for _, line in extra_pairs]) == len(extra_pairs)
        written = self.facade.spill.append([line for _, line in pairs]) if pairs else 0
        if self._journal_epoch != epoch:
            return True  # a signal handler on this thread journaled everything meanwhile
        self._journal_epoch += 1
        _pop_front(queue, len(items))
        if written >= len(inflight) and inflight:
            self._inflight_journaled = True
        if written:
            self._disk_mode = True
        skip = max(0, written - len(inflight))  # events of the queue that are now on disk
        kept = []
        for item in encoded:
            if type(item) is tuple:
                if item[2]:
                    self._disk_mode = True  # not sent, and only on disk now: the replay sends it
                    continue  # on disk already (durable)
                if skip:
                    skip -= 1
                    continue
            elif not keep_controls:
                item.done.set()
                continue
            kept.append(item)
        queue.extendleft(reversed(kept))
        if written == len(pairs):
            self._gap = False  # every queued event is on disk, in order
            return True
        self._disk_retry_at = _mono() + 5.0
        return False

    def _run(self) -> None:
        _worker_imports(self.facade.url)
        while True:
            try:
                self._loop()
                return
            except Exception as exc:  # a fault costs the request, never the thread
                _log("error", "argus: the delivery worker hit an error and goes on: %r", exc)
                with self._lock:
                    pairs, self._inflight = self._inflight, None
                    journaled, self._inflight_journaled = self._inflight_journaled, False
                    if pairs and not journaled and not self._abandoned:
                        self.facade._queue.extendleft(reversed([(i, ln, False) for i, ln in pairs]))
                    elif pairs:
                        self._disk_mode = True  # they are on disk: the replay sends them
                if self.replayer._claim is not None:
                    claim, self.replayer._claim = self.replayer._claim, None
                    claim.release()
                if self._stop_evt.wait(0.5) and self._state is not _DRAINING:
                    return
            finally:
                if self._abandoned or self._state is not _OPEN:
                    claim, self.replayer._claim = self.replayer._claim, None
                    if claim is not None and not self._abandoned:
                        claim.release()
                    if self.sender._transport is not None:
                        self.sender._transport.close()

    def _loop(self) -> None:
        while not self._abandoned:
            if self._deadline is not None and _mono() >= self._deadline:
                return  # closing, out of time: close() saves what is left
            if self.facade.durable:
                self._maintain_journal()
            if self._disk_mode:
                if self._disk_step():
                    continue
            elif self.facade._queue and (self.sender._up() or self.facade._offline or _mono() >= self._disk_retry_at):
                if self.sender._pacing():
                    continue  # a shared token: let more pile up for the next request
                events, control = self._take()
                if events:
                    self._deliver(events)
                if control is not None:
                    self._control(control)
                continue
            if self._state is not _OPEN:
                return  # draining: nothing left that the server takes now
            if self.replayer._replay_due is not None and _mono() >= max(self.replayer._replay_due, self.sender._down_until):
                self.replayer._replay_step()
                continue
            self._wait()

    def _wait(self) -> None:
        # In disk mode the caller does not wake the worker for each event: what queues is
        # written to disk in batches (here, or by the guard) while the server catches up.
        self.facade._idle = not self._disk_mode
        if not self.facade._queue or self._disk_mode:
            self._wake_evt.wait(self._idle_wait())
            self._wake_evt.clear()
        self.facade._idle = False

    def _maintain_journal(self) -> None:
        """Durable mode: the journal rotates like any spill file, at most every rotate_s;
        closed journals lose their acknowledged events, and go once those are all of them."""
        now = _mono()
        if now < self._maintain_at:
            return
        self._maintain_at = now + min(5.0, max(0.5, self.facade.spill.rotate_s))
        with self._lock:
            if self._disk_mode or not self.facade.spill.has_open_data():
                return
            if now - self.facade.spill._opened < self.facade.spill.rotate_s and self.facade.spill._written < _SPILL_ROTATE_BYTES:
                return
            if not self.facade._queue and not self._inflight:
                self.facade.spill.discard_open()  # every event in it was acknowledged
            else:
                self.facade.spill.rotate()
        self._prune_acked(final=False)
        with self._lock:
            if not self._disk_mode and not self.facade.spill.own_backlog() and not self.facade.spill.has_open_data():
                self._acked.clear()  # nothing of this run is on disk: nothing left to skip

    def _idle_wait(self) -> float:
        if self._disk_mode:
            if self.facade._offline:
                return 0.5
            return min(0.5, max(0.005, self.sender._down_until - _mono()))
        if self.facade._queue and not self.sender._up():
            return min(1.0, max(0.005, self.sender._down_until - _mono()))
        if self.replayer._replay_due is None:
            return 1.0
        return min(1.0, max(0.005, max(self.replayer._replay_due, self.sender._down_until) - _mono()))

    def _take(self) -> tuple:
        """The next request's events, encoded, from the front of the queue (up to the batch
        limit, MAX_BATCH_BYTES, or a control, which is returned), marked in flight."""
        limit = self.sender._batch_limit
        facade = self.facade
        with self._lock:
            if self._abandoned or self._disk_mode:
                # Disk mode began since the loop looked (the guard wrote the queue to disk
                # while this thread waited for the lock): what queued after it follows it
                # through disk, or it would reach the server first.
                return [], None
            queue = facade._queue
            items = list(itertools.islice(queue, limit))  # in C: no thread or signal between
            control = None
            if items and set(map(type, items)) != {tuple}:  # a control (an upload, a flush marker): up to it
                at = next(i for i, item in enumerate(items) if type(item) is not tuple)
                control = items[at]
                del items[at:]
                _pop_front(queue, at + 1)
            else:
                _pop_front(queue, len(items))
            events = None
            if items and _as_queued(items):  # every one as the caller queued it: the common case
                events = facade._encode_batch(items)
                since, on_disk = items[0][3], False
            elif len(items) >= _RUN_MIN and _as_queued(items, 8):  # durable mode's common case
                events = facade._encode_run(items, list(map(_RECORD_ID, items)))
            if events is None:
                events, since, on_disk, control = self._take_each(items, control)
            else:
                if sum(map(len, map(_LINE, events))) >= MAX_BATCH_BYTES:
                    events = self._cut(events, items, control)
                    control = None
                if len(items[0]) == 8:  # what the journal holds of the events kept
                    kept = items[: len(events)]
                    on_disk = all(map(_RECORD_ON_DISK, kept))
                    since = next((item[3] for item in kept if not item[7]), None)
            self._inflight_since = since if since is not None else _now() - JOURNAL_AFTER_S / 2
            self._inflight = events
            self._inflight_journaled = bool(events) and on_disk
        return events, control

    def _cut(self, events: list, items: list, control) -> list:
        """A batch over MAX_BATCH_BYTES: the events up to the one that reaches it; the rest
        (and the control taken after them) go back to the front of the queue, as queued."""
        nbytes = count = 0
        for _, line in events:
            count += 1
            nbytes += len(line)
            if nbytes >= MAX_BATCH_BYTES:
                break
        self._put_back(items[count:], control)
        return events[:count]

    def _put_back(self, items: list, control) -> None:
        """Items taken past MAX_BATCH_BYTES, and the control taken after them, back to the
        front of the queue, in their order."""
        self.facade._queue.extendleft(reversed(items + ([control] if control is not None else [])))

    def _take_each(self, items: list, control) -> tuple:
        """_take for a batch with events encoded earlier (a 429 or an outage put them back),
        durable events, or events with a size: one at a time. ``(events, since, on disk,
        control)``; what is past MAX_BATCH_BYTES goes back to the queue, with the control."""
        facade = self.facade
        events, since, on_disk, nbytes = [], None, True, 0
        for count, item in enumerate(items, 1):
            size = len(item)
            if size == 6:  # an event as the caller queued it
                if item[5]:
                    facade._bytes_out += item[5]
                if since is None:
                    since = item[3]
                pair = facade._encode_batch([item])[0]
                on_disk = False
            elif size == 3:  # (event_id, line, on disk): encoded earlier
                pair = (item[0], item[1])
                on_disk = on_disk and item[2]
            else:  # durable: (record..., event_id, on_disk)
                if since is None and not item[7]:
                    since = item[3]
                pair = facade._encode(item, item[6])
                on_disk = on_disk and item[7]
            events.append(pair)
            nbytes += len(pair[1])
            if nbytes >= MAX_BATCH_BYTES and count < len(items):
                self._put_back(items[count:], control)
                return events, since, on_disk, None
        return events, since, on_disk, control

    def _deliver(self, events: list) -> None:
        self.sender._deferred = False
        if self.facade._offline or not self.sender._up():
            unsent = events
        else:
            unsent = self.sender._send(events, RETRY_ATTEMPTS)
        with self._lock:
            journaled = self._inflight_journaled
            self._inflight = None
            self._inflight_journaled = False
            if self._abandoned:
                return
            if self.sender._deferred and unsent and not journaled:
                # A 429: these go first in the next request, with what queued meanwhile.
                self.facade._queue.extendleft(reversed([(i, ln, False) for i, ln in unsent]))
                return
            if journaled:  # on disk already: remember what was acknowledged, replay skips it
                if unsent:
                    left = {event_id for event_id, _ in unsent}
                    self._acked.update(event_id for event_id, _ in events if event_id not in left)
                    self._disk_mode = True
                else:
                    self._acked.update(event_id for event_id, _ in events)
                return
            if unsent:
                self._save(unsent)
            elif self._gap and not self._disk_mode and not self.facade._queue:
                self._gap = False  # the events kept in memory only were delivered

    def _save(self, pairs: list) -> None:
        """Undelivered events: to disk (disk mode), or back into memory what the disk refuses."""
        written = self.facade.spill.append([line for _, line in pairs])
        if written:
            self._disk_mode = True
            if not self.facade._offline and self.replayer._replay_due is None:
                self.replayer._replay_due = self.sender._down_until
        if written == len(pairs):
            return
        self._disk_retry_at = _mono() + 5.0
        rest = pairs[written:]
        room = self.facade._qmax - len(self.facade._queue)
        keep = rest[: max(0, room)]
        if len(keep) < len(rest):
            self.facade._lose(len(rest) - len(keep))
        self.facade._queue.extendleft(reversed([(i, ln, False) for i, ln in keep]))

    def _disk_step(self) -> bool:
        """One step of disk mode; False when there is nothing to do until the server answers."""
        control = self._queue_to_disk()
        if control is not None:
            if self.sender._up() and not self.facade._offline:
                self.replayer._replay_own(until_empty=True)
            self._control(control)
            return True
        if self.facade._offline or not self.sender._up():
            if self._state is not _OPEN:
                return False
            self._wait()
            return True
        if self.sender._pacing():
            return True
        if self._state is not _OPEN and self.sender._next_send > (self._deadline or 0.0):
            return False  # closing, and the next try would pass the deadline: the rest stays on disk
        if self.replayer._replay_own():
            return True
        with self._lock:
            if not self.facade._queue and not self.facade.spill.own_backlog():
                self._disk_mode = False  # the backlog is gone: live events go straight out
                return True
        return bool(self.facade._queue)

    def _queue_to_disk(self, take_control: bool = True):
        """Move queued events up to the first upload or flush marker to disk; return it
        (taken from the queue), or leave it at the queue's head when not ``take_control``."""
        with self._lock:
            queue = self.facade._queue
            pairs, control = [], None
            while queue:
                if type(queue[0]) is not tuple:
                    if take_control:
                        control = queue.popleft()
                    break
                item = queue.popleft()
                if len(item) == 3:
                    if not item[2]:
                        pairs.append((item[0], item[1]))
                    continue
                if len(item) == 8:
                    if not item[7]:
                        pairs.append(self.facade._encode(item, item[6]))
                    continue
                if item[5]:
                    self.facade._bytes_out += item[5]
                pairs.append(self.facade._encode(item))
            written = self.facade.spill.append([line for _, line in pairs]) if pairs else 0
            if written < len(pairs):
                # What does not fit stays in memory, in order. With a backlog of this run on
                # disk, replaying it makes room; without one, memory sends them directly. A
                # flush or upload behind them goes on: they are as safe as they can be.
                queue.extendleft(reversed([(i, ln, False) for i, ln in pairs[written:]]))
                self._disk_retry_at = _mono() + 5.0
                if not self.facade.spill.own_backlog():
                    self._disk_mode = False
            return control

    def _guard_loop(self) -> None:
        """Every quarter second: no unacknowledged event in memory only for over a second,
        and no request past its overall deadline."""
        closed = self._closed_evt  # (_stop_evt is set for the whole drain: no spinning on it)
        while not self._abandoned and self._state is not _CLOSED:
            if closed.wait(0.25):
                return
            try:
                self._guard_tick()
            except Exception as exc:
                _log_once("guard:%d" % _said_key(self), "error", "argus: the spill guard hit an error: %r", exc)

    def _guard_tick(self) -> None:
        self.sender._abort_if_late()
        if self.facade._offline or _mono() < self._disk_retry_at:
            return
        oldest = self._oldest_unacked()
        if oldest is not None and _now() - oldest >= JOURNAL_AFTER_S:
            with self._lock:
                if not self._abandoned and self._state is not _CLOSED:
                    self._journal_locked()

    def _oldest_unacked(self):
        """Wall-clock time of the oldest event that is in memory only, or None."""
        oldest = None
        if self._inflight and not self._inflight_journaled:
            oldest = self._inflight_since
        queue = self.facade._queue
        try:
            head = queue[0] if queue else None
            if head is not None and type(head) is not tuple:  # an upload or flush waits first
                from itertools import islice

                head = next((item for item in islice(queue, 64) if type(item) is tuple), None)
        except (IndexError, RuntimeError):  # emptied, or changed, while it was read
            head = None
        if type(head) is tuple:
            if len(head) == 6 or (len(head) == 8 and not head[7]):
                oldest = head[3] if oldest is None else min(oldest, head[3])
            elif len(head) == 3 and not head[2]:
                oldest = _now() - JOURNAL_AFTER_S if oldest is None else oldest
        return oldest

    # -- uploads and flush markers, in queue order ---------------------------------------

    def _control(self, control) -> None:
        self._controls = max(0, self._controls - 1)
        if type(control) is _Upload:
            # Events spilled during an outage were queued before this upload (its job_start
            # may be among them): re-send what is due before the file leaves.
            if self._disk_mode and self.sender._up() and not self.facade._offline:
                self.replayer._replay_own(until_empty=True)
            while (
                self.replayer._replay_due is not None
                and not self._abandoned
                and _mono() >= max(self.replayer._replay_due, self.sender._down_until)
            ):
                self.replayer._replay_step()
            try:
                control.result = self.sender._upload(control)
            except Exception as exc:
                _log("error", "argus: upload of %s failed: %r", control.path, exc)
        elif self._disk_mode and self.sender._up() and not self.facade._offline:
            self.replayer._replay_own(until_empty=True)
        control.done.set()


class _Sender:
    """One request to the server and its answer, read per event; the pacing between requests.

    Owns the transport, the request deadline, the batch size and pacing (linger, 429 gaps),
    the server's up/down state (failures, back-off) and the count of events the server
    acknowledged (``delivered``). Uploads are requests too: they go through here.
    """

    def __init__(self, facade: ExperimentReporter):
        self.facade = facade
        self.worker = self.replayer = None  # siblings: set by the facade once all parts exist
        self.delivered = 0  # events the server acknowledged (accepted or deduplicated)
        self._batch_limit = MAX_BATCH_EVENTS
        self._per_event_s = None  # the server's measured time per event (smoothed)
        self._pace_gap = 0.0  # seconds between requests after 429s (shared by the daemons)
        self._next_send = 0.0  # after 429s: no request before this (monotonic time)
        self._linger_until = _mono() + LINGER_S  # the first request takes the first events along
        self._pace_streak = 0  # answers without a 429 since the last one
        self._sent_429 = 0

    def _reset_runtime(self) -> None:
        """The transport and the server's state as this process saw it: at start and after a fork."""
        self._pause = threading.Event()  # never set: an uninterruptible wait while closing
        self._transport = None
        self._deferred = False  # the last live send was put off by a 429
        self._defer_own = False  # replaying this run's backlog: a 429 gives the chunk back
        self._drain_probe = False  # closing while backing off: one request, no retries
        self._request_deadline = None  # cleared under _deadline_lock (see _abort_if_late)
        self._deadline_lock = threading.Lock()
        self._down_until = 0.0
        self._fails = 0
        self._auth_fails = 0
        self._last_activity = _mono()

    # -- pacing: when the next request may leave ------------------------------------------

    def _pacing(self) -> bool:
        """Wait out the linger (and, after 429s, the pacing gap) before taking what to send,
        so that what queues meanwhile leaves in the same request: a token's request budget
        is shared by every process that uses it. A full batch, a flush or an upload waiting,
        or closing, does not wait. True when it waited (the caller loops)."""
        if self.worker._state is not _OPEN or self.worker._controls or self.facade._offline:
            return False
        if self.worker._disk_mode:  # the backlog on disk is what leaves: only 429s hold it back
            gap = self._next_send - _mono()
        else:
            if len(self.facade._queue) >= self._batch_limit:
                return False
            gap = max(self._next_send, self._linger_until) - _mono()
        if gap <= 0:
            return False
        self.facade._idle = False
        self.worker._stop_evt.wait(min(gap, 0.25))
        if self.worker._disk_mode:
            self.worker._queue_to_disk(take_control=False)  # an upload queued meanwhile waits its turn
        return True

    def _up(self) -> bool:
        return _mono() >= self._down_until

    # -- one request and its answer ---------------------------------------------------

    def _get_transport(self):
        if self._transport is None:
            self._transport = _make_transport(self.facade.url, self.facade._token)
        return self._transport

    def _request_timeout(self, n_events: int = 1):
        """A timeout that grows with what the request carries; None when past the deadline."""
        per_event = self._per_event_s if self._per_event_s is not None else 0.008
        timeout = min(REQUEST_TIMEOUT_MAX_S, max(self.facade.timeout, 3.0 + 4.0 * per_event * n_events))
        if self.worker._deadline is None:
            return timeout
        left = self.worker._deadline - _mono()
        return min(timeout, left) if left > 0.01 else None

    def _abort_if_late(self) -> None:
        """From the guard thread: end the request in flight if it is past its overall
        deadline. The check and the abort hold the lock that the request's end takes to
        clear the deadline, so a request that ends meanwhile is never mistaken for the next
        one on the same connection (which the abort would cut)."""
        with self._deadline_lock:
            deadline = self._request_deadline
            if deadline is not None and _mono() > deadline and self._transport is not None:
                self._transport.abort()

    def _sleep(self, seconds: float) -> bool:
        """Back off; False when that would pass the close deadline (the caller spills)."""
        if self.worker._state is not _OPEN:
            if self.worker._deadline is None or _mono() + seconds > self.worker._deadline:
                return False
            self._pause.wait(seconds)
            return True
        self.worker._stop_evt.wait(seconds)  # close() cuts the wait short
        return True

    def _send(self, pairs: list, attempts: int) -> list:
        """POST events; return those not delivered (to keep). Rejected ones are set aside."""
        transport = self._get_transport()
        attempt = 0
        if self._drain_probe:
            self._drain_probe = False
            attempts = 1
        while pairs:
            limit = self._fitting_limit()
            if limit < 1:
                return pairs  # closing: no request would be answered before the deadline
            if len(pairs) > limit:  # after a slow answer or a timeout, or near the deadline
                head = self._send(pairs[:limit], attempts)
                if head:
                    return head + pairs[limit:]
                pairs = pairs[limit:]
                continue
            gap = self._next_send - _mono()
            if gap > 0 and not self._sleep(gap):
                return pairs
            timeout = self._request_timeout(len(pairs))
            if timeout is None:
                return pairs
            single = len(pairs) == 1
            if single:
                path, body = "/api/events", pairs[0][1]
            else:
                path, body = "/api/events/batch", '{"events":[%s]}' % ",".join(map(_LINE, pairs))
            started = _mono()
            self._request_deadline = started + timeout + 2.0
            try:
                status, headers, data = transport.request(
                    "POST", path, body.encode("utf-8"), {"Content-Type": "application/json"}, timeout
                )
            except _NetworkError as exc:
                status, headers, data, problem = None, {}, b"", str(exc)
            else:  # (an answer's text only for a failure: reading a 2xx's costs a parse)
                problem = None if 200 <= status < 300 else "HTTP %d %s" % (status, _error_text(data))
                self._last_activity = _mono()
            finally:
                with self._deadline_lock:
                    self._request_deadline = None
            elapsed = _mono() - started
            self._linger_until = _mono() + LINGER_S
            if self._pace_gap and status != 429 and self.worker._state is _OPEN:
                # A token shared by others (429s seen): every request keeps the gap, so that
                # this process sends few full requests rather than many small ones.
                self._next_send = max(self._next_send, _mono() + self._pace_gap * (0.75 + _random() * 0.5))
            if status is not None and 200 <= status < 300:
                retry, odd = self._read_results(pairs, data, single)
                if odd is None:
                    self._mark_up()
                    self._measured(len(pairs), elapsed)
                    pairs = retry
                    if not pairs:
                        return []
                    attempt += 1  # per-event "internal" errors: retry those few
                    if attempt >= attempts or not self._sleep(_jitter(RETRY_BASE_S * 2**attempt)):
                        return pairs
                    continue
                problem = odd
                _log_once(
                    "odd:%s:%s" % (self.facade.url, path),
                    "error",
                    "argus: %s answered %d to %s with %s; the events count as not delivered and "
                    "are kept. Is %s the Argus server itself (not a proxy or a login page)?",
                    self.facade.url,
                    status,
                    path,
                    odd,
                    self.facade.url,
                )
            elif status is not None and 300 <= status < 400:
                _log_once(
                    "redirect:%s" % self.facade.url,
                    "error",
                    "argus: %s redirects (%d to %s); redirects are not followed (a POST could "
                    "become a GET, and the token must not go elsewhere). Set %s to the final "
                    "URL. Events are kept.",
                    self.facade.url,
                    status,
                    headers.get("location", "?"),
                    ENV_URL,
                )
                self._mark_refused(status, data)
                return pairs
            elif status == 429:
                self._paced(_retry_after(headers, 1.0))
                if self.worker._state is _OPEN and self.worker._inflight is not None:
                    self._deferred = True
                    return pairs  # live: what queued meanwhile leaves with these, next request
                if self.worker._state is _OPEN and self._defer_own:
                    return pairs  # this run's backlog: the next request takes what queued too
                continue
            elif status == 415:
                self.facade.spill.dead_letter([(p[1], status, _error_text(data)) for p in pairs])
                return []
            elif status in (400, 413, 422):
                if single:
                    self.facade.spill.dead_letter([(pairs[0][1], status, _error_text(data))])
                    return []
                half = len(pairs) // 2  # isolate the bad events so that the good ones still go
                head = self._send(pairs[:half], attempts)
                if head:  # the first half was not delivered: nothing after it may overtake it
                    return head + pairs[half:]
                return self._send(pairs[half:], attempts)
            elif status in (401, 403, 404):
                self._mark_refused(status, data)
                return pairs
            if status is None and "timed out" in problem and len(pairs) > MIN_BATCH_EVENTS:
                # The server is still working on these: wait about as long as it needs, then
                # send less (the first part again, deduplicated by the server if it made it).
                self._batch_limit = max(MIN_BATCH_EVENTS, len(pairs) // 4)
                if not self._sleep(min(RETRY_MAX_S, elapsed)):
                    return pairs
            attempt += 1
            if attempt >= attempts:
                self._mark_down(problem)
                return pairs
            if not self._sleep(_jitter(min(RETRY_MAX_S, RETRY_BASE_S * 2 ** (attempt - 1)))):
                return pairs
        return []

    def _fitting_limit(self) -> int:
        """The batch size for the next request. While closing, only what the server can
        answer before the deadline: a request given up on is work the server does for nobody."""
        limit = self._batch_limit
        if self.worker._deadline is None or self._per_event_s is None:
            return limit
        left = self.worker._deadline - _mono() - 0.2
        return min(limit, int(left / (self._per_event_s * 1.5 + 1e-9)))

    def _measured(self, n_events: int, elapsed: float) -> None:
        """Size the next requests from this answer's speed (grow slowly, shrink at once)."""
        self._pace_streak += 1
        if self._pace_gap and self._pace_streak >= 4:  # a shared token: come back down slowly
            self._pace_gap = self._pace_gap * 0.8 if self._pace_gap > 0.05 else 0.0
            self._pace_streak = 0
        if self._pace_gap and n_events >= self._batch_limit:
            self._pace_gap *= 0.8  # a full request: the gap holds back more than one carries
        if n_events < 5:
            return
        per_event = max(elapsed, 1e-4) / n_events
        old = self._per_event_s
        self._per_event_s = per_event if old is None else 0.7 * old + 0.3 * per_event
        _server_rate["events_per_s"] = 1.0 / self._per_event_s
        # Per-event time mixes the server's fixed cost per request with its cost per event:
        # size by how long the answer took. Grow while answers come fast, shrink at once
        # towards what the per-event cost allows when they are slow.
        limit = self._batch_limit
        if elapsed < TARGET_REQUEST_S / 2:
            self._batch_limit = min(MAX_BATCH_EVENTS, limit * 2)
        elif elapsed > TARGET_REQUEST_S * 2:
            target = int(TARGET_REQUEST_S / self._per_event_s)
            self._batch_limit = max(MIN_BATCH_EVENTS, min(limit // 2, max(target, MIN_BATCH_EVENTS)))

    def _paced(self, retry_after: float) -> None:
        """A 429: space this process's requests out (shared by the daemons), with jitter."""
        self._sent_429 += 1
        self._pace_streak = 0
        # Retry-After says when the bucket has one request again, for every process that
        # shares it: waiting exactly that long makes them all collide again. Wait a multiple,
        # a quarter longer on each 429 (doubling strands a process behind a gap longer than
        # its run), spread out at random. A long gap costs little: each request carries what
        # queued meanwhile, and the exit sends the rest in one.
        first = not self._pace_gap
        self._pace_gap = min(PACE_MAX_S, max(12.0 * retry_after, self._pace_gap * 1.25, 0.1))
        if self.worker._state is not _OPEN:  # closing: spread over what is left of the deadline
            room = max(0.0, (self.worker._deadline or 0.0) - _mono() - retry_after - 0.3)
            self._next_send = _mono() + retry_after + _random() * room
        elif first:
            # The first 429 says that the token is shared. Processes that have seen none yet
            # send at their linger and take all the bucket refills; a try within the next few
            # Retry-Afters takes one before them, and then they see their 429 too.
            self._next_send = _mono() + retry_after * (1.0 + 4.0 * _random())
        else:
            self._next_send = _mono() + self._pace_gap * (0.75 + _random() * 0.75)

    def _read_results(self, pairs: list, data: bytes, single: bool) -> tuple:
        """Count what the server acknowledged. Returns ``(to_retry, odd)``: ``odd`` describes
        an answer that is not an Argus answer (then nothing counts as delivered)."""
        if not single and _all_acked(data, pairs):
            self.delivered += len(pairs)
            return [], None
        try:
            answer = _loads(data.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            return pairs, "a body that is not JSON (%s)" % _truncate(repr(data[:60]), 80)
        if single:
            if not isinstance(answer, dict):
                return pairs, "JSON that is not an object"
            self.delivered += 1
            return [], None
        results = answer.get("results") if isinstance(answer, dict) else None
        if not isinstance(results, list):
            return pairs, "JSON without per-event results"
        if len(results) == len(pairs):  # the usual answer: every event accepted, in order
            try:
                if all(r["event_id"] == p[0] and r["status"] in _ACKED for r, p in zip(results, pairs)):
                    self.delivered += len(pairs)
                    return [], None
            except (TypeError, KeyError, IndexError):
                pass  # something else in there: read it one result at a time
        pending = dict(pairs)
        rejected = []
        retry = []
        for result in results:
            if not isinstance(result, dict):
                continue
            event_id = result.get("event_id")
            line = pending.pop(event_id, None) if isinstance(event_id, str) else None
            if line is None:
                continue
            status = result.get("status")
            if type(status) is str and status in _ACKED:
                self.delivered += 1
            elif status == "rejected":
                error = _text(result.get("error") or "rejected")
                if error.lower().startswith("internal"):
                    retry.append((event_id, line))
                else:
                    rejected.append((line, "rejected", error))
            else:
                retry.append((event_id, line))
        self.facade.spill.dead_letter(rejected)
        keep = {event_id for event_id, _ in retry}
        keep.update(pending)  # absent from the results: not known to be stored
        return [pair for pair in pairs if pair[0] in keep], None  # in the order they were sent

    def _mark_up(self) -> None:
        if self._fails or self._auth_fails:
            _log("warning", "argus: the server at %s answers again; re-sending saved events", self.facade.url)
        self._fails = self._auth_fails = 0
        self._down_until = 0.0

    def _mark_down(self, problem: str) -> None:
        self._fails += 1
        self._down_until = _mono() + min(RETRY_MAX_S, float(2 ** min(self._fails, 8)))
        if self.replayer._replay_due is None:
            self.replayer._replay_due = self._down_until
        if self._fails == 1:
            _log(
                "warning",
                "argus: the server at %s is not answering (%s); events are saved to %s and "
                "re-sent as soon as it answers again",
                self.facade.url,
                problem,
                self.facade.spill.directory,
            )

    def _mark_refused(self, status: int, data: bytes) -> None:
        self._auth_fails += 1
        self._down_until = _mono() + min(600.0, AUTH_PROBE_S * 2 ** (self._auth_fails - 1))
        if self.replayer._replay_due is None:
            self.replayer._replay_due = self._down_until
        if 300 <= status < 400:
            return  # logged by the caller
        if status == 404:
            cause = "%s/api/events answered 404: this URL is not an Argus server; check %s" % (
                self.facade.url,
                ENV_URL,
            )
        elif status == 403:
            cause = "the token may not write events (403 %s); use an SDK token (em_live_...)" % (
                _error_text(data)
            )
        else:
            cause = "the server refused the token (401 %s); set %s to a valid SDK token" % (
                _error_text(data),
                ENV_TOKEN,
            )
        _log_once(
            "refused:%s:%d" % (self.facade.url, status),
            "error",
            "argus: %s. Events are kept in %s; send them later with `python3 -m argus sync`.",
            cause,
            self.facade.spill.directory,
        )

    # -- uploads ------------------------------------------------------------------------

    def _record_upload(self, upload: _Upload, size: int, why: str) -> None:
        if not self.facade._records_uploads:
            return  # `argus sync` keeps the entries it could not send itself
        self.facade.spill.record_upload(
            {
                "path": os.path.abspath(upload.path),
                "size": size,
                "route": upload.route,
                "label": upload.label,
                "meta": None if upload.meta is None else _loads(_meta_text(upload.meta)),
                "recorded_at": _format_ts(_now()),
                "why": why,
                "url": self.facade.url,
                "token": _fingerprint(self.facade._token),
            }
        )

    def _upload(self, upload: _Upload):
        path = upload.path
        try:
            size = os.path.getsize(path)
        except OSError as exc:
            _log("warning", "argus: cannot upload %s: %s", path, exc)
            return None
        if size > ARTIFACT_MAX_BYTES:
            _log(
                "warning",
                "argus: %s is %.1f MB, over the server's %d MB cap; not uploaded",
                path,
                size / 1048576.0,
                ARTIFACT_MAX_BYTES // 1048576,
            )
            return None
        if self.facade._offline:
            self._record_upload(upload, size, "offline")
            return None
        if not self._up():
            self._record_upload(upload, size, "server unreachable")
            _log(
                "warning",
                "argus: the server is unreachable; upload of %s recorded for `python3 -m argus sync`",
                path,
            )
            return None
        fields = {}
        if upload.label is not None:
            fields["label"] = _text(upload.label)
        if upload.meta is not None:
            fields["meta"] = _meta_text(upload.meta)
        for attempt in range(3):
            gap = self._next_send - _mono()
            if gap > 0 and not self._sleep(gap):
                return None
            timeout = self._request_timeout(max(1, size // 100_000))
            if timeout is None:
                return None
            body = _MultipartBody(path, fields)
            headers = {"Content-Type": body.content_type, "Content-Length": str(len(body))}
            try:
                status, rheaders, data = self._get_transport().request(
                    "POST", upload.route, body, headers, timeout
                )
            except _NetworkError as exc:
                if not exc.sent and attempt < 2 and self._sleep(_jitter(RETRY_BASE_S * 2**attempt)):
                    continue  # it never reached the server: a retry cannot store it twice
                if not exc.sent:
                    self._record_upload(upload, size, "server unreachable")
                    _log("warning", "argus: upload of %s failed (%s); recorded for `python3 -m argus sync`", path, exc)
                else:
                    _log(
                        "warning",
                        "argus: upload of %s got no answer (%s); the server may still store it, "
                        "so it is not sent again",
                        path,
                        exc,
                    )
                return None
            if 200 <= status < 300:
                try:
                    return _loads(data.decode("utf-8"))
                except ValueError:
                    return {}
            if status == 429 and attempt < 2:
                self._paced(_retry_after(rheaders, 1.0))
                continue
            if status >= 500 and attempt < 2 and self._sleep(_jitter(RETRY_BASE_S * 2**attempt)):
                continue
            if status in (401, 403):
                self._record_upload(upload, size, "refused (%d)" % status)
                _log(
                    "warning",
                    "argus: upload of %s refused (%d %s); recorded for `python3 -m argus sync` once the token works",
                    path,
                    status,
                    _error_text(data),
                )
            elif status == 404 and upload.batch_level:
                _log_once(
                    "no-batch-artifacts:%s" % self.facade.url,
                    "warning",
                    "argus: this server has no batch artifacts (404 on %s); batch files are not uploaded",
                    upload.route,
                )
            else:
                _log("warning", "argus: upload of %s failed: HTTP %d %s", path, status, _error_text(data))
                if status == 500 and not upload.batch_level:
                    _log_once(
                        "upload-500:%s" % self.facade.url,
                        "warning",
                        "argus: the Argus server answers 500 to uploads for a job_id that also "
                        "exists in another batch (a server bug): give jobs ids that are unique "
                        "across batches.",
                    )
            return None
        return None


_acked_results = None  # finds the results that acknowledge their event (see _all_acked)


def _all_acked(data: bytes, pairs: list) -> bool:
    """The usual batch answer, read without building it: True when the body looks like a
    JSON object (``{`` ... ``]}``) and the objects in it that open with ``"event_id": <id>,
    "status": "accepted"`` (or ``"deduplicated"``) name exactly the events of ``pairs``, in
    order: the server's per-event results. A third of the CPU of parsing the answer and
    reading each result. Any other answer (another layout or key order, a rejected event, a
    result missing) is parsed and read result by result."""
    global _acked_results
    if _acked_results is None:
        import re

        _acked_results = re.compile(
            r'\{"event_id": ?"(.{36})", ?"status": ?"(?:accepted|deduplicated)"'
        ).findall  # (our ids are 36 characters: an id of another length is parsed)
    try:
        body = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        return False
    if body[:1] != "{" or body[-2:] != "]}":
        return False
    return _acked_results(body) == [event_id for event_id, _ in pairs]


class _Replayer:
    """Spill store -> server: the spill file claimed now, and when older spill files are due.

    The worker uses it for this run's backlog and for other runs' files; ``argus sync``
    (``_sync_pass``) uses the same class through a facade made without a worker.
    """

    def __init__(self, facade: ExperimentReporter):
        self.facade = facade
        self.worker = self.sender = None  # siblings: set by the facade once all parts exist

    def _reset_runtime(self) -> None:
        """The claim and the replay schedule: at start and after a fork."""
        self._claim = None
        self._replay_due = None if self.facade._offline else 0.0
        self._unsent = 0  # this run's backlog replays in a row that the server did not all take

    def _replay_own(self, until_empty: bool = False) -> bool:
        """Send chunks of this run's spilled events, oldest first; False when there are none."""
        sent_any = False
        while not self.worker._abandoned:
            self.sender._defer_own = not until_empty  # a 429: give the chunk back (not before a flush)
            try:
                outcome = self._replay_once(own_only=True)
            finally:
                self.sender._defer_own = False
            if outcome == "empty":
                return sent_any
            if outcome == "file done":
                continue
            sent_any = True
            if outcome == "unsent":
                if self.sender._up():  # answered, but not all taken (internal errors): back off
                    self._unsent += 1
                    pause = _jitter(min(RETRY_MAX_S, RETRY_BASE_S * 2 ** min(self._unsent, 8)))
                    self.sender._next_send = max(self.sender._next_send, _mono() + pause)
                return True
            self._unsent = 0
            if not until_empty:
                return True
            if self.facade._queue and type(self.facade._queue[0]) is tuple:
                self.worker._queue_to_disk(take_control=False)  # a control behind them: its turn comes
        return sent_any

    def _replay_step(self) -> None:
        """Re-send one chunk of an older spill file for this server (another run's backlog)."""
        outcome = self._replay_once(match=self._for_us, others_only=True)
        if outcome == "empty":
            self._replay_due = None
        elif outcome == "unsent" and self.sender._up():  # answered, but some need another try later
            self._replay_due = _mono() + RETRY_MAX_S

    def _replay_once(self, attempts: int = 1, **claim_args) -> str:
        """The replayer, for the worker and for ``argus sync``: one chunk of the claimed spill
        file (claiming the next one first, with ``claim_args`` for SpillStore.claim_next).

        Returns "empty" (nothing to claim), "file done", "sent" or "unsent" (the server did
        not take the chunk: the file is given back with it).
        """
        claim = self._claim
        if claim is None:
            if not claim_args.get("others_only"):  # this run's open file joins the backlog
                self.facade.spill.rotate()
            claim = self._claim = self.facade.spill.claim_next(**claim_args)
            if claim is None:
                return "empty"
        pairs = claim.next_chunk(self.sender._batch_limit, self.worker._acked)
        if not pairs:
            claim.done()
            self._claim = None
            return "file done"
        # This run's backlog: the next files join the same request while it has room (after
        # a 429 the file is given back and what was written since is in another one).
        claims = [(claim, pairs)]
        spill, limit = self.facade.spill, self.sender._batch_limit
        while claim_args.get("own_only") and not claims[-1][0].left() and len(pairs) < limit:
            more = spill.claim_next(skip={c.path for c, _ in claims}, own_only=True)
            if more is None:
                break
            chunk = more.next_chunk(limit - len(pairs), self.worker._acked)
            claims.append((more, chunk))
            pairs = pairs + chunk
        self._claim = claims[-1][0]
        try:
            unsent = self.sender._send(pairs, attempts)
        except BaseException:  # a fault (or a signal) mid-request: every file keeps its chunk
            for held, chunk in claims:
                held.release([line for _, line in chunk])
            self._claim = None
            raise
        if unsent:
            left = {event_id for event_id, _ in unsent}
            for held, chunk in claims:
                held.release([line for event_id, line in chunk if event_id in left])
            self._claim = None
            return "unsent"
        for held, _ in claims[:-1]:
            held.done()
        return "sent"

    def _for_us(self, claim) -> bool:
        """A spill file for this server (or for any: written without a URL, or by 0.2.0)."""
        return claim.destination is None or _same_url(claim.destination, self.facade.url)


def _envelope_parts(etype: str, batch_id, job_id, source: str) -> tuple:
    """An event's envelope around its timestamp and around its data (the line is
    ``{"event_id":"<id>`` + head + timestamp + tail + data + ``}``)."""
    return (
        '","schema_version":"%s","event_type":"%s","timestamp":"' % (SCHEMA_VERSION, etype),
        '","batch_id":%s,"job_id":%s,"source":%s,"data":'
        % (_dumps_safe(batch_id), "null" if job_id is None else _dumps_safe(job_id), source),
    )


_LINE = operator.itemgetter(1)  # an (event_id, line) pair's line
_SIZE = operator.itemgetter(5)  # a queued record's size in bytes (0: not counted)


def _pop_front(queue: deque, count: int) -> None:
    """Take ``count`` items off the front of ``queue`` in one loop in C: a signal handler,
    which runs between two bytecodes, finds all of them there or none."""
    deque(itertools.starmap(queue.popleft, itertools.repeat((), count)), maxlen=0)


def _as_queued(items: list, fields: int = 6) -> bool:
    """Every item is a record as the caller queued it, none with a size: six fields, or
    eight for durable mode's (the record, its id and whether the journal has it)."""
    return set(map(len, items)) == {fields} and not any(map(_SIZE, items))


_MAX_DATA_FORMS = 32  # data templates kept per envelope (data under other keys: the encoder)


def _data_form(envelope: tuple, data: dict) -> None:
    """Keep a template for data under these keys, in this order, when every value is a
    plain number: ``template % values``. %r writes an exact int or float as the JSON
    encoder does (its repr); _encode_batch checks that each value is one, and finite.
    Other data keeps None for its keys, so that they are looked at once, not per event."""
    if not all(type(k) is str and (type(v) is float or type(v) is int) for k, v in data.items()):
        envelope[2][tuple(data)] = None
        return
    fields = ",".join("%s:%%r" % _dumps(key).replace("%", "%%") for key in data)
    envelope[2][tuple(data)] = "{%s}" % fields


def _line_id(line: str) -> str:
    """The event_id of an encoded event (the envelope starts with it)."""
    return line[13:49] if line.startswith('{"event_id":"') else ""


def _same_url(a: str | None, b: str | None) -> bool:
    return bool(a) and bool(b) and a.rstrip("/").lower() == b.rstrip("/").lower()


def _url_was_invalid(url) -> bool:
    """True when a URL was given but refused (it was logged already: say nothing more)."""
    candidate = url or os.environ.get(ENV_URL, "").strip()
    return bool(candidate) and not str(candidate).lower().startswith(("http://", "https://"))


def _check_job_id(job_id) -> None:
    if not isinstance(job_id, str) or not job_id:
        raise TypeError(
            "job_id must be a non-empty string, e.g. r.job('etth1_dlinear'); got %r" % (job_id,)
        )
    if len(job_id) > 256:
        raise ValueError("job_id is %d characters long; the server allows at most 256" % len(job_id))


def _check_batch_id(batch_id) -> None:
    if not isinstance(batch_id, str) or not batch_id:
        raise TypeError("batch_id must be a non-empty string; got %r" % (batch_id,))
    if len(batch_id) > 128:
        raise ValueError("batch_id is %d characters long; the server allows at most 128" % len(batch_id))


def _epoch_number(epoch):
    if type(epoch) is int:
        return epoch
    value = _jsonable(epoch)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# ---------------------------------------------------------------------------------------
# The spill store on disk
# ---------------------------------------------------------------------------------------

try:
    import fcntl as _fcntl
except ImportError:  # Windows: replay works, without protection against two replayers
    _fcntl = None

_SPILL_SUFFIX = ".jsonl"
_OPEN_SUFFIX = ".jsonl.part"  # a file still being written; never replayed while its writer lives
_DEAD_LETTER = "deadletter.jsonl"
_PENDING_UPLOADS = "pending-uploads.jsonl"


_spill_counts = {}  # directory -> [spilled, refused] by this process's senders: the exit summary
_left_behind = {}  # directory -> [events this process's closed senders left on disk, events lost]
_destinations = {}  # directory -> (url, token) of a sender that spilled there: the exit hand-off
_server_rate = {"events_per_s": None}  # the server's measured ingest speed, for the exit line


def _lock_nb(fd: int) -> bool:
    if _fcntl is None:
        return True
    try:
        _fcntl.flock(fd, _fcntl.LOCK_EX | _fcntl.LOCK_NB)
        return True
    except OSError:
        return False


class SpillStore:
    """Undelivered events, one JSON line each, in ``*.jsonl`` files of one directory.

    A writer appends to its own ``*.jsonl.part`` file, holding an exclusive ``flock`` on it,
    and renames it to ``*.jsonl`` when it rotates or closes. A replayer claims a file by
    taking that lock (so a dead writer's file is taken over), sends its events and deletes
    it only after they are acknowledged. Each file starts with a header line naming its
    destination (the server URL and a fingerprint of the token, never the token), so that a
    run against another server leaves it alone. The directory is 0700, the files 0600. The
    total size is capped (``ARGUS_SPILL_MAX_MB``). No method raises: a disk fault is logged
    once, counted, and reported to the caller as "not written".
    """

    def __init__(
        self,
        directory: str | None = None,
        max_mb: float | None = None,
        *,
        url: str | None = None,
        token: str | None = None,
    ):
        self.directory = os.path.abspath(directory or _default_spill_dir())
        self.max_bytes = int(
            (max_mb if max_mb is not None else _env_float(ENV_SPILL_MAX_MB, DEFAULT_SPILL_MAX_MB))
            * 1024
            * 1024
        )
        self.rotate_s = _env_float(ENV_SPILL_ROTATE_S, DEFAULT_SPILL_ROTATE_S)
        self.url = url
        self.header = _dumps({"argus_spill": 1, "url": url, "token": _fingerprint(token)})
        self.source = None  # the sender's source (JSON): compact lines need it in the header
        self._has_source = False  # the open file's header carries self.source
        self.spilled = 0  # events this process wrote
        self.dropped = 0  # events refused because the directory is at its cap
        self.rejected = 0  # events set aside in the dead-letter file
        self.failures = 0  # writes that failed (disk full, read-only, cannot create)
        self.at_cap = False  # the last append stopped at the size cap (not a disk fault)
        self._refuse_said = None
        self.summarise = False  # a worker's store: its spills are summed up at exit
        self.own = []  # names of the files this store wrote that may still hold events
        self._lock = threading.RLock()  # re-entrant: a SIGTERM handler may spill mid-write
        self.mapped = False  # durable mode: the open file is written through a shared map
        self._fd = None
        self._path = None
        self._opened = 0.0
        self._written = 0
        self._total = None
        self._map = None  # the open file's mmap (mapped stores); its position: the file's length
        self._critical = False  # this store's thread is changing the open file (see _aside)
        self._deferred = False  # a signal handler asked to close the open file meanwhile
        self._asides = []  # files a signal handler wrote meanwhile: replayed after the open one

    # -- writing ----------------------------------------------------------------------

    def _ensure_dir(self) -> None:
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        try:
            if os.stat(self.directory).st_mode & 0o077:
                os.chmod(self.directory, 0o700)
        except OSError:
            pass

    def _dir_bytes(self) -> int:
        total = 0
        try:
            with os.scandir(self.directory) as it:
                for entry in it:
                    if entry.name.endswith((_SPILL_SUFFIX, _OPEN_SUFFIX)):
                        try:
                            total += entry.stat().st_size
                        except OSError:
                            pass
        except OSError:
            pass
        if self._map is not None:  # the open file's zeros past its end hold no events
            total -= len(self._map) - self._map.tell()
        return total

    def _open(self) -> None:
        self._ensure_dir()
        name = "spill-%020d-%d-%s" % (time.time_ns(), os.getpid(), os.urandom(3).hex())
        path = os.path.join(self.directory, name + _OPEN_SUFFIX)
        # Made under another name, locked and given its header before it is a .part file:
        # a replayer never sees it empty and unlocked (it would delete it).
        making = path + ".new"
        fd = os.open(making, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        first = self._header_line()
        try:
            _lock_nb(fd)
            _write_all(fd, first)
            os.rename(making, path)
        except OSError:
            os.close(fd)
            _unlink(making)
            raise
        self._fd = fd
        self._path = path
        self._has_source = self.source is not None
        self._opened = _mono()
        self._written = 0
        self.own.append(name)
        if self.mapped:
            self._grow(len(first), len(first))

    def _header_line(self) -> bytes:
        header = self.header
        if self.source is not None:
            header = '%s,"source":%s}' % (header[:-1], self.source)
        return (header + "\n").encode("utf-8")

    # A mapped file: durable mode writes one event per call, and a write(2) per call costs
    # more than the rest of the call, because it lets the worker thread take the GIL. A
    # line copied into a MAP_SHARED map is in the page cache when the copy ends, as safe
    # from SIGKILL as a write(2), and the GIL is kept.
    # - The blocks are allocated before they are mapped (posix_fallocate), so a full disk
    #   says so there, never as a SIGBUS on a copy; a refused allocation (which may have
    #   taken part of the space) is cut back, and the file goes on with write(2).
    # - A map is made only while the cap has room for a whole chunk: the zeros past the
    #   written end count in every store's view of the directory's size.
    # - The file is cut back to the map's position when it is closed. A reader of a file
    #   whose writer died drops the zeros (no line ever holds a NUL byte).
    # - Each line goes in with one mmap.write(), which also moves the map's position, so a
    #   signal handler that writes between two bytecodes of a journal() call writes wholly
    #   before or after that call's line. Changing the open file (open, grow, close) takes
    #   several steps: a handler that runs in the middle of them must not touch the file
    #   (see _aside).

    def _grow(self, end: int, length: int) -> bool:
        """Map the open file, ``length`` bytes long, with room past ``end``; False (and
        unmapped, ``length`` long) when it cannot be."""
        size = (end // _MAP_CHUNK + 1) * _MAP_CHUNK
        new = None
        try:
            if self._total is None or self._total + _MAP_CHUNK > self.max_bytes:
                raise ValueError("no room under the cap for a mapped chunk")
            import mmap

            os.posix_fallocate(self._fd, 0, size)
            new = mmap.mmap(self._fd, size)
            new.seek(length)
        except (OSError, ValueError, TypeError, AttributeError, ImportError):  # no room, or no mmap here
            if new is not None:
                new.close()
            self._unmap()
            os.ftruncate(self._fd, length)  # what a refused allocation took, given back
            return False
        old, self._map = self._map, new
        if old is not None:
            old.close()
        return True

    def _unmap(self) -> None:
        """Back to write(2): the file is cut to what was written, and appends follow it."""
        old = self._map
        if old is None:
            return
        length = old.tell()
        self._map = None
        old.close()
        os.ftruncate(self._fd, length)

    def _put(self, data: bytes) -> None:
        """Write ``data`` at the end of the open file (OSError when the disk refuses)."""
        mapped = self._map
        if mapped is not None:
            length = mapped.tell()
            if length + len(data) <= len(mapped) or self._grow(length + len(data), length):
                self._map.write(data)
                return
        _write_all(self._fd, data)

    # A signal handler runs between two bytecodes of the main thread, and the lock (an
    # RLock, so that a handler can save the queue while the thread holds it) lets it in.
    # While this thread is changing the open file (_critical), a handler's lines go to a
    # file of their own, complete at once, and a handler's close waits for the change to
    # end (_deferred). A close is never turned into a delete there: the line being written
    # when the handler ran was not in the file when it judged it all acknowledged.

    def _aside(self, data: bytes, count: int) -> bool:
        try:
            self._ensure_dir()
            name = "spill-%020d-%d-%s" % (time.time_ns(), os.getpid(), os.urandom(3).hex())
            path = os.path.join(self.directory, name + _SPILL_SUFFIX)
            fd = os.open(path + ".new", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                _write_all(fd, self._header_line() + data)
            finally:
                os.close(fd)
            os.rename(path + ".new", path)
        except OSError as exc:
            self.failures += 1
            _log("error", "argus: cannot write to the spill directory %s (%s)", self.directory, exc)
            return False
        self.spilled += count
        self._note(spilled=count)
        self.own.append(name)
        self._asides.append(path)
        self._deferred = True  # the open file is closed first, so that a replay sends it first
        return True

    def _change(self, change, *args):
        """``change(*args)``, as the change of the open file under way (see _aside)."""
        self._critical = True
        try:
            return change(*args)
        finally:
            self._end_critical()

    def _end_critical(self) -> None:
        self._critical = False
        while self._deferred:
            self._deferred = False
            self._critical = True
            try:
                self._rotate()
                # A replay takes files oldest first (mtime): the lines the handler wrote
                # aside come after everything in the file it interrupted, which closing
                # has just touched. (A job_failed replayed before its job_start left the
                # job RUNNING on the server.)
                asides, self._asides = self._asides, []
                for path in asides:
                    try:
                        os.utime(path)
                    except OSError:
                        pass
            finally:
                self._critical = False

    def append(self, lines, *, rotate: bool = True) -> int:
        """Write encoded events in order; returns how many were written (a prefix of
        ``lines``). At the size cap only the events that fit are written and ``at_cap`` is
        set: the caller keeps the rest, or gives them up through refuse()."""
        if not lines:
            return 0
        data = ("\n".join(lines) + "\n").encode("utf-8")
        with self._lock:
            if self._critical:
                return len(lines) if self._aside(data, len(lines)) else 0
            return self._change(self._append, lines, data, rotate)

    def _append(self, lines, data: bytes, rotate: bool) -> int:
        self.at_cap = False
        try:
            if self._total is None:
                self._ensure_dir()
                self._total = self._dir_bytes()
            if self._total + len(data) > self.max_bytes:
                self._total = self._dir_bytes()  # others may have replayed meanwhile
                if self._total + len(data) > self.max_bytes:
                    room, fits = self.max_bytes - self._total, 0
                    for line in lines:
                        room -= len(line.encode("utf-8")) + 1
                        if room < 0:
                            break
                        fits += 1
                    self.at_cap = True
                    lines = lines[:fits]
                    if not lines:
                        return 0
                    data = ("\n".join(lines) + "\n").encode("utf-8")
            if self._fd is None:
                self._open()
            self._put(data)
        except OSError as exc:
            self._failed(exc)
            return 0
        self._total += len(data)
        self._written += len(data)
        self.spilled += len(lines)
        self._note(spilled=len(lines))
        if rotate and (self._written >= _SPILL_ROTATE_BYTES or _mono() - self._opened >= self.rotate_s):
            self._rotate()
        return len(lines)

    def refuse(self, count: int, say: bool = False) -> None:
        """Events given up because the directory is at its cap: counted, and said (the first
        time, then at most every 10 s, and whenever ``say``)."""
        self.dropped += count
        self._note(dropped=count)
        now = _mono()
        if not say and self._refuse_said is not None and now - self._refuse_said < 10.0:
            return
        self._refuse_said = now
        _log(
            "error",
            "argus: the spill directory %s is at its cap of %s MB: %d event(s) could not be "
            "saved (%d so far). Run `python3 -m argus sync` or raise %s.",
            self.directory,
            "%.3g" % (self.max_bytes / 1048576.0),
            count,
            self.dropped,
            ENV_SPILL_MAX_MB,
        )

    def set_source(self, source: str) -> None:
        """The ``source`` block (JSON) for compact lines: a new one starts a new file."""
        with self._lock:
            if source != self.source and self._fd is not None:
                if self._critical:  # a signal handler's: the file closes once the change ends
                    self._deferred = True
                else:
                    self._change(self._rotate)
            self.source = source
            self._has_source = self._fd is not None and not self._deferred

    def journal(self, line) -> bool:
        """One event straight to the open file (durable mode); True once the kernel has it.
        ``line``: an encoded event (str), or a compact one with its newline (bytes, _compact)."""
        with self._lock:
            if not self._critical and type(line) is bytes:
                self._critical = True  # first: what it reads next, a handler cannot change
                try:
                    mapped, total, size = self._map, self._total, len(line)
                    if mapped is not None and self._has_source and total is not None and total + size <= self.max_bytes:
                        try:
                            mapped.write(line)
                        except ValueError:  # the map is full: the long way grows it
                            pass
                        else:
                            self._total = total + size
                            self._written += size
                            return True
                finally:
                    if self._deferred:
                        self._end_critical()
                    else:
                        self._critical = False
            data = line if type(line) is bytes else (line + "\n").encode("utf-8")
            if self._critical:
                return self._aside(data, 1)
            return self._change(self._journal, line, data)

    def _journal(self, line, data: bytes) -> bool:
        compact = type(line) is bytes
        fd = self._fd
        if fd is not None and compact and not self._has_source:
            self._rotate()  # a compact line needs the source in its file's header
            fd = None
        if fd is None or self._total is None or self._total + len(data) > self.max_bytes:
            if compact:
                line = line[:-1].decode("ascii")
            return self._append([line], data, False) == 1
        try:
            self._put(data)
        except OSError as exc:
            self._failed(exc)
            return False
        self._total += len(data)
        self._written += len(data)
        return True

    def _failed(self, exc: OSError) -> None:
        self.failures += 1
        if self._fd is not None:  # a half-written file: close it, keep what it holds
            self._rotate()
        self._total = None
        _log_once(
            "spill-fail:%s:%s" % (self.directory, getattr(exc, "errno", None)),
            "error",
            "argus: cannot write to the spill directory %s (%s); undelivered events are kept "
            "in memory (up to the queue's bound) until the server answers. Point %s at a "
            "writable directory.",
            self.directory,
            exc,
            ENV_SPILL_DIR,
        )

    def _note(self, spilled: int = 0, dropped: int = 0) -> None:
        # counted per directory, not per store: senders close (and leave _live) before atexit
        if self.summarise:
            counts = _spill_counts.setdefault(self.directory, [0, 0])
            counts[0] += spilled
            counts[1] += dropped

    def has_open_data(self) -> bool:
        return self._fd is not None and self._written > 0

    def _take_open(self) -> tuple:
        """(fd, path) of the open file, which is no longer this store's to write; (None, None)."""
        if self._map is not None:
            try:
                self._unmap()
            except OSError as exc:  # the zeros stay at its end; a reader ignores them
                _log("warning", "argus: cannot cut spill file %s to its length: %s", self._path, exc)
        fd, path = self._fd, self._path
        self._fd = self._path = None
        return fd, path

    def rotate(self) -> None:
        """Close the open file so that it can be replayed (by this or another process)."""
        with self._lock:
            if self._critical:
                self._deferred = True
                return
            self._change(self._rotate)

    close = rotate

    def _rotate(self) -> None:
        fd, path = self._take_open()
        if fd is None:
            return
        try:
            os.fsync(fd)  # the file is complete on disk before anyone may claim it
            os.rename(path, path[: -len(".part")])
        except OSError as exc:
            _log("warning", "argus: cannot close spill file %s: %s", path, exc)
        finally:
            try:
                os.close(fd)
            except OSError:
                pass

    def discard_open(self) -> None:
        """Delete the open file: every event in it was acknowledged (durable mode)."""
        with self._lock:
            if self._critical:
                # Kept and closed instead: the line being written when the handler ran is
                # not acknowledged. The acknowledged ones in it are sent again by a replay
                # (the server deduplicates them): a rare interleaving, and nothing is lost.
                self._deferred = True
                return
            fd, path = self._change(self._take_open)
            if fd is None:
                return
            self._total = None
            _unlink(path)
            try:
                os.close(fd)
            except OSError:
                pass
            name = os.path.basename(path)[: -len(_OPEN_SUFFIX)]
            if name in self.own:
                self.own.remove(name)

    def after_fork(self) -> None:
        """In a forked child: forget the parent's open file (and its lock)."""
        self._lock = threading.RLock()
        if self._map is not None:  # unmapped here only: the parent goes on writing it
            self._map.close()
            self._map = None
        self._critical = self._deferred = False
        self._asides = []
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
        self._fd = self._path = None
        self.own = []

    def _side_file(self, name: str, entries) -> None:
        with self._lock:
            self._ensure_dir()
            path = os.path.join(self.directory, name)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                _write_all(fd, "".join(_dumps_safe(e) + "\n" for e in entries).encode("utf-8"))
            finally:
                os.close(fd)

    def dead_letter(self, rejected) -> None:
        """Set aside ``(event_line, status, message)`` triples the server refused."""
        if not rejected:
            return
        entries = []
        for line, status, message in rejected:
            try:
                event = _loads(line)
            except ValueError:
                event = line
            entries.append(
                {
                    "rejected_at": _format_ts(_now()),
                    "status": status,
                    "error": _truncate(_text(message), 2000),
                    "event": event,
                }
            )
        try:
            self._side_file(_DEAD_LETTER, entries)
        except OSError as exc:
            _log("error", "argus: cannot write the dead-letter file: %s", exc)
        self.rejected += len(entries)
        # Lines of a spill file that cannot be read (one cut short by a kill or a full disk)
        # never reached the server: say so, not that it refused them.
        what = "could not read" if entries[0]["status"] == "malformed" else "the server rejected"
        _log_once(
            "dead-letter:" + self.directory,
            "error",
            "argus: %s %d event(s) (%s %s); they are kept in %s and not retried. Later ones are "
            "counted there without another log line.",
            what,
            len(entries),
            entries[0]["status"],
            entries[0]["error"],
            os.path.join(self.directory, _DEAD_LETTER),
        )

    def record_upload(self, entry: dict) -> None:
        self.record_upload_many([entry])

    def record_upload_many(self, entries: list) -> None:
        """Remember uploads that could not be made now (path, size, route) for ``argus sync``."""
        try:
            self._side_file(_PENDING_UPLOADS, entries)
        except OSError as exc:
            _log("error", "argus: cannot record a pending upload: %s", exc)

    # -- replaying --------------------------------------------------------------------

    def _candidates(self) -> list:
        found = []
        try:
            with os.scandir(self.directory) as it:
                for entry in it:
                    name = entry.name
                    if name in (_DEAD_LETTER, _PENDING_UPLOADS):
                        continue
                    if name.endswith(_SPILL_SUFFIX) or name.endswith(_OPEN_SUFFIX):
                        try:
                            st = entry.stat()
                        except OSError:
                            continue
                        found.append((st.st_mtime, name, entry.path, st.st_size))
        except OSError:
            return []
        found.sort()
        return found

    def claim_next(self, skip=(), match=None, own_only: bool = False, others_only: bool = False) -> _Claim | None:
        """Claim the oldest unclaimed spill file, or return None when there is none.

        ``match(claim)`` decides whether a file is for us (a file without a header,
        written by an older version, has the destination None); ``own_only`` takes only
        files this store wrote, oldest first: the backlog of this run; ``others_only``
        none of them (a durable journal holds events still queued or in flight). One
        writer's files are taken in order: while one of them cannot be claimed (its open
        file, or one that another process replays), its later ones are left alone.
        """
        candidates = self._candidates()
        if own_only:
            own = set(self.own)
            candidates = sorted((c for c in candidates if _base_name(c[1]) in own), key=lambda c: c[1])
        elif others_only:
            own = set(self.own)
            candidates = [c for c in candidates if _base_name(c[1]) not in own]
        held = set()  # writers with a file that cannot be claimed now: their later files wait
        for mtime, name, path, size in candidates:
            if path in skip:
                continue
            writer = _writer_of(name)
            if writer in held:
                continue
            if path == self._path:
                held.add(writer)
                continue
            try:
                fd = os.open(path, os.O_RDWR)
            except OSError:
                continue  # gone meanwhile: delivered by whoever held it
            try:
                if not _lock_nb(fd) or os.fstat(fd).st_ino != os.stat(path).st_ino:
                    os.close(fd)  # held by its writer or another replayer, or replaced
                    held.add(writer)
                    continue
            except OSError:
                os.close(fd)
                continue
            if name.endswith(_OPEN_SUFFIX) and size == 0:
                _unlink(path)  # an empty file whose writer is gone (we hold its lock)
                os.close(fd)
                continue
            claim = _Claim(self, path, fd, mtime)
            if match is not None and not match(claim):
                claim._close()
                if isinstance(skip, set):
                    skip.add(path)
                continue
            return claim
        return None

    def forget(self, path: str) -> None:
        name = _base_name(os.path.basename(path))
        if name in self.own:
            self.own.remove(name)

    def own_backlog(self) -> bool:
        """True while a file this store wrote may still hold undelivered events."""
        if self.has_open_data():
            return True
        current = _base_name(os.path.basename(self._path)) if self._path else None
        self.own = [
            name
            for name in self.own
            if name != current
            and any(os.path.exists(os.path.join(self.directory, name + sfx)) for sfx in (_SPILL_SUFFIX, _OPEN_SUFFIX))
        ] + ([current] if current in self.own else [])
        return any(name != current for name in self.own)

    def backlog(self) -> dict:
        """Files, events, bytes, the oldest file's age and the destinations of what waits."""
        files = events = nbytes = 0
        oldest = None
        destinations = {}
        for mtime, _name, path, size in self._candidates():
            files += 1
            nbytes += size
            oldest = mtime if oldest is None else min(oldest, mtime)
            count, destination = _file_events(path)
            events += count
            key = destination or "(any)"
            destinations[key] = destinations.get(key, 0) + count
        return {
            "directory": self.directory,
            "files": files,
            "events": events,
            "bytes": nbytes,
            "oldest": _format_ts(oldest) if oldest else None,
            "destinations": destinations,
            "dead_letter": _count_lines(os.path.join(self.directory, _DEAD_LETTER)),
            "pending_uploads": _count_lines(os.path.join(self.directory, _PENDING_UPLOADS)),
        }


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _base_name(name: str) -> str:
    for suffix in (_OPEN_SUFFIX, _SPILL_SUFFIX):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _writer_of(name: str) -> str:
    """The process that wrote a spill file, from its name (``spill-<ns>-<pid>-<random>``):
    a replay takes one writer's files in order, so it waits while one of them is held."""
    parts = name.split("-")
    return parts[2] if len(parts) >= 4 and parts[0] == "spill" else name


def _fingerprint(token: str | None) -> str | None:
    """A short hash that tells two tokens apart and reveals nothing of either."""
    if not token:
        return None
    import hashlib

    return "sha256:" + hashlib.sha256(token.encode("utf-8")).hexdigest()[:12]


def _header(line: str):
    """A spill file's header line as a dict (``url``, ``token`` fingerprint), else None."""
    if not line.startswith('{"argus_spill"'):
        return None
    try:
        header = _loads(line)
    except ValueError:
        return None
    return header if isinstance(header, dict) else None


def _file_events(path: str) -> tuple:
    """(events, destination URL) of a spill file."""
    try:
        with open(path, "rb") as f:
            first = f.readline()
            count = first.count(b"\n") + sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 16), b""))
    except OSError:
        return 0, None
    header = _header(first.decode("utf-8", "replace").strip())
    if header is None:
        return count, None
    return count - 1, header.get("url")


def _count_lines(path: str) -> int:
    try:
        with open(path, "rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 16), b""))
    except OSError:
        return 0


_marshal = _m_dumps = _crc32 = _b64 = _pack_epoch = _unpack_epoch = _struct_error = None


def _load_marshal() -> None:
    global _marshal, _m_dumps, _crc32, _b64, _pack_epoch, _unpack_epoch, _struct_error
    import binascii
    import marshal
    import struct

    packer = struct.Struct("<36sdqBdddd")  # _packed's: id, time, epoch, mask, four values
    _pack_epoch, _unpack_epoch, _struct_error = packer.pack, packer.unpack, struct.error
    _m_dumps, _crc32, _b64 = marshal.dumps, binascii.crc32, binascii.b2a_base64
    _marshal = (marshal.dumps, marshal.loads, binascii.b2a_base64, binascii.a2b_base64, binascii.crc32)


def _compact(record, event_id: str):
    """Durable mode's journal line for ``record`` (bytes, with its newline): ``~``, the
    CRC-32 of its marshal in hex, and the marshal in base64. Format 2, read by every
    Python 3: unlike 3 and 4 it builds no table of shared objects, a third of its cost.
    About a third of encoding it as JSON on the caller's thread: floats are copied, not
    printed. A replay turns it back into the very line the worker sends (_expand). None
    when marshal cannot take the data."""
    if _m_dumps is None:
        _load_marshal()
    try:
        raw = _m_dumps((event_id, record[0], record[1], record[2], record[3], record[4]), 2)
    except (ValueError, TypeError):  # nested too deep, or not a marshal type
        return None
    return b"~%08x%s" % (_crc32(raw), _b64(raw))  # base64 ends with the newline


_heads = {}  # job id -> (batch id, head): the start of that job's packed lines
_HEADS_MAX = 4096  # a process with more jobs than this starts the table again
_EPOCH_KEYS = ["epoch", "train_loss", "val_loss", "lr", "batch_time_ms"]  # job.epoch's, in order
_PACKED_CHARS = 116  # the base64 of a packed event: 85 bytes, _pack_epoch's "<36sdqBdddd"


def _packed(record, event_id: str, values: tuple):
    """Durable mode's journal line for an epoch of ``job.epoch``'s fast path (an int epoch,
    float or None values): the line's head, made once per job (``^``, the CRC-32 of the
    rest of the head in hex, the event's type, batch, job and the five keys as JSON, a
    tab), then the id, the time, the epoch, a bit per value given and the four values
    packed by struct, in base64 with the newline. Nothing is looked at and floats are
    copied: half of _compact's instructions. What a kill inside the copy leaves (a line
    cut short, or with a hole of zeros that a reader drops: a copy need not store in
    order) and a short write run into the next line both change a length, of the head
    (its CRC) or of the body (exactly 116 characters), so a reader sees it (_unpacked).
    None when the epoch does not fit in 64 bits: _compact takes the event."""
    head = _heads.get(record[2])
    if head is None or head[0] is not record[1]:
        head = _head(record[1], record[2])
    train_loss, val_loss, lr, batch_time_ms = values
    try:
        raw = _pack_epoch(
            event_id.encode(),
            record[3],
            record[4]["epoch"],
            (train_loss is not None) | (val_loss is not None) << 1 | (lr is not None) << 2 | (batch_time_ms is not None) << 3,
            0.0 if train_loss is None else train_loss,
            0.0 if val_loss is None else val_loss,
            0.0 if lr is None else lr,
            0.0 if batch_time_ms is None else batch_time_ms,
        )
    except _struct_error:
        return None
    return head[1] + _b64(raw)


def _head(batch_id: str, job_id) -> tuple:
    """``(batch id, the head of the job's packed lines)``, made and kept in _heads."""
    if _marshal is None:
        _load_marshal()
    if len(_heads) >= _HEADS_MAX:
        _heads.clear()
    text = _dumps(["job_epoch", batch_id, job_id, _EPOCH_KEYS]).encode("ascii")
    head = (batch_id, b"^%08x%s\t" % (_crc32(text), text))
    _heads[job_id] = head
    return head


def _unpacked(line: str) -> tuple:
    """The six fields of a packed line (``^``); raises when it is not one whole packed
    line: a head whose CRC-32 holds, JSON with the five keys, then exactly 116 characters
    that decode to 85 bytes (base64 decoding passes over characters that are not its own,
    so the count is checked on both sides), and a mask of at most four bits. The body
    has no checksum: bytes changed in place, which neither a kill nor a short write does,
    are not seen, as in a JSON line."""
    tab = line.index("\t")
    text = line[tab + 1:]
    if len(text) != _PACKED_CHARS:
        raise ValueError("not a whole packed line")
    raw = _marshal[3](text)  # not 85 bytes: _unpack_epoch raises struct.error
    head = line[9:tab].encode("ascii")
    if _marshal[4](head) != int(line[1:9], 16):
        raise ValueError("a damaged head")
    etype, batch_id, job_id, keys = _loads(head)
    if keys != _EPOCH_KEYS:
        raise ValueError("not job.epoch's keys")
    event_id, ts, epoch, mask, *values = _unpack_epoch(raw)
    if mask > 15:
        raise ValueError("not a mask")
    data = {"epoch": epoch}
    for bit, key, value in zip((1, 2, 4, 8), _EPOCH_KEYS[1:], values):
        if mask & bit:
            data[key] = value
    return event_id.decode("ascii"), etype, batch_id, job_id, ts, data


def _expand(line: str, source: str):
    """The encoded event of a compact line (``~``) or a packed one (``^``), or None when
    it is neither."""
    if _marshal is None:
        _load_marshal()
    try:
        if line[0] == "^":
            event_id, etype, batch_id, job_id, ts, data = _unpacked(line)
        else:
            raw = _marshal[3](line[9:])
            if _marshal[4](raw) != int(line[1:9], 16):
                return None  # damaged (a short write on a full disk): marshal must never
                # read it, a wrong count in it can make marshal allocate gigabytes
            event_id, etype, batch_id, job_id, ts, data = _marshal[1](raw)
    except Exception:  # not base64, not marshal or struct, not six fields
        return None
    # What goes into the envelope unescaped must be what the SDK writes (a damaged line
    # must not become a line that is not JSON).
    if not (type(event_id) is str and len(event_id) == 36 and event_id.count("-") == 4):
        return None
    if not (type(etype) is str and etype.isascii() and etype.replace("_", "").isalnum()):
        return None
    if not (isinstance(batch_id, str) and (job_id is None or isinstance(job_id, str))):
        return None
    if not (type(ts) in (int, float) and 0 <= ts < 1e11 and isinstance(data, dict)):
        return None
    try:
        int(event_id.replace("-", ""), 16)
    except ValueError:
        return None
    head, tail = _envelope_parts(etype, batch_id, job_id, source)
    return '{"event_id":"%s%s%s%s%s}' % (event_id, head, _format_ts(ts), tail, _encode_data(data))


class _Claim:
    """One spill file held by this process while its events are re-sent."""

    def __init__(self, store: SpillStore, path: str, fd: int, mtime: float):
        self.store = store
        self.path = path
        self._fd = fd
        self._mtime = mtime
        _unlink(path + ".tmp")  # release()'s rewrite, left by a holder killed mid-write: only a holder writes it
        with os.fdopen(os.dup(fd), "rb") as f:
            raw = f.read().replace(b"\0", b"")  # zeros a mapped file's writer left (no line holds one)
        lines = [ln for ln in raw.decode("utf-8", "replace").split("\n") if ln.strip()]
        self.header = None
        self.destination = None  # the server URL the events were written for (None: any)
        self.token_fp = None  # the fingerprint of the token they were written under
        header = _header(lines[0]) if lines else None
        source = None
        if header is not None:
            self.header = lines.pop(0)
            self.destination = header.get("url")
            self.token_fp = header.get("token")
            source = header.get("source")
        if any(ln[0] in "~^" for ln in lines):  # durable mode's compact lines: encoded now
            source = _dumps_safe(source if isinstance(source, dict) else {"project": "unknown"})
            lines = [(_expand(ln, source) or ln) if ln[0] in "~^" else ln for ln in lines]
        self.lines = lines
        self.pos = 0

    def left(self) -> int:
        return len(self.lines) - self.pos

    def next_chunk(self, limit: int = MAX_BATCH_EVENTS, skip_ids=None) -> list:
        """Up to ``limit`` ``(event_id, line)`` pairs; malformed lines go to the dead letter.

        Events whose id is in ``skip_ids`` (acknowledged after they were written here) are
        passed over and removed from that set.
        """
        pairs, poison = [], []
        nbytes = 0
        while self.pos < len(self.lines) and len(pairs) < limit and nbytes < MAX_BATCH_BYTES:
            line = self.lines[self.pos]
            self.pos += 1
            try:
                event = _loads(line)
                event_id = event["event_id"] if isinstance(event, dict) else None
            except (ValueError, KeyError):
                event_id = None
            if not isinstance(event_id, str):
                poison.append((line, "malformed", "unreadable line in spill file %s" % self.path))
                continue
            if skip_ids and event_id in skip_ids:
                skip_ids.discard(event_id)
                continue
            pairs.append((event_id, line))
            nbytes += len(line)
        self.store.dead_letter(poison)
        return pairs

    def done(self) -> None:
        _unlink(self.path)
        self.store.forget(self.path)
        self._close()

    def rewrite(self, lines: list) -> None:
        """Give the file back holding only ``lines`` (deleted when there are none)."""
        self.lines, self.pos = lines, 0
        if not lines:
            return self.done()
        self.pos = len(lines)  # release() rewrites a file it has read from
        self.release(lines)

    def release(self, unsent=()) -> None:
        """Give the file back, keeping ``unsent`` plus everything not yet read."""
        remaining = list(unsent) + self.lines[self.pos :]
        if not remaining:
            return self.done()
        if self.pos:
            tmp = self.path + ".tmp"
            head = [self.header] if self.header else []
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                try:
                    _write_all(fd, ("\n".join(head + remaining) + "\n").encode("utf-8"))
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.utime(tmp, (self._mtime, self._mtime))  # keep its place in the order
                target = self.path
                if target.endswith(".part"):
                    target = target[: -len(".part")]
                os.replace(tmp, target)
                if target != self.path:
                    os.unlink(self.path)
            except OSError as exc:
                _unlink(tmp)
                _log("warning", "argus: cannot rewrite spill file %s: %s", self.path, exc)
        self._close()

    def _close(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)  # also releases the lock
            except OSError:
                pass
            self._fd = None


# ---------------------------------------------------------------------------------------
# Transports
# ---------------------------------------------------------------------------------------


class _NetworkError(Exception):
    """Connection refused or reset, DNS, TLS, timeout: anything without an HTTP status.

    ``sent`` is False when the request certainly did not reach the server (it failed while
    connecting), so that a retry cannot store anything twice.
    """

    def __init__(self, message: str, sent: bool = True):
        super().__init__(message)
        self.sent = sent


def _short_cause(exc: BaseException) -> str:
    """One short cause for a failed request: "connection refused", "timed out"..."""
    text = str(exc) or type(exc).__name__
    lowered = text.lower()
    for needle, cause in (
        ("refused", "connection refused"),
        ("timed out", "timed out"),
        ("timeout", "timed out"),
        ("name or service not known", "unknown host"),
        ("nodename nor servname", "unknown host"),
        ("temporary failure in name resolution", "unknown host (DNS)"),
        ("certificate verify failed", "TLS certificate not trusted"),
        ("reset by peer", "connection reset"),
        ("remote end closed", "connection closed by the server"),
        ("remotedisconnected", "connection closed by the server"),
        ("no route to host", "no route to host"),
        ("network is unreachable", "network unreachable"),
    ):
        if needle in lowered:
            return cause
    return _truncate(text, 200)


def _proxy_for(scheme: str, host: str) -> str | None:
    """The proxy URL for a request, from HTTP(S)_PROXY and NO_PROXY (either case)."""

    def env(name):
        return os.environ.get(name.lower()) or os.environ.get(name.upper()) or ""

    proxy = env("%s_proxy" % scheme) or env("all_proxy")
    if not proxy:
        return None
    for entry in env("no_proxy").replace(" ", "").split(","):
        if not entry:
            continue
        if entry == "*":
            return None
        entry = entry.lstrip(".").split(":")[0].lower()
        if host.lower() == entry or host.lower().endswith("." + entry):
            return None
    return proxy if "://" in proxy else "http://" + proxy


class _StdlibTransport:
    """HTTP/1.1 with keep-alive on ``http.client``; proxies by CONNECT or absolute URI."""

    name = "urllib"

    def __init__(self, base_url: str, token: str | None = None):
        import http.client
        from urllib.parse import unquote, urlsplit

        self._http = http.client
        url = urlsplit(base_url)
        self.base_url = base_url
        self._https = url.scheme == "https"
        self._host = url.hostname or "localhost"
        self._port = url.port or (443 if self._https else 80)
        self._prefix = url.path.rstrip("/")
        self._headers = {"User-Agent": _USER_AGENT, "Accept": "application/json"}
        if token:
            self._headers["Authorization"] = "Bearer " + token
        self._proxy = None
        proxy = _proxy_for(url.scheme, self._host)
        if proxy:
            p = urlsplit(proxy)
            self._proxy = (p.hostname, p.port or 8080)
            if p.username:
                import base64

                creds = "%s:%s" % (unquote(p.username), unquote(p.password or ""))
                self._proxy_auth = "Basic " + base64.b64encode(creds.encode()).decode()
            else:
                self._proxy_auth = None
        self._conn = None

    def _connect(self, timeout: float):
        http = self._http
        if self._https:
            import ssl

            bundle = _ca_bundle()
            ctx = ssl.create_default_context(cafile=bundle) if bundle else ssl.create_default_context()
            if self._proxy:
                conn = http.HTTPSConnection(*self._proxy, timeout=timeout, context=ctx)
                headers = {"Proxy-Authorization": self._proxy_auth} if self._proxy_auth else None
                conn.set_tunnel(self._host, self._port, headers=headers)
                return conn
            return http.HTTPSConnection(self._host, self._port, timeout=timeout, context=ctx)
        if self._proxy:
            return http.HTTPConnection(*self._proxy, timeout=timeout)
        return http.HTTPConnection(self._host, self._port, timeout=timeout)

    def request(self, method: str, path: str, body=None, headers=None, timeout: float = 10.0):
        """Return ``(status, headers, body_bytes)``; raise _NetworkError without an answer."""
        target = self._prefix + path
        hdrs = dict(self._headers)
        if headers:
            hdrs.update(headers)
        if self._proxy and not self._https:
            target = "http://%s:%d%s" % (self._host, self._port, target)
            if self._proxy_auth:
                hdrs["Proxy-Authorization"] = self._proxy_auth
        timeout = max(0.05, timeout)
        for attempt in (0, 1):
            reused = self._conn is not None
            try:
                conn = self._conn or self._connect(timeout)
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                raise _NetworkError(
                    "TLS setup failed (CA bundle %s): %s" % (_ca_bundle(), exc), sent=False
                ) from None
            self._conn = conn
            sent = False
            try:
                conn.timeout = timeout
                if conn.sock is None:
                    conn.connect()
                    _no_delay(conn.sock)
                conn.sock.settimeout(timeout)
                conn.request(method, target, body=body, headers=hdrs)
                sent = True
                resp = conn.getresponse()
                data = resp.read()
                return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
            except (self._http.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as exc:
                self.close()
                if reused and attempt == 0 and not sent:
                    continue  # the server closed an idle keep-alive connection
                raise _NetworkError(_short_cause(exc), sent=sent) from None
            except Exception as exc:  # AttributeError: the socket was taken away by abort()
                self.close()
                raise _NetworkError(_short_cause(exc), sent=sent) from None
        raise _NetworkError("unreachable")  # pragma: no cover

    def abort(self) -> None:
        """From another thread: end a request that passed its overall deadline."""
        conn = self._conn
        sock = getattr(conn, "sock", None)
        if sock is not None:
            _shutdown_socket(sock)

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass


def _shutdown_socket(sock) -> None:
    import socket

    try:
        sock.shutdown(socket.SHUT_RDWR)
    except (OSError, AttributeError):
        pass


def _no_delay(sock) -> None:
    """http.client sends headers and body in separate writes: without this, Nagle's
    algorithm and delayed ACKs add ~40 ms to a request."""
    import socket

    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):
        pass


class _RequestsTransport:
    """The same interface on a ``requests.Session`` (proxies and NO_PROXY from the env).

    Redirects are not followed: a redirect can turn the POST into a GET that answers 200 and
    stores nothing, or carry the token to another host.
    """

    name = "requests"

    def __init__(self, base_url: str, token: str | None = None):
        import requests
        from urllib3 import Timeout, exceptions

        self._requests = requests
        self._timeout_cls = Timeout
        self._unsent = (exceptions.ConnectTimeoutError, exceptions.SSLError)  # NewConnectionError too
        self.base_url = base_url
        self._session = requests.Session()
        self._session.headers.update({"User-Agent": _USER_AGENT, "Accept": "application/json"})
        if token:
            self._session.headers["Authorization"] = "Bearer " + token
        self._verify = _ca_bundle() or True
        # Proxies come from _proxy_for, as for the stdlib transport: requests' own look-up
        # iterates os.environ, which raises when the program changes it meanwhile.
        self._session.trust_env = False
        from urllib.parse import urlsplit

        parts = urlsplit(base_url)
        proxy = _proxy_for(parts.scheme, parts.hostname or "")
        self._proxies = {parts.scheme: proxy} if proxy else {}
        self._sockets = weakref.WeakSet()
        adapter = _tracking_adapter(requests, self._sockets)
        if adapter is not None:
            self._session.mount("http://", adapter)
            self._session.mount("https://", adapter)
        self._adapter = self._session.get_adapter(base_url)
        self._routes = {}  # (method, path, content type) -> (urllib3 pool, its URL, headers)

    def _route(self, method: str, path: str, ctype):
        """Where a bytes body goes: the urllib3 pool that the session's adapter keeps for
        this URL, with its proxy and TLS settings (as HTTPAdapter.send would pick it), the
        URL to ask it for, and the session's headers merged once."""
        extra = {"Content-Type": ctype} if ctype else None
        prepared = self._session.prepare_request(
            self._requests.Request(method, self.base_url + path, headers=extra)
        )
        adapter = self._adapter
        if hasattr(adapter, "get_connection_with_tls_context"):  # requests >= 2.32.2
            pool = adapter.get_connection_with_tls_context(prepared, self._verify, self._proxies, None)
        else:
            pool = adapter.get_connection(prepared.url, self._proxies)
        adapter.cert_verify(pool, prepared.url, self._verify, None)
        return pool, adapter.request_url(prepared, self._proxies), dict(prepared.headers)

    def _send_bytes(self, method: str, path: str, body, headers, timeout: float):
        """A bytes body (every event request), straight to the adapter's urllib3 pool, the
        answer read in one piece. Session.request and HTTPAdapter.send would merge settings,
        run hooks, build a Response, read cookies and read the answer 10 KB at a time for
        each request: two thirds of the CPU that requests costs per request, and nothing
        this SDK uses (the settings are fixed, redirects are not followed, the server sets
        no cookies)."""
        ctype = headers.get("Content-Type") if headers else None
        key = (method, path, ctype)
        route = self._routes.get(key)
        if route is None:
            if len(self._routes) > 64:
                self._routes.clear()
            route = self._routes[key] = self._route(method, path, ctype)
        pool, url, merged = route
        merged = dict(merged)
        if body is not None:
            merged["Content-Length"] = str(len(body))
        resp = pool.urlopen(
            method,
            url,
            body=body,
            headers=merged,
            retries=False,
            redirect=False,
            assert_same_host=False,
            timeout=self._timeout_cls(connect=timeout, read=timeout),
            preload_content=True,
            decode_content=True,
        )
        return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.data

    def request(self, method: str, path: str, body=None, headers=None, timeout: float = 10.0):
        timeout = max(0.05, timeout)
        requests = self._requests
        if body is None or type(body) is bytes:
            try:
                return self._send_bytes(method, path, body, headers, timeout)
            except Exception as exc:  # urllib3's errors, or a fault inside the library
                self._routes.clear()  # a pool the adapter closed is looked up again
                text = str(exc)
                sent = not (
                    isinstance(exc, self._unsent) or "NewConnectionError" in text or "Failed to establish" in text
                )
                raise _NetworkError(_short_cause(exc), sent=sent) from None
        try:  # an upload's streamed multipart body
            resp = self._session.request(
                method,
                self.base_url + path,
                data=body,
                headers=headers,
                timeout=(timeout, timeout),
                verify=self._verify,
                allow_redirects=False,
                proxies=self._proxies,
            )
            data = resp.content
        except (requests.ConnectTimeout, requests.exceptions.SSLError) as exc:
            raise _NetworkError(_short_cause(exc), sent=False) from None
        except requests.ConnectionError as exc:
            text = str(exc)
            sent = not ("NewConnectionError" in text or "Failed to establish" in text)
            raise _NetworkError(_short_cause(exc), sent=sent) from None
        except requests.RequestException as exc:
            raise _NetworkError(_short_cause(exc)) from None
        except Exception as exc:  # a fault inside the library costs this request only
            raise _NetworkError(_short_cause(exc)) from None
        return resp.status_code, {k.lower(): v for k, v in resp.headers.items()}, data

    def abort(self) -> None:
        for sock in list(self._sockets):
            _shutdown_socket(sock)

    def close(self) -> None:
        self._routes.clear()
        try:
            self._session.close()
        except Exception:
            pass


def _tracking_adapter(requests, sockets):
    """An HTTPAdapter whose connections record their sockets, so abort() can end a request
    that a server dribbles out byte by byte (requests' timeouts are per read). None when
    urllib3's classes are not what we expect: then abort() does nothing."""
    try:
        from urllib3 import connection, connectionpool

        def tracked(base):
            class Tracked(base):
                def connect(self):
                    super().connect()
                    if getattr(self, "sock", None) is not None:
                        sockets.add(self.sock)

            return Tracked

        class Pool(connectionpool.HTTPConnectionPool):
            ConnectionCls = tracked(connection.HTTPConnection)

        class TLSPool(connectionpool.HTTPSConnectionPool):
            ConnectionCls = tracked(connection.HTTPSConnection)

        class Adapter(requests.adapters.HTTPAdapter):
            def init_poolmanager(self, *args, **kwargs):
                super().init_poolmanager(*args, **kwargs)
                self.poolmanager.pool_classes_by_scheme = {"http": Pool, "https": TLSPool}

        return Adapter()
    except Exception:
        return None


def _make_transport(base_url: str, token: str | None):
    choice = os.environ.get(ENV_TRANSPORT, "").strip().lower()
    if choice not in ("urllib", "stdlib", "http.client") and _imports["requests"] != "broken":
        try:
            return _RequestsTransport(base_url, token)
        except ImportError:
            if choice == "requests":
                _log_once(
                    "no-requests",
                    "warning",
                    "argus: %s=requests but requests is not importable; using the standard "
                    "library",
                    ENV_TRANSPORT,
                )
    return _StdlibTransport(base_url, token)


def _transport_name() -> str:
    choice = os.environ.get(ENV_TRANSPORT, "").strip().lower()
    if choice in ("urllib", "stdlib", "http.client"):
        return "urllib"
    import importlib.util

    return "requests" if importlib.util.find_spec("requests") else "urllib"


def _retry_after(headers: dict, default: float) -> float:
    raw = headers.get("retry-after")
    if not raw:
        return default
    try:
        seconds = float(raw)
    except ValueError:
        try:
            from email.utils import parsedate_to_datetime

            seconds = parsedate_to_datetime(raw).timestamp() - _now()
        except (TypeError, ValueError, IndexError):
            return default
    return min(max(seconds, 0.0), RETRY_AFTER_CAP_S)


def _random() -> float:
    """Uniform in [0, 1), from os.urandom: forked processes must not draw the same numbers."""
    return int.from_bytes(os.urandom(2), "big") / 65536.0


def _jitter(seconds: float) -> float:
    return seconds * (0.5 + int.from_bytes(os.urandom(2), "big") / 131070.0)


def _error_text(body: bytes) -> str:
    try:
        detail = _loads(body.decode("utf-8", "replace"))
        if isinstance(detail, dict) and "detail" in detail:
            return str(detail["detail"])
    except ValueError:
        pass
    return _truncate(body.decode("utf-8", "replace"), 300)


class _MultipartBody:
    """A multipart/form-data body streamed from the file: iterable, with a known length."""

    def __init__(self, path: str, fields: dict):
        self.boundary = "argus-%s" % os.urandom(12).hex()
        self.content_type = "multipart/form-data; boundary=" + self.boundary
        self._path = path
        filename = os.path.basename(path)
        for char in '"\r\n':
            filename = filename.replace(char, "_")
        head = []
        for name, value in fields.items():
            head.append(
                '--%s\r\nContent-Disposition: form-data; name="%s"\r\n\r\n%s\r\n'
                % (self.boundary, name, value)
            )
        head.append(
            '--%s\r\nContent-Disposition: form-data; name="file"; filename="%s"\r\n'
            "Content-Type: %s\r\n\r\n" % (self.boundary, filename, _mime_type(path))
        )
        self._head = "".join(head).encode("utf-8")
        self._tail = ("\r\n--%s--\r\n" % self.boundary).encode("ascii")
        self._length = len(self._head) + os.path.getsize(path) + len(self._tail)

    def __len__(self) -> int:
        return self._length

    def __iter__(self):
        yield self._head
        with open(self._path, "rb") as f:
            while True:
                chunk = f.read(1 << 16)
                if not chunk:
                    break
                yield chunk
        yield self._tail


def _mime_type(path: str) -> str:
    return {
        ".png": "image/png",
        ".jpg": "image/jpeg",
        ".jpeg": "image/jpeg",
        ".pdf": "application/pdf",
        ".svg": "image/svg+xml",
    }.get(os.path.splitext(path)[1].lower(), "application/octet-stream")


# ---------------------------------------------------------------------------------------
# Values and events
# ---------------------------------------------------------------------------------------

# Values of these exact types go onto the queue untouched; anything else is converted on
# the caller's thread (a tensor may change in place after the call).
_PLAIN_TYPES = frozenset((int, float, str, bool, type(None)))

_json_encode = None
_json_encode_chunks = None  # the C encoder itself, where there is one (see _dumps)


def _dumps(value) -> str:
    """Strict JSON (RFC 8259): raises ValueError on NaN/Infinity."""
    global _json_encode, _json_encode_chunks
    if _json_encode is None:
        import json

        try:  # the C encoder object is reusable: building it per call costs more than encoding
            from json.encoder import c_make_encoder, encode_basestring_ascii

            def refuse(obj):
                raise TypeError("%s is not JSON serializable" % type(obj).__name__)

            encoder = c_make_encoder(
                None, refuse, encode_basestring_ascii, None, ":", ",", False, False, False
            )

            def _json_encode(obj):
                return "".join(encoder(obj, 0))

            _json_encode_chunks = encoder

        except (ImportError, TypeError):  # no C accelerator (PyPy) or a changed signature
            _json_encode = json.JSONEncoder(allow_nan=False, separators=(",", ":")).encode
    return _json_encode(value)


def _loads(text):
    import json

    return json.loads(text)


def _truncate(text: str, limit: int = MAX_STRING_CHARS) -> str:
    if len(text) <= limit:
        return text
    return text[:limit] + "...[truncated %d chars]" % (len(text) - limit)


def _json_key(key) -> str:
    if isinstance(key, str):
        return key
    if key is None:
        return "null"
    if key is True or key is False:
        return "true" if key else "false"
    return str(key)


def _jsonable(value, _depth: int = 0):
    """Return a JSON-safe copy of ``value`` (non-finite floats are kept; see _encode_data).

    Never raises: a value whose own methods fail (``__str__``, ``__float__``, ``items()``...)
    becomes a ``<unconvertible ...>`` marker string, so the call that carries it returns and
    the rest of its event is still sent.
    """
    kind = type(value)
    if kind is str:
        return _truncate(value)
    if value is None or kind is bool or kind is float:
        return value
    if kind is int:
        return value if -_BIG_INT < value < _BIG_INT else _big_int(value)
    try:
        return _convert(value, _depth)
    except Exception as exc:  # a value whose own methods raise: RecursionError included
        return _unconvertible(value, exc)


def _convert(value, _depth: int):
    if _depth >= _MAX_DEPTH:
        return _short_repr(value)
    if isinstance(value, dict):
        return {_json_key(k): _jsonable(v, _depth + 1) for k, v in dict.items(value)}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, _depth + 1) for v in value]
    if isinstance(value, (set, frozenset)):
        items = [_jsonable(v, _depth + 1) for v in value]
        try:
            return sorted(items)
        except TypeError:
            return sorted(items, key=repr)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):  # IntEnum, IntFlag and other int subclasses
        return _jsonable(int.__index__(value), _depth)
    if isinstance(value, float):
        return float.__float__(value)  # the float's own value, whatever the subclass overrides
    if isinstance(value, str):
        return _truncate(str.__getitem__(value, slice(None)))  # its characters, not its __str__
    if isinstance(value, (bytes, bytearray)):
        return _truncate(bytes(value).decode("utf-8", "replace"))
    # numpy scalars, 0-d arrays and 0-d torch tensors: their own item(), no import needed.
    shape = getattr(value, "shape", None)
    if shape is not None and callable(getattr(value, "item", None)):
        try:
            if tuple(shape) == () or _size(value) == 1:
                return _jsonable(value.item(), _depth + 1)
            if callable(getattr(value, "tolist", None)) and _size(value) <= 10_000:
                return _jsonable(value.tolist(), _depth + 1)
        except Exception:
            pass
    if hasattr(value, "isoformat"):  # datetime, date, time
        try:
            return value.isoformat()
        except Exception:
            pass
    if hasattr(value, "__fspath__"):
        return os.fspath(value)
    if hasattr(value, "_value_"):  # Enum
        return _jsonable(value._value_, _depth + 1)
    if hasattr(value, "__float__") and not hasattr(value, "__len__"):  # Decimal, Fraction
        try:
            return float(value)
        except Exception:
            pass
    return _truncate(str(value))


# str(int) refuses more than 4,300 digits (Python 3.11+); such an int travels as a string.
_BIG_INT = 10**4000


def _big_int(value: int) -> str:
    return "<int of %d bits: 0x%s>" % (value.bit_length(), _truncate("%x" % value, 64))


def _short_repr(value) -> str:
    """A value nested deeper than _MAX_DEPTH: its repr, bounded, or a marker."""
    if isinstance(value, (dict, list, tuple, set, frozenset)):
        return "<%s nested deeper than %d levels>" % (type(value).__name__, _MAX_DEPTH)
    try:
        return _truncate(repr(value), 1000)
    except Exception as exc:
        return _unconvertible(value, exc)


def _unconvertible(value, exc) -> str:
    try:
        name = type(value).__name__
    except Exception:
        name = "object"
    return "<unconvertible %s: %s>" % (name, type(exc).__name__)


def _text(value) -> str:
    """``str(value)`` for log lines and reasons, never raising."""
    if type(value) is str:
        return value
    if isinstance(value, str):
        return str.__getitem__(value, slice(None))
    try:
        text = str(value)
        return text if type(text) is str else str.__getitem__(text, slice(None))
    except Exception as exc:
        return _unconvertible(value, exc)


def _dumps_safe(value) -> str:
    """Strict JSON of an already converted value; a value that still fails becomes a marker."""
    try:
        return _dumps(value)
    except Exception as exc:
        return _dumps(_unconvertible(value, exc))


def _size(value) -> int:
    size = getattr(value, "size", None)
    if callable(size):  # torch: .size() is the shape; numel() is the count
        numel = getattr(value, "numel", None)
        return int(numel()) if callable(numel) else -1
    return int(size) if size is not None else -1


_NONFINITE = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}


def _replace_nonfinite(value, path: str, found: dict):
    if type(value) is float and value - value != 0.0:  # NaN or +-Infinity
        found[path] = _NONFINITE[repr(value)]
        return None
    if isinstance(value, dict):
        return {
            k: _replace_nonfinite(v, "%s.%s" % (path, k) if path else k, found)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_replace_nonfinite(v, "%s[%d]" % (path, i), found) for i, v in enumerate(value)]
    return value


def _encode_data(data: dict) -> str:
    """Encode an event's data as strict JSON; never raises.

    A non-finite float travels as ``null`` in its place, and the event's data gains
    ``"nonfinite": {"<key path>": "NaN" | "Infinity" | "-Infinity"}`` so that nothing is lost.
    """
    try:
        text = _dumps(data)
    except ValueError:  # NaN/Infinity (or a huge int that skipped conversion)
        found = {}
        data = _replace_nonfinite(data, "", found)
        if found and isinstance(data, dict):
            data["nonfinite"] = found
        try:
            text = _dumps(data)
        except Exception:
            text = _dumps_safe(_jsonable(data))
    except Exception:  # a value that skipped conversion (RecursionError, TypeError...)
        text = _dumps_safe(_replace_nonfinite(_jsonable(data), "", {}))
    if len(text) > _MAX_EVENT_CHARS:
        text = _dumps_safe(_replace_nonfinite(_jsonable(data), "", {}))
    if not text.startswith("{"):  # data itself could not be encoded: keep a marker of it
        text = _dumps({"unencodable": _jsonable(_loads(text))})
    return text


def _meta_text(meta) -> str:
    """An artifact's ``meta`` as strict JSON: a non-finite float becomes null, as in events."""
    meta = _jsonable(meta)
    if isinstance(meta, dict):
        return _encode_data(meta)
    return _dumps(_replace_nonfinite(meta, "", {}))


_ids = []  # event ids made ahead, in bulk; emptied in a forked child
_ID_BULK = 1024
_ID_V4 = bytes((b & 0x0F) | 0x40 for b in range(256))  # byte 6: version 4
_ID_VARIANT = bytes((b & 0x3F) | 0x80 for b in range(256))  # byte 8: RFC 4122 variant


def _uuid4() -> str:
    """A random (version 4) UUID, as text, from a bulk of _ID_BULK made by _new_ids. A
    user's random.seed() cannot repeat them, and a forked child drops the parent's unused
    ones (see _after_fork_in_child)."""
    try:
        return _ids.pop()
    except IndexError:
        pass
    made = _new_ids(_ID_BULK)
    event_id = made.pop()
    _ids.extend(made)  # list.extend and list.pop are atomic: threads may share the bulk
    return event_id


def _new_ids(count: int) -> list:
    """``count`` random (version 4) UUIDs from os.urandom, with every step in C, a few
    passes over the whole bulk: the version and variant bits, the hex in groups of four
    digits, then the layout (a space after each id, and the three group breaks that a
    UUID does not have taken out). A fifteenth of ``str(uuid.uuid4())`` per id."""
    raw = bytearray(os.urandom(16 * count))
    raw[6::16] = raw[6::16].translate(_ID_V4)
    raw[8::16] = raw[8::16].translate(_ID_VARIANT)
    text = bytearray(raw.hex("-", 2).encode("ascii"))
    text.append(32)  # 40 characters an id: eight groups of four, each with a "-" after it
    text[39::40] = b" " * count
    del text[34::40]  # between groups 7 and 8, then 6 and 7, then 1 and 2
    del text[29::39]
    del text[4::38]
    return text.decode("ascii").split()


_RUN_MIN = 16  # _encode_batch: a batch of at least this many records tries _encode_run
_RECORD_TYPE = operator.itemgetter(0)  # a queued record's fields, for passes in C
_RECORD_BATCH = operator.itemgetter(1)
_RECORD_JOB = operator.itemgetter(2)
_RECORD_TS = operator.itemgetter(3)
_RECORD_DATA = operator.itemgetter(4)
_RECORD_ID = operator.itemgetter(6)  # a durable record's event id, drawn by the caller
_RECORD_ON_DISK = operator.itemgetter(7)  # ... and whether the journal has it
_NUMBER_TYPES = frozenset((int, float))
_chain = itertools.chain.from_iterable
_repeat = itertools.repeat
_THOUSAND = (1000.0).__mul__


def _stamps_of(records: list) -> list:
    """Each record's timestamp as _format_ts writes it, the text made once per millisecond."""
    times = list(map(int, map(_THOUSAND, map(_RECORD_TS, records))))
    texts = dict.fromkeys(times)
    for ms in texts:
        texts[ms] = _format_ms(ms)
    return list(map(texts.__getitem__, times))


_ts_cache = (-1, "", -1, "")  # (second, its prefix, millisecond, its stamp): replaced whole


def _format_ts(ts: float) -> str:
    """ISO 8601 UTC, fixed width with milliseconds: the server sorts timestamps as strings."""
    return _format_ms(int(ts * 1000))


def _format_ms(ms: int) -> str:
    """_format_ts of a time in whole milliseconds."""
    global _ts_cache
    cached_secs, prefix, cached_ms, stamp = _ts_cache
    if ms == cached_ms:  # a burst: many events inside one millisecond
        return stamp
    secs = ms // 1000
    if secs != cached_secs:
        t = time.gmtime(secs)
        prefix = "%04d-%02d-%02dT%02d:%02d:%02d" % (t[0], t[1], t[2], t[3], t[4], t[5])
    stamp = "%s.%03dZ" % (prefix, ms - secs * 1000)
    _ts_cache = (secs, prefix, ms, stamp)
    return stamp


def _reason(exc_type, exc) -> str:
    if exc_type is None:
        return "unknown"
    text = str(exc) if exc is not None else ""
    name = getattr(exc_type, "__name__", str(exc_type))
    return _truncate("%s: %s" % (name, text) if text else name, 2000)


def _process_command() -> str:
    """The real command line of this process (from /proc when available)."""
    args = None
    try:
        with open("/proc/self/cmdline", "rb") as f:
            raw = f.read().split(b"\0")
        args = [a.decode("utf-8", "replace") for a in raw if a] or None
    except OSError:
        pass
    if args is None:
        args = [os.path.basename(sys.executable or "python")] + list(sys.argv)
    import shlex

    return _truncate(" ".join(shlex.quote(a) for a in _scrub_args(args)), 4000)


def _scrub_args(args: list) -> list:
    """Hide secrets on a command line: values of secret-named options (``--token X``,
    ``--db-password=X``, ``--wandb-key X``, ``--auth X``, ``-p X``), passwords in URLs
    (``postgresql://alice:***@db``), ``em_live_`` tokens and the configured token itself."""
    out, hide_next = [], False
    for arg in args:
        if hide_next:
            out.append("***")
            hide_next = False
            continue
        name, eq, _value = arg.partition("=")
        if arg.startswith("-") and _is_secret_option(name):
            if eq:
                arg = name + "=***"
            else:
                hide_next = True
        elif eq and _is_secret_option(name):
            arg = name + "=***"
        out.append(_scrub_arg(arg))
    return out


def _is_secret_option(name: str) -> bool:
    import re

    if name in _SECRET_SHORT_OPTIONS:
        return True
    words = [w for w in re.split(r"[-_.]", name.lstrip("-").lower()) if w]
    if not words:
        return False
    return bool(set(words) & _SECRET_WORDS) or words[-1] in _SECRET_LAST_WORDS or "apikey" in words


def _scrub_arg(text: str) -> str:
    """Hide secrets inside one argument: URL passwords, em_live_ tokens, the configured tokens."""
    import re

    text = re.sub(r"([A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]+):[^/\s@]+@", r"\1:***@", text)
    text = re.sub(r"em_live_[A-Za-z0-9_-]+", "em_live_***", text)
    for secret in _known_secrets:
        if secret in text:
            text = text.replace(secret, "***")
    return text


_SECRET_WORDS = frozenset(("token", "password", "passwd", "secret", "credentials", "auth", "apikey"))
_SECRET_LAST_WORDS = frozenset(("key", "token", "secret", "pass", "pw", "pwd"))
_SECRET_SHORT_OPTIONS = frozenset(("-p",))
_known_secrets = set()  # tokens this process was configured with: never recorded anywhere
_is_secret_name = _is_secret_option  # the same rule for free text (tracebacks)


_SOURCE_CACHE = {}


def _host() -> str:
    try:
        return os.uname().nodename
    except AttributeError:  # Windows
        import socket

        return socket.gethostname()


def _user() -> str | None:
    for name in ("USER", "LOGNAME", "USERNAME"):
        if os.environ.get(name):
            return os.environ[name]
    try:
        import pwd

        return pwd.getpwuid(os.getuid()).pw_name
    except Exception:
        return None


def _git_commit(short: bool = True, timeout: float = 2.0) -> str | None:
    import subprocess

    cmd = ["git", "rev-parse", "--short", "HEAD"] if short else ["git", "rev-parse", "HEAD"]
    try:
        out = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and sha else None


def _detected_source() -> dict:
    """host/user/commit of this process, looked up once (the git call runs on the worker)."""
    if not _SOURCE_CACHE:
        _SOURCE_CACHE.update(host=_host(), user=_user(), commit=_git_commit())
    return _SOURCE_CACHE


# ---------------------------------------------------------------------------------------
# Process lifecycle: SIGTERM, fork, exit
# ---------------------------------------------------------------------------------------

_sigterm = {"previous": None, "pid": None}


def _install_sigterm() -> None:
    if not _env_flag(ENV_HANDLE_SIGTERM, True):
        return
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set from the main thread
    import signal

    try:
        current = signal.getsignal(signal.SIGTERM)
        if current is _on_sigterm:  # ours; in a forked child it now serves this process
            _sigterm["pid"] = os.getpid()
            return
        if current is signal.SIG_IGN or current is None:
            return  # ignored on purpose, or set outside Python: leave it
        signal.signal(signal.SIGTERM, _on_sigterm)
    except (ValueError, OSError, AttributeError):
        return
    _sigterm["previous"] = current
    _sigterm["pid"] = os.getpid()


def _uninstall_sigterm() -> None:
    if _active or _sigterm["pid"] != os.getpid():
        return
    if threading.current_thread() is not threading.main_thread():
        return
    import signal

    try:
        if signal.getsignal(signal.SIGTERM) is _on_sigterm:
            signal.signal(signal.SIGTERM, _sigterm["previous"])
    except (ValueError, OSError, TypeError):
        pass
    _sigterm["pid"] = None


_signals_waiting = []  # a SIGTERM that came while the main thread wrote a queue to disk


def _on_sigterm(signum, frame) -> None:
    import signal

    me = threading.get_ident()
    if any(sender.worker._journal_owner == me for sender in list(_live)):
        _signals_waiting[:] = [(signum, frame)]  # handled once that write is done
        return
    previous = _sigterm["previous"]
    if os.getpid() == _sigterm["pid"]:
        reason = "terminated by SIGTERM"
        if os.environ.get("SLURM_JOB_ID"):
            reason += " (SLURM job %s)" % os.environ["SLURM_JOB_ID"]
        _shutdown(reason)
    try:
        signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
    except (ValueError, OSError, TypeError):
        pass
    if callable(previous):
        previous(signum, frame)  # the program's own handler decides what happens next
    else:
        os.kill(os.getpid(), signum)  # end exactly as without us: status 143 / -15


def _shutdown(reason: str | None = None) -> None:
    """The one shutdown path of the process: SIGTERM, atexit and multiprocessing's exit.

    With a reason (a signal), the open jobs and batches of this process are marked failed;
    then every sender drains within its bound and saves the rest. Never raises.
    """
    if reason is not None:
        for reporter in reversed(list(_active)):
            try:
                reporter._terminate(reason)
            except Exception as exc:
                _log("error", "argus: could not record the end of batch %s: %r", reporter.batch_id, exc)
    for sender in list(_live):
        try:
            sender.close(_drain_s())
        except Exception as exc:
            _log("error", "argus: could not close the sender: %r", exc)


def _drain_s(explicit: float | None = None) -> float:
    """How long an exit may wait for delivery: the argument, ARGUS_DRAIN_S, else DRAIN_S."""
    if explicit is not None:
        return max(0.0, float(explicit))
    return max(0.0, _env_float(ENV_DRAIN_S, DRAIN_S))


def _after_fork_in_child() -> None:
    global _state_lock
    _state_lock = threading.Lock()
    _spill_counts.clear()  # the parent sums up its own spills
    _left_behind.clear()
    del _ids[:]  # the child must not draw the parent's unused event ids
    if _imports["requests"] == "importing":
        _imports["requests"] = "broken"  # half-imported in this child: use the stdlib transport
    for sender in list(_live):
        sender._after_fork()
    for reporter in _active:
        reporter._after_fork()
    util = sys.modules.get("multiprocessing.util")
    if util is not None:
        # A multiprocessing child clears its finalizers after this hook and then runs its
        # "after fork" callbacks: register ours from there.
        try:
            util.register_after_fork(_mp_hook, _mp_child_started)
        except Exception:
            pass


_imports = {"done": False, "requests": None}
_process_ready = {"pid": None}


def _prepare_process(url: str | None) -> None:
    """Once per process, on the thread that opens the first sender: import what the worker
    needs (a fork while a thread imports leaves the child a half-made module, so these are
    not left to the worker), install the fork hooks, and flush at multiprocessing's exit."""
    if _process_ready["pid"] == os.getpid():
        return
    _process_ready["pid"] = os.getpid()
    try:
        _dumps("")
        _loads("0")
        _uuid4()
        _logger()  # logging's own fork hooks are then registered before ours
        import http.client  # noqa: F401
        import socket  # noqa: F401
        import subprocess  # noqa: F401
        from urllib.parse import urlsplit  # noqa: F401

        "localhost".encode("idna")  # the codec the first connect looks up (encodings.idna)
        if url and url.lower().startswith("https"):
            import ssl  # noqa: F401
        _transport_name()  # importlib.util
        _user()  # pwd, where USER is not set
    except Exception:
        pass
    if hasattr(os, "register_at_fork") and not _imports["done"]:
        os.register_at_fork(after_in_child=_after_fork_in_child)
    _imports["done"] = True
    _register_mp_exit()


def _register_mp_exit() -> None:
    """A multiprocessing child started by fork ends with os._exit: no atexit. Its finalizers
    run, though, so the senders of such a child flush through one."""
    mp = sys.modules.get("multiprocessing")
    if mp is None:
        return
    try:
        if mp.parent_process() is not None:
            _mp_child_started(None)
    except Exception:
        pass


class _MPHook:
    """A weak-referenceable key for multiprocessing's after-fork registry."""


_mp_hook = _MPHook()
_mp_registered = {"pid": None}


def _mp_child_started(_obj) -> None:
    if _mp_registered["pid"] == os.getpid():
        return
    _mp_registered["pid"] = os.getpid()
    try:
        from multiprocessing import util

        util.Finalize(None, _shutdown, exitpriority=100)
    except Exception:
        pass


def _worker_imports(url: str | None) -> None:
    """On the worker: the slow optional import (requests) and the git lookup."""
    if _imports["requests"] is None and _transport_name() == "requests":
        _imports["requests"] = "importing"
        try:
            import requests  # noqa: F401
        except Exception:
            pass
        if _imports["requests"] == "importing":
            _imports["requests"] = "done"
    try:
        _detected_source()
    except Exception:
        pass


def _at_exit() -> None:
    """Bounded flush of every open sender for code that never closed its Reporter; then one
    line per spill directory that this run left events in, with what to do about them."""
    _shutdown(None)
    for directory in sorted(set(_spill_counts) | set(_left_behind)):
        spilled, dropped = _spill_counts.get(directory, (0, 0))
        left, lost = _left_behind.get(directory, (0, 0))
        dropped += lost
        if not left and not dropped:
            continue  # everything written there was delivered in the end (or durable journals)
        waiting = SpillStore(directory).backlog()["events"]
        message = "argus: %d event(s) could not be delivered during this run and were saved to %s" % (
            left,
            directory,
        )
        if waiting:
            message += "; %d wait there now" % waiting
            rate = _server_rate["events_per_s"]
            if rate:
                message += " (the server took %.0f events/s: about %.0f s of its work)" % (rate, waiting / rate)
            handed = _hand_off(directory) if _env_flag(ENV_SYNC_ON_EXIT) else None
            if handed:
                message += "; a detached `argus sync` (pid %d) sends them now, logging to %s" % handed
            else:
                message += (
                    ". They are sent at the next start, or now with `python3 -m argus sync --watch 30`"
                    " on a login node; %s=<seconds> waits longer at exit" % ENV_DRAIN_S
                )
        if dropped:
            message += "; %d could not be saved (spill cap or disk error)" % dropped
        _log("warning", message)


def _hand_off(directory: str):
    """Start `argus sync` in a process of its own that outlives this one; (pid, log) or None.

    A SLURM step kills every process it started when it ends, this one included: there the
    hand-off does not help, and `argus sync --watch` on a login node is the way.
    """
    url, token = _destinations.get(directory, (None, None))
    if not url:
        return None
    import subprocess

    log_path = os.path.join(directory, "sync-on-exit.log")
    env = dict(os.environ, **{ENV_URL: url, ENV_SPILL_DIR: directory})
    if token:
        env[ENV_TOKEN] = token
    try:
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "sync", "--watch", "5", "--until-empty", "--max-time", "3600"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
                start_new_session=True,
                close_fds=True,
            )
    except (OSError, ValueError) as exc:
        _log("warning", "argus: could not start a detached `argus sync`: %s", exc)
        return None
    return proc.pid, log_path


atexit.register(_at_exit)


# ---------------------------------------------------------------------------------------
# Resource sampling
# ---------------------------------------------------------------------------------------


def _num(text):
    text = text.strip()
    try:
        value = float(text)
    except ValueError:
        return None  # "[N/A]", "[Not Supported]"
    return int(value) if value.is_integer() else value


class _ResourceSampler:
    """System, process and GPU figures for ``resource_snapshot`` events.

    On Linux it reads ``proc_root`` (``/proc``; tests give a folder of fixed files) and needs
    no package; elsewhere it uses psutil when importable. GPUs come from pynvml when
    importable, else from ``nvidia-smi`` (looked up once, each call bounded by ``smi_timeout``).
    """

    def __init__(
        self,
        proc_root: str = "/proc",
        disk_path: str | None = None,
        nvidia_smi: str | None = "auto",
        clock=time.monotonic,
        smi_timeout: float = 2.0,
        use_pynvml: bool = True,
    ):
        import shutil

        self.proc_root = proc_root
        self.disk_path = disk_path or os.getcwd()
        self._clock = clock
        self._smi_timeout = smi_timeout
        self._has_proc = os.path.exists(os.path.join(proc_root, "stat"))
        self._psutil = None
        if not self._has_proc:
            try:
                import psutil

                self._psutil = psutil
                psutil.cpu_percent(None)
                self._ps_proc = psutil.Process()
                self._ps_proc.cpu_percent(None)
            except Exception:
                self._psutil = None
        self._nvml = None
        if use_pynvml and nvidia_smi == "auto":
            self._nvml = _init_nvml()
        self._smi = shutil.which("nvidia-smi") if nvidia_smi == "auto" else nvidia_smi
        self._gpu_failures = 0
        try:
            self._hz = os.sysconf("SC_CLK_TCK")
        except (AttributeError, ValueError, OSError):
            self._hz = 100
        self._prev_cpu = self._read_cpu()
        self._prev_proc = (self._read_proc_ticks(), clock())

    def _read(self, *parts) -> str | None:
        try:
            with open(os.path.join(self.proc_root, *parts)) as f:
                return f.read()
        except OSError:
            return None

    def _read_cpu(self):
        text = self._read("stat")
        if not text:
            return None
        fields = [int(x) for x in text.split("\n", 1)[0].split()[1:9]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    def _read_proc_ticks(self):
        text = self._read("self", "stat")
        if not text:
            return None
        fields = text.rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime

    def sample(self) -> dict:
        out = {}
        if self._has_proc:
            self._sample_proc(out)
        elif self._psutil is not None:
            self._sample_psutil(out)
        try:
            import shutil

            usage = shutil.disk_usage(self.disk_path)
            out["disk_free_mb"] = round(usage.free / 1048576.0, 1)
            out["disk_total_mb"] = round(usage.total / 1048576.0, 1)
        except OSError:
            pass
        self._sample_gpus(out)
        return out

    def _sample_proc(self, out: dict) -> None:
        cpu = self._read_cpu()
        if cpu and self._prev_cpu:
            total, idle = cpu[0] - self._prev_cpu[0], cpu[1] - self._prev_cpu[1]
            if total > 0:
                out["cpu_util_pct"] = round(100.0 * (total - idle) / total, 1)
        self._prev_cpu = cpu
        meminfo = {}
        for line in (self._read("meminfo") or "").splitlines():
            key, _, rest = line.partition(":")
            if rest.strip():
                meminfo[key] = int(rest.split()[0])  # kB
        if "MemTotal" in meminfo:
            out["ram_total_mb"] = round(meminfo["MemTotal"] / 1024.0, 1)
            if "MemAvailable" in meminfo:
                out["ram_mb"] = round((meminfo["MemTotal"] - meminfo["MemAvailable"]) / 1024.0, 1)
        ticks, now = self._read_proc_ticks(), self._clock()
        prev_ticks, prev_now = self._prev_proc
        if ticks is not None and prev_ticks is not None and now > prev_now:
            out["proc_cpu_pct"] = round(100.0 * (ticks - prev_ticks) / self._hz / (now - prev_now), 1)
        self._prev_proc = (ticks, now)
        for line in (self._read("self", "status") or "").splitlines():
            if line.startswith("VmRSS:"):
                out["proc_ram_mb"] = round(int(line.split()[1]) / 1024.0, 1)

    def _sample_psutil(self, out: dict) -> None:
        ps = self._psutil
        try:
            out["cpu_util_pct"] = round(ps.cpu_percent(None), 1)
            mem = ps.virtual_memory()
            out["ram_total_mb"] = round(mem.total / 1048576.0, 1)
            out["ram_mb"] = round((mem.total - mem.available) / 1048576.0, 1)
            out["proc_cpu_pct"] = round(self._ps_proc.cpu_percent(None), 1)
            out["proc_ram_mb"] = round(self._ps_proc.memory_info().rss / 1048576.0, 1)
        except Exception as exc:
            _log_once("psutil", "warning", "argus: psutil sampling failed: %r", exc)

    def _sample_gpus(self, out: dict) -> None:
        if self._nvml is None and not self._smi:
            return
        try:
            gpus = self._nvml_gpus() if self._nvml is not None else self._smi_gpus()
        except Exception as exc:
            self._gpu_failures += 1
            if self._gpu_failures >= 3:
                _log("warning", "argus: GPU sampling failed 3 times (%r); it is turned off", exc)
                self._nvml = self._smi = None
            return
        self._gpu_failures = 0
        if not gpus:
            return
        out["gpus"] = gpus
        first = _first_visible(gpus, os.environ.get("CUDA_VISIBLE_DEVICES"))
        if first is not None:
            for flat, key in (
                ("gpu_util_pct", "util_pct"),
                ("gpu_mem_mb", "mem_mb"),
                ("gpu_mem_total_mb", "mem_total_mb"),
                ("gpu_temp_c", "temp_c"),
                ("proc_gpu_mem_mb", "proc_mem_mb"),
            ):
                if first.get(key) is not None:
                    out[flat] = first[key]

    def _run_smi(self, query: str) -> list:
        import subprocess

        result = subprocess.run(
            [self._smi, query, "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=self._smi_timeout,
            stdin=subprocess.DEVNULL,
        )
        if result.returncode != 0:
            raise OSError("nvidia-smi exited with %d" % result.returncode)
        return [[p.strip() for p in line.split(",")] for line in result.stdout.splitlines() if line.strip()]

    def _smi_gpus(self) -> list:
        gpus = []
        for row in self._run_smi(
            "--query-gpu=index,uuid,name,utilization.gpu,memory.used,memory.total,temperature.gpu"
        ):
            if len(row) < 7:
                continue
            gpus.append(
                {
                    "index": _num(row[0]),
                    "uuid": row[1],
                    "name": row[2],
                    "util_pct": _num(row[3]),
                    "mem_mb": _num(row[4]),
                    "mem_total_mb": _num(row[5]),
                    "temp_c": _num(row[6]),
                    "proc_mem_mb": 0,
                }
            )
        pid = str(os.getpid())
        by_uuid = {g["uuid"]: g for g in gpus}
        for row in self._run_smi("--query-compute-apps=pid,gpu_uuid,used_memory"):
            if len(row) >= 3 and row[0] == pid and row[1] in by_uuid:
                by_uuid[row[1]]["proc_mem_mb"] += _num(row[2]) or 0
        return gpus

    def _nvml_gpus(self) -> list:
        nv = self._nvml
        pid = os.getpid()
        gpus = []
        for i in range(nv.nvmlDeviceGetCount()):
            h = nv.nvmlDeviceGetHandleByIndex(i)
            mem = nv.nvmlDeviceGetMemoryInfo(h)
            uuid = nv.nvmlDeviceGetUUID(h)
            name = nv.nvmlDeviceGetName(h)
            mine = 0
            try:
                for proc in nv.nvmlDeviceGetComputeRunningProcesses(h):
                    if proc.pid == pid and proc.usedGpuMemory:
                        mine += proc.usedGpuMemory // 1048576
            except Exception:
                pass
            gpus.append(
                {
                    "index": i,
                    "uuid": uuid.decode() if isinstance(uuid, bytes) else uuid,
                    "name": name.decode() if isinstance(name, bytes) else name,
                    "util_pct": nv.nvmlDeviceGetUtilizationRates(h).gpu,
                    "mem_mb": mem.used // 1048576,
                    "mem_total_mb": mem.total // 1048576,
                    "temp_c": nv.nvmlDeviceGetTemperature(h, 0),  # 0: NVML_TEMPERATURE_GPU
                    "proc_mem_mb": mine,
                }
            )
        return gpus


def _init_nvml():
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception:
        return None


def _first_visible(gpus: list, visible: str | None):
    """The device that CUDA calls 0: the first entry of CUDA_VISIBLE_DEVICES, by index or UUID."""
    if visible is None:
        return gpus[0]
    for token in visible.split(","):
        token = token.strip()
        if not token or token.startswith("-"):
            return None  # "" or "-1": no device is visible
        for gpu in gpus:
            if token.isdigit() and gpu["index"] == int(token):
                return gpu
            if not token.isdigit() and str(gpu["uuid"]).startswith(token):
                return gpu
        return None
    return None


# ---------------------------------------------------------------------------------------
# Framework integrations (lazy)
# ---------------------------------------------------------------------------------------
# `argus.integrations.lightning`, `.keras` and `.hydra` are module objects put into
# sys.modules when argus is imported, the way six registers `six.moves`: the import system
# finds them there, so `import argus.integrations.hydra`, `from argus.integrations.keras
# import ArgusCallback` and Hydra's `_target_: argus.integrations.hydra.ArgusCallback` work
# although argus is a single file. Each module builds its ArgusCallback on first access and
# only then imports its framework; `import argus` imports none.

# name: (the framework as users know it, the pip extra that installs it)
_INTEGRATIONS = {
    "lightning": ("Lightning", "lightning"),
    "keras": ("Keras", "keras"),
    "hydra": ("Hydra", "hydra"),
}


def _missing_framework(name: str) -> ImportError:
    framework, extra = _INTEGRATIONS[name]
    return ImportError(
        "%s.integrations.%s needs %s: pip install 'argus-reporter[%s]'"
        % (__name__, name, framework, extra)
    )


def _as_float(value):
    """A float from a number, a numpy scalar or a one-element tensor; None for anything else."""
    if value is None or isinstance(value, (bool, str, bytes)):
        return None
    for name in ("item", "numpy"):  # tensors and numpy scalars; TF variables
        method = getattr(value, name, None)
        if callable(method) and not isinstance(value, (int, float)):
            try:
                value = method()
            except Exception:
                return None
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        return None


def _keys(value, name: str) -> tuple:
    """A tuple of metric names; one string is one name, not its characters."""
    if isinstance(value, str):
        return (value,)
    try:
        keys = tuple(value)
    except TypeError:
        keys = None
    if keys is None or not all(isinstance(k, str) for k in keys):
        raise TypeError("%s must be a tuple of metric names, e.g. ('val_loss',); got %r" % (name, value))
    return keys


def _first_float(values, keys):
    """The first of ``keys`` present in ``values`` with a numeric value, as (key, float)."""
    for key in keys:
        if key in values:
            number = _as_float(values[key])
            if number is not None:
                return key, number
    return None, None


def _integration_hook(method):
    """Log a failure inside a framework hook instead of raising it into training."""

    def hook(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:
            _log(
                "warning",
                "argus: %s.%s failed, training goes on: %r",
                type(self).__name__,
                method.__name__,
                exc,
            )
            return None

    hook.__name__ = method.__name__
    hook.__qualname__ = method.__qualname__
    hook.__doc__ = method.__doc__
    return hook


class _TrainingRun:
    """One batch holding one job, opened and closed from a framework's separate hooks.

    The callbacks drive Reporter and JobContext through ``__enter__``/``__exit__`` because
    a training run starts in one hook and ends in another. If the process ends while the
    job is open (an exception escaped ``fit()`` and nobody reported it), an atexit handler
    closes it as failed, with the uncaught exception when Python recorded one.
    """

    def __init__(
        self,
        *,
        project,
        job_id,
        argus_url,
        token,
        model,
        dataset,
        experiment_type,
        batch_prefix,
        heartbeat,
        stop_polling,
        resource_snapshot,
        auto_upload_dirs,
    ):
        # Mistakes in how a callback is built raise here, before training starts.
        if not isinstance(project, str) or not project:
            raise TypeError(
                "project must be a non-empty string, e.g. ArgusCallback(project='my-paper', ...)"
            )
        _check_job_id(job_id)
        if not isinstance(batch_prefix, str) or not batch_prefix:
            raise TypeError("batch_prefix must be a non-empty string; got %r" % (batch_prefix,))
        _interval(heartbeat, DEFAULT_HEARTBEAT_S, "heartbeat")
        _interval(stop_polling, DEFAULT_STOP_POLL_S, "stop_polling")
        _interval(resource_snapshot, DEFAULT_RESOURCE_S, "resource_snapshot")
        if isinstance(auto_upload_dirs, (str, bytes)) or hasattr(auto_upload_dirs, "__fspath__"):
            auto_upload_dirs = [auto_upload_dirs]
        self.project = project
        self.job_id = job_id
        self.model = model
        self.dataset = dataset
        self._reporter_kwargs = dict(
            experiment_type=experiment_type,
            source_project=project,
            n_total=1,
            heartbeat=heartbeat,
            stop_polling=stop_polling,
            resource_snapshot=resource_snapshot,
            monitor_url=argus_url,
            token=token,
            auto_upload_dirs=[os.fspath(d) for d in auto_upload_dirs] if auto_upload_dirs else None,
        )
        self.batch_prefix = batch_prefix
        self.polls_stop = bool(stop_polling)
        self.reporter = None
        self.job = None
        self.ended = False  # a run was started and has ended
        self.stop_logged = False

    def __getstate__(self):
        # Pickled with its callback (ddp_spawn, joblib): the open run stays in this process.
        state = self.__dict__.copy()
        state.update(reporter=None, job=None)
        return state

    @property
    def active(self) -> bool:
        return self.job is not None

    @property
    def stopped(self) -> bool:
        return self.reporter is not None and self.reporter.stopped

    def start(self, model=None) -> None:
        if self.job is not None:
            self.fail(RuntimeError("a new training run started before this one ended"))
        reporter = Reporter(self.batch_prefix, **self._reporter_kwargs)
        reporter.__enter__()
        try:
            job = reporter.job(self.job_id, model=self.model or model, dataset=self.dataset)
            job.__enter__()
        except BaseException as exc:
            reporter.__exit__(type(exc), exc, exc.__traceback__)
            raise
        self.reporter, self.job = reporter, job
        self.stop_logged = False
        atexit.register(self._close_at_exit)

    def epoch(self, epoch, **values) -> None:
        if self.job is not None:
            self.job.epoch(epoch, **values)

    def log(self, message: str, level: str = "INFO") -> None:
        if self.job is not None:
            self.job.log(message, level)

    def finish(self, metrics=None) -> None:
        """``job_done`` then ``batch_done``."""
        job, reporter = self._take()
        if job is None:
            return
        try:
            if metrics:
                job.metrics(metrics)
        finally:
            job.__exit__(None, None, None)
            reporter.__exit__(None, None, None)

    def fail(self, exc: BaseException) -> None:
        """``job_failed`` then ``batch_failed``, with the exception's type and message."""
        job, reporter = self._take()
        if job is None:
            return
        tb = getattr(exc, "__traceback__", None)
        try:
            job.__exit__(type(exc), exc, tb)
        finally:
            reporter.__exit__(type(exc), exc, tb)

    def _take(self):
        job, reporter = self.job, self.reporter
        self.job = self.reporter = None
        if job is not None:
            self.ended = True
            atexit.unregister(self._close_at_exit)
        return job, reporter

    def _close_at_exit(self) -> None:
        # Python records an uncaught exception in sys.last_exc (3.12+) / sys.last_value
        # before it runs atexit handlers.
        exc = getattr(sys, "last_exc", None) or getattr(sys, "last_value", None)
        if not isinstance(exc, BaseException):
            exc = RuntimeError("the process ended before training reported its end")
        try:
            self.fail(exc)
        except Exception as error:
            _log("warning", "argus: could not close the open job at exit: %r", error)

    def request_stop_once(self, framework_call: str) -> None:
        if not self.stop_logged:
            self.stop_logged = True
            self.log("Stop requested in Argus: %s" % framework_call, "WARNING")


def _callback_init(framework: str, train_loss_keys: tuple, val_loss_keys: tuple) -> type:
    """The constructor that the Lightning and Keras ArgusCallback share: a base class put
    before the framework's Callback, whose ``__init__`` (with this framework's defaults) is
    the callback's signature. It builds the _TrainingRun, checks the metric keys, and resets
    the callback's per-run state with its ``_reset_epoch_state()``."""
    default_train_loss_keys, default_val_loss_keys = train_loss_keys, val_loss_keys

    class _ArgusCallbackInit:
        def __init__(
            self,
            *,
            project: str,
            job_id: str,
            argus_url: str | None = None,
            token: str | None = None,
            model: str | None = None,
            dataset: str | None = None,
            experiment_type: str = framework,
            batch_prefix: str = framework,
            train_loss_keys=default_train_loss_keys,
            val_loss_keys=default_val_loss_keys,
            final_metric_keys=(),
            heartbeat: bool | float = False,
            stop_polling: bool | float = False,
            resource_snapshot: bool | float = False,
            auto_upload_dirs=None,
        ):
            super().__init__()
            self._run = _TrainingRun(
                project=project,
                job_id=job_id,
                argus_url=argus_url,
                token=token,
                model=model,
                dataset=dataset,
                experiment_type=experiment_type,
                batch_prefix=batch_prefix,
                heartbeat=heartbeat,
                stop_polling=stop_polling,
                resource_snapshot=resource_snapshot,
                auto_upload_dirs=auto_upload_dirs,
            )
            self.train_loss_keys = _keys(train_loss_keys, "train_loss_keys")
            self.val_loss_keys = _keys(val_loss_keys, "val_loss_keys")
            self.final_metric_keys = _keys(final_metric_keys, "final_metric_keys")
            self._reset_epoch_state()

    # A wrong keyword's TypeError names the function by this (not _callback_init.<locals>...)
    _ArgusCallbackInit.__init__.__qualname__ = "ArgusCallback.__init__"
    return _ArgusCallbackInit


def _build_lightning_callback():
    import importlib

    # `lightning.pytorch` and `pytorch_lightning` are two packages with distinct Callback
    # classes, and each Trainer accepts only its own: derive from every one installed so
    # that one class works with both.
    bases, errors = [], []
    for name in ("lightning.pytorch", "pytorch_lightning"):
        try:
            bases.append(importlib.import_module(name).Callback)
        except Exception as exc:  # one broken package must not hide the other
            errors.append(exc)
    if not bases:
        if all(isinstance(exc, ImportError) for exc in errors):
            raise _missing_framework("lightning") from errors[0]
        raise errors[-1]

    class ArgusCallback(
        _callback_init("lightning", ("train_loss_epoch", "train_loss", "loss"), ("val_loss_epoch", "val_loss")),
        *bases,
    ):
        """Report a Lightning ``Trainer.fit`` to Argus as one batch holding one job.

        ``on_train_start`` sends ``batch_start`` and ``job_start``; each epoch sends one
        ``job_epoch`` with the train loss, the validation loss of that epoch (when
        validation ran) and the first optimizer's learning rate at the epoch's start;
        ``on_train_end`` sends ``job_done`` (``final_metric_keys`` read from
        ``trainer.callback_metrics``) and ``batch_done``; ``on_exception`` sends
        ``job_failed`` and ``batch_failed``. Only global rank 0 reports. With
        ``stop_polling`` the Argus Stop button sets ``trainer.should_stop``.
        """

        def _reset_epoch_state(self) -> None:
            self._pending_epoch = None  # ended, not yet sent
            self._val_epoch = None  # the epoch during which validation last ran
            self._epoch_lr = None

        @_integration_hook
        def on_train_start(self, trainer, pl_module) -> None:
            if getattr(trainer, "global_rank", 0) != 0:
                return
            self._reset_epoch_state()
            self._run.start(model=type(pl_module).__name__)

        # An epoch is sent when the next one starts (or training ends): by then Lightning
        # has run validation, the LightningModule's own epoch-end hooks and what they log,
        # which a callback's on_train_epoch_end runs before. The learning rate is read when
        # the epoch starts, before an epoch-interval scheduler steps at its end.
        @_integration_hook
        def on_train_epoch_start(self, trainer, pl_module) -> None:
            if self._run.active:
                self._send_epoch(trainer)
                self._epoch_lr = self._first_lr(trainer)

        @_integration_hook
        def on_validation_epoch_end(self, trainer, pl_module) -> None:
            if self._run.active and not trainer.sanity_checking:
                self._val_epoch = trainer.current_epoch

        @_integration_hook
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            # One process: stop at once. Several: on_train_epoch_end decides for all ranks.
            if self._run.polls_stop and getattr(trainer, "world_size", 1) == 1 and self._run.stopped:
                self._stop(trainer)

        @_integration_hook
        def on_train_epoch_end(self, trainer, pl_module) -> None:
            if self._run.active:
                self._pending_epoch = trainer.current_epoch
            if self._run.polls_stop and getattr(trainer, "world_size", 1) > 1:
                # Every rank must take part, or rank 0 would stop alone and the others hang.
                try:
                    stop = trainer.strategy.reduce_boolean_decision(self._run.stopped, all=False)
                except TypeError:  # Lightning before 1.9 has no `all`
                    stop = trainer.strategy.reduce_boolean_decision(self._run.stopped)
                if stop:
                    self._stop(trainer)
            elif self._run.polls_stop and self._run.stopped:
                self._stop(trainer)

        @_integration_hook
        def on_train_end(self, trainer, pl_module) -> None:
            if not self._run.active:
                return
            self._send_epoch(trainer)
            metrics = {}
            for key in self.final_metric_keys:
                value = _as_float(trainer.callback_metrics.get(key))
                if value is not None:
                    metrics[key] = value
            self._run.finish(metrics)

        @_integration_hook
        def on_exception(self, trainer, pl_module, exception) -> None:
            if getattr(trainer, "global_rank", 0) != 0:
                return
            if self._run.active:
                self._send_epoch(trainer)
            elif self._run.ended or getattr(trainer.state, "fn", None) != "fit":
                return  # after this callback's run ended, or in validate/test/predict
            else:  # fit failed before on_train_start (setup, sanity check): still report it
                self._run.start(model=type(pl_module).__name__)
            self._run.fail(exception)

        def _send_epoch(self, trainer) -> None:
            epoch, self._pending_epoch = self._pending_epoch, None
            if epoch is None:
                return
            metrics = trainer.callback_metrics
            train_loss = _first_float(metrics, self.train_loss_keys)[1]
            val_loss = _first_float(metrics, self.val_loss_keys)[1] if self._val_epoch == epoch else None
            self._run.epoch(epoch, train_loss=train_loss, val_loss=val_loss, lr=self._epoch_lr)

        @staticmethod
        def _first_lr(trainer):
            try:
                return _as_float(trainer.optimizers[0].param_groups[0]["lr"])
            except (AttributeError, IndexError, KeyError, TypeError):
                return None

        def _stop(self, trainer) -> None:
            if not trainer.should_stop:
                trainer.should_stop = True
                self._run.request_stop_once("trainer.should_stop = True")

    return ArgusCallback


def _build_keras_callback():
    try:
        import keras  # Keras 3 (or the Keras 2 that TensorFlow <= 2.15 installs)

        base = keras.callbacks.Callback
    except ImportError:
        try:
            from tensorflow import keras
        except ImportError as exc:
            raise _missing_framework("keras") from exc
        base = keras.callbacks.Callback

    def learning_rate(model):
        optimizer = getattr(model, "optimizer", None)
        lr = getattr(optimizer, "learning_rate", None)
        if lr is None:
            lr = getattr(optimizer, "lr", None)
        value = _as_float(lr)
        if value is None and callable(lr):  # tf.keras 2 returns the schedule itself
            try:
                value = _as_float(lr(optimizer.iterations))
            except Exception:
                return None
        return value

    # The keyword arguments of JobContext.epoch: a log entry of the same name can't be extra.
    reserved = frozenset(("epoch", "train_loss", "val_loss", "lr", "batch_time_ms"))

    class ArgusCallback(_callback_init("keras", ("loss",), ("val_loss",)), base):
        """Report a Keras ``model.fit`` to Argus as one batch holding one job.

        ``on_train_begin`` sends ``batch_start`` and ``job_start``; ``on_epoch_end`` sends one
        ``job_epoch`` with ``loss``, ``val_loss``, the learning rate at the epoch's first
        batch and every other numeric entry of ``logs``; ``on_train_end`` sends ``job_done``
        and ``batch_done``. Keras has no failure hook: call ``report_failure(exc)`` when
        ``fit()`` raises; if you don't, the job is closed as failed when the process ends.
        With ``stop_polling`` the Argus Stop button sets ``model.stop_training``.
        """

        def _reset_epoch_state(self) -> None:
            self._epoch_lr = None
            self._lr_due = False
            self._last_logs = {}

        @_integration_hook
        def on_train_begin(self, logs=None) -> None:
            self._last_logs = {}
            name = getattr(self.model, "name", None) or type(self.model).__name__
            self._run.start(model=name)

        @_integration_hook
        def on_epoch_begin(self, epoch, logs=None) -> None:
            self._lr_due = True

        # The learning rate is read at the epoch's first batch: after every on_epoch_begin
        # (LearningRateScheduler sets it there), before a schedule moves it on.
        @_integration_hook
        def on_train_batch_begin(self, batch, logs=None) -> None:
            if self._lr_due:
                self._lr_due = False
                self._epoch_lr = learning_rate(self.model)

        @_integration_hook
        def on_train_batch_end(self, batch, logs=None) -> None:
            if self._run.polls_stop and self._run.stopped:
                self._stop()

        @_integration_hook
        def on_epoch_end(self, epoch, logs=None) -> None:
            if not self._run.active:
                return
            logs = dict(logs or {})
            self._last_logs = logs
            train_key, train_loss = _first_float(logs, self.train_loss_keys)
            val_key, val_loss = _first_float(logs, self.val_loss_keys)
            lr = self._epoch_lr if not self._lr_due else None
            if lr is None:
                lr = learning_rate(self.model)
            if lr is None:
                lr = _first_float(logs, ("learning_rate", "lr"))[1]
            extra = {}
            for key, value in logs.items():
                number = _as_float(value)
                if number is not None and key not in (train_key, val_key) and key not in reserved:
                    extra[str(key)] = number
            self._epoch_lr = None
            self._run.epoch(epoch, train_loss=train_loss, val_loss=val_loss, lr=lr, **extra)
            if self._run.polls_stop and self._run.stopped:
                self._stop()

        @_integration_hook
        def on_train_end(self, logs=None) -> None:
            logs = logs or self._last_logs
            metrics = {}
            for key in self.final_metric_keys:
                value = _as_float(logs.get(key))
                if value is not None:
                    metrics[key] = value
            self._run.finish(metrics)

        def report_failure(self, exc: BaseException) -> None:
            """Close the job and the batch as failed: call it when ``fit()`` raised.

            ::

                try:
                    model.fit(x, y, callbacks=[cb])
                except Exception as exc:
                    cb.report_failure(exc)
                    raise
            """
            try:
                if not self._run.active:
                    if self._run.ended:
                        return  # this run already ended; the failure came after it
                    self._run.start(model=getattr(self.model, "name", None))
                self._run.fail(exc)
            except Exception as error:
                _log("warning", "argus: report_failure failed: %r", error)

        def _stop(self) -> None:
            if not getattr(self.model, "stop_training", False):
                self.model.stop_training = True
                self._run.request_stop_once("model.stop_training = True")

    return ArgusCallback


def _hydra_sweep_size(config):
    """The number of jobs of a multirun when the sweeper makes it knowable, else None."""
    from omegaconf import OmegaConf

    sweeper = OmegaConf.select(config, "hydra.sweeper")
    if sweeper is None:
        return None
    n_trials = OmegaConf.select(sweeper, "n_trials")  # the Optuna sweeper
    if isinstance(n_trials, int) and not isinstance(n_trials, bool):
        return n_trials
    if not str(OmegaConf.select(sweeper, "_target_") or "").endswith(".BasicSweeper"):
        return None
    # What BasicSweeper.sweep() does, without launching: the cartesian product of the
    # sweeper's params and the command line's overrides.
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = OmegaConf.select(sweeper, "params") or {}
    arguments = ["%s=%s" % (k, v) for k, v in params.items()]
    arguments += list(OmegaConf.to_container(config.hydra.overrides.task, resolve=False))
    overrides = OverridesParser.create().parse_overrides(arguments)
    return sum(len(chunk) for chunk in BasicSweeper.split_arguments(overrides, None))


def _build_hydra_callback():
    try:
        from hydra.experimental.callback import Callback
        from omegaconf import OmegaConf
    except ImportError as exc:
        raise _missing_framework("hydra") from exc

    def job_metrics(value) -> dict:
        """The numbers a task function returned, as job metrics."""
        number = _as_float(value)
        if number is not None:
            return {"return_value": number}
        try:
            items = value.items()
        except Exception:
            return {}
        metrics = {}
        for key, item in items:
            number = _as_float(item)
            if number is not None:
                metrics[str(key)] = number
        return metrics

    class ArgusCallback(Callback):
        """Report a Hydra run or multirun to Argus: one batch, one job per Hydra job.

        Enable it in the primary config::

            hydra:
              callbacks:
                argus:
                  _target_: argus.integrations.hydra.ArgusCallback
                  project: my-paper

        ``python main.py`` makes one batch with one job; ``python main.py -m a=1,2,3`` one
        batch with three jobs, ``n_total`` set from the sweep. A job's id is the config value
        at ``job_id_key``, else ``job_id_template.format(**scalar_fields, job_num=N)``, else
        the Hydra job number. A job whose task function raised is sent as ``job_failed``.
        While the batch is open ``argus.get_batch_id()`` and ``argus.emit(...)`` work inside
        the task function, and child processes inherit ``ARGUS_BATCH_ID``.
        """

        def __init__(
            self,
            *,
            project: str,
            experiment_type: str = "hydra",
            argus_url: str | None = None,
            token: str | None = None,
            batch_prefix: str = "hydra",
            job_id_key: str | None = None,
            job_id_template: str | None = None,
            heartbeat: bool | float = False,
            stop_polling: bool | float = False,
            resource_snapshot: bool | float = False,
            auto_upload_dirs=None,
        ):
            if not isinstance(project, str) or not project:
                raise TypeError("project must be a non-empty string, e.g. project: my-paper")
            if not isinstance(batch_prefix, str) or not batch_prefix:
                raise TypeError("batch_prefix must be a non-empty string; got %r" % (batch_prefix,))
            for name, value in (("job_id_key", job_id_key), ("job_id_template", job_id_template)):
                if value is not None and not isinstance(value, str):
                    raise TypeError("%s must be a string; got %r" % (name, value))
            _interval(heartbeat, DEFAULT_HEARTBEAT_S, "heartbeat")
            _interval(stop_polling, DEFAULT_STOP_POLL_S, "stop_polling")
            _interval(resource_snapshot, DEFAULT_RESOURCE_S, "resource_snapshot")
            if isinstance(auto_upload_dirs, (str, bytes)) or hasattr(auto_upload_dirs, "__fspath__"):
                auto_upload_dirs = [auto_upload_dirs]
            self.project = project
            self.argus_url = argus_url
            self.token = token
            self.job_id_key = job_id_key
            self.job_id_template = job_id_template
            self._batch_prefix = batch_prefix
            self._reporter_kwargs = dict(
                experiment_type=experiment_type,
                source_project=project,
                heartbeat=heartbeat,
                stop_polling=stop_polling,
                resource_snapshot=resource_snapshot,
                monitor_url=argus_url,
                token=token,
                # Hydra hands lists over as ListConfig
                auto_upload_dirs=[str(d) for d in auto_upload_dirs] if auto_upload_dirs else None,
            )
            self._reporter = None
            self._job = None
            self._remote = None  # (sender, job_id, t0) for a job launched in another process
            self._batch_id = None
            self._pid = None
            self._failure = None  # the first failed job's exception
            self._batch_per_job = False

        def __getstate__(self):
            # Launchers that run jobs in other processes (joblib, submitit) pickle the
            # callbacks: the batch stays here, its id travels.
            state = self.__dict__.copy()
            state.update(_reporter=None, _job=None, _remote=None)
            return state

        @_integration_hook
        def on_run_start(self, config, **kwargs) -> None:
            self._open(n_total=1)

        @_integration_hook
        def on_multirun_start(self, config, **kwargs) -> None:
            try:
                n_total = _hydra_sweep_size(config)
            except Exception as exc:
                _log("info", "argus: the size of this sweep is not known (%r)", exc)
                n_total = None
            self._open(n_total=n_total)

        @_integration_hook
        def on_job_start(self, config, **kwargs) -> None:
            job_id = self._job_id(config)
            overrides = OmegaConf.select(config, "hydra.overrides.task")
            line = "hydra overrides: %s" % " ".join(str(o) for o in overrides) if overrides else None
            if self._reporter is None and self._batch_id is not None and os.getpid() != self._pid:
                self._start_remote_job(job_id, line)
                return
            if self._reporter is None:  # a job without a run or multirun around it
                self._open(n_total=1)
                self._batch_per_job = True
            job = self._reporter.job(job_id)
            job.__enter__()
            self._job = job
            if line:
                job.log(line)

        @_integration_hook
        def on_job_end(self, config, job_return, **kwargs) -> None:
            failed = getattr(getattr(job_return, "status", None), "name", None) == "FAILED"
            if failed:
                # job_return.return_value would print the error and raise it again.
                exc = getattr(job_return, "_return_value", None)
                if not isinstance(exc, BaseException):
                    exc = RuntimeError("the Hydra job failed")
                if self._failure is None:
                    self._failure = exc
                metrics = {}
            else:
                exc = None
                metrics = job_metrics(getattr(job_return, "_return_value", None))
            if self._remote is not None:
                self._end_remote_job(exc, metrics)
                return
            job, self._job = self._job, None
            if job is None:
                return
            if metrics:
                job.metrics(metrics)
            if exc is None:
                job.__exit__(None, None, None)
            else:
                job.__exit__(type(exc), exc, exc.__traceback__)
            if self._batch_per_job:
                self._close(exc)

        @_integration_hook
        def on_run_end(self, config, job_return=None, **kwargs) -> None:
            self._close(self._failure)

        @_integration_hook
        def on_multirun_end(self, config, **kwargs) -> None:
            # Reached only when every job was launched; the batch's n_failed says how they went.
            self._close(None)

        def _open(self, n_total) -> None:
            if self._reporter is not None:
                return
            reporter = Reporter(self._batch_prefix, n_total=n_total, **self._reporter_kwargs)
            reporter.__enter__()  # publishes the batch id for emit() and child processes
            self._reporter, self._batch_id, self._pid = reporter, reporter.batch_id, os.getpid()
            self._failure = None
            self._batch_per_job = False
            atexit.register(self._close_at_exit)

        def _close(self, exc) -> None:
            reporter, self._reporter = self._reporter, None
            job, self._job = self._job, None
            if reporter is None:
                return
            atexit.unregister(self._close_at_exit)
            if job is not None:
                job_exc = exc or RuntimeError("Hydra ended before the job reported its end")
                job.__exit__(type(job_exc), job_exc, job_exc.__traceback__)
            if exc is None:
                reporter.__exit__(None, None, None)
            else:
                reporter.__exit__(type(exc), exc, exc.__traceback__)

        def _close_at_exit(self) -> None:
            # A failed job makes the sweeper raise once its launch returns, so
            # on_multirun_end never comes. The batch fails with the first failed job's
            # exception, known here when jobs ran in this process.
            exc = self._failure or getattr(sys, "last_exc", None) or getattr(sys, "last_value", None)
            if not isinstance(exc, BaseException):
                exc = RuntimeError("Hydra ended before the end of the run: a job or the sweeper raised")
            try:
                self._close(exc)
            except Exception as error:
                _log("warning", "argus: could not close the open batch at exit: %r", error)

        def _job_id(self, config) -> str:
            num = OmegaConf.select(config, "hydra.job.num", default=None)
            num = 0 if num is None else num  # RUN mode leaves it unset
            job_id = None
            try:
                if self.job_id_key:
                    value = OmegaConf.select(config, self.job_id_key, default=None)
                    job_id = None if value is None else str(value)
                elif self.job_id_template:
                    fields = {}
                    for key in config:
                        if key == "hydra":
                            continue
                        try:
                            value = config[key]
                        except Exception:  # ??? or a failing interpolation
                            continue
                        if value is None or isinstance(value, (str, int, float, bool)):
                            fields[str(key)] = value
                    fields["job_num"] = num
                    job_id = self.job_id_template.format(**fields)
            except Exception as exc:
                _log("warning", "argus: no job id from the config (%r); using job number %s", exc, num)
            return (job_id or str(num))[:256]

        # A launcher that runs the job in another process (joblib, submitit) calls
        # on_job_start/on_job_end there, on an unpickled copy: the job reports into the
        # batch opened by the launching process, through a sender of its own.
        def _start_remote_job(self, job_id, line) -> None:
            set_batch_id(self._batch_id)  # emit() and sub_env() in the task, as in-process
            os.environ.setdefault("ARGUS_PROJECT", self.project)
            os.environ["ARGUS_JOB_ID"] = job_id
            sender = ExperimentReporter(
                self.argus_url, self.project, auth_token=self.token, batch_id=self._batch_id
            )
            sender.job_start(job_id)
            if line:
                sender.log_line(job_id, line)
            self._remote = (sender, job_id, _mono())

        def _end_remote_job(self, exc, metrics) -> None:
            (sender, job_id, t0), self._remote = self._remote, None
            os.environ.pop("ARGUS_JOB_ID", None)
            elapsed = round(_mono() - t0, 3)
            if exc is None:
                sender.job_done(job_id, metrics=metrics or None, elapsed_s=elapsed)
            else:
                _send_traceback(sender, job_id, exc)
                sender.job_failed(job_id, reason=_reason(type(exc), exc), elapsed_s=elapsed)
            sender.close(_drain_s())

    return ArgusCallback


# The Python that imports argus as a module gives its __spec__ a ModuleSpec: reuse the class
# rather than import importlib at import time (`python argus.py` has none).
_ModuleSpec = type(__spec__) if __spec__ is not None else None


class _IntegrationModule(type(sys)):  # type(sys) is types.ModuleType, without importing types
    """``argus.integrations`` or one of its modules; ``ArgusCallback`` is built on first access."""

    def __init__(self, name: str, doc: str, builder=None):
        super().__init__(name, doc)
        self.__spec__ = _ModuleSpec(name, None) if _ModuleSpec is not None else None
        self._builder = builder
        self._build_lock = threading.Lock()
        if builder is not None:
            self.__all__ = ["ArgusCallback"]

    def __getattr__(self, name: str):
        if name == "ArgusCallback" and self._builder is not None:
            with self._build_lock:
                cls = self.__dict__.get("ArgusCallback")
                if cls is None:
                    cls = self._builder()  # ImportError naming the extra when the framework is missing
                    cls.__module__ = self.__name__  # pickle finds it again by this path
                    cls.__qualname__ = "ArgusCallback"
                    self.ArgusCallback = cls
            return cls
        raise AttributeError("module %r has no attribute %r" % (self.__name__, name))

    def __dir__(self):
        names = set(super().__dir__())
        if self._builder is not None:
            names.add("ArgusCallback")
        return sorted(names)


def _register_integrations() -> _IntegrationModule:
    package = _IntegrationModule(
        __name__ + ".integrations",
        "Callbacks for Lightning, Keras and Hydra; each framework is imported on first use.",
    )
    builders = {
        "lightning": _build_lightning_callback,
        "keras": _build_keras_callback,
        "hydra": _build_hydra_callback,
    }
    for name, builder in builders.items():
        module = _IntegrationModule(
            "%s.%s" % (package.__name__, name),
            "ArgusCallback for %s (pip install 'argus-reporter[%s]')." % _INTEGRATIONS[name],
            builder,
        )
        setattr(package, name, module)
        sys.modules[module.__name__] = module
    sys.modules[package.__name__] = package
    return package


integrations = _register_integrations()


# ---------------------------------------------------------------------------------------
# Local collector (`argus serve`, `argus demo`)
# ---------------------------------------------------------------------------------------
# A small Argus-compatible server for trying the SDK and for users' tests. It answers the
# way the real server does (spec/PROTOCOL.md) and keeps its state in one SQLite database.
# It is not an Argus replacement: no web UI, no rate limits, no read-only tokens.

_COLLECTOR_MAX_JSON_BYTES = 16 * 1024 * 1024  # larger ingest bodies are answered 413
_COLLECTOR_FORM_OVERHEAD = 64 * 1024  # room in an upload body for part headers, label, meta
_COLLECTOR_IDLE_TIMEOUT_S = 60  # an idle keep-alive connection is closed after this

_COLLECTOR_EVENT_TYPES = frozenset(EVENT_TYPES + _SERVER_EXTRA_TYPES)
_COLLECTOR_REQUIRED_KEYS = ("event_id", "schema_version", "event_type", "timestamp",
                            "batch_id", "source")
_COLLECTOR_ENVELOPE_KEYS = frozenset(_COLLECTOR_REQUIRED_KEYS + ("job_id", "data"))
_COLLECTOR_UUID = r"[0-9a-fA-F]{8}-?(?:[0-9a-fA-F]{4}-?){3}[0-9a-fA-F]{12}"
_COLLECTOR_TIMESTAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:?\d\d)"

# (method, path pattern, _Collector method). A private method takes the request and answers
# (status, payload); a public one is a read helper whose ids start with a known batch id.
# Patterns stay strings: `re` caches them on first use, so `import argus` compiles none.
_COLLECTOR_ROUTES = (
    ("POST", r"/api/events", "_post_event"),
    ("POST", r"/api/events/batch", "_post_event_batch"),
    ("GET", r"/api/stats", "stats"),
    ("GET", r"/api/batches", "batches"),
    ("GET", r"/api/batches/([^/]+)", "batch"),
    ("GET", r"/api/batches/([^/]+)/jobs", "jobs"),
    ("GET", r"/api/batches/([^/]+)/jobs/([^/]+)/epochs", "epochs"),
    ("GET", r"/api/batches/([^/]+)/artifacts", "artifacts"),
    ("POST", r"/api/batches/([^/]+)/artifacts", "_post_batch_artifact"),
    ("GET", r"/api/batches/([^/]+)/stop-requested", "_get_stop"),
    ("POST", r"/api/batches/([^/]+)/stop", "_post_stop"),
    ("POST", r"/api/jobs/([^/]+)/artifacts", "_post_job_artifact"),
)

_COLLECTOR_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY, event_id TEXT NOT NULL UNIQUE, event_type TEXT NOT NULL,
    batch_id TEXT NOT NULL, job_id TEXT, timestamp TEXT NOT NULL, raw TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS batches (
    batch_id TEXT PRIMARY KEY, status TEXT NOT NULL, experiment_type TEXT, n_total INTEGER,
    project TEXT, command TEXT, started_at TEXT, ended_at TEXT, reason TEXT, env TEXT,
    stop_requested_at TEXT, stop_requested_by TEXT);
CREATE TABLE IF NOT EXISTS jobs (
    batch_id TEXT NOT NULL, job_id TEXT NOT NULL, status TEXT NOT NULL, model TEXT,
    dataset TEXT, metrics TEXT, elapsed_s REAL, train_epochs INTEGER, reason TEXT,
    started_at TEXT, ended_at TEXT, start_event INTEGER, PRIMARY KEY (batch_id, job_id));
CREATE TABLE IF NOT EXISTS epochs (
    batch_id TEXT, job_id TEXT, epoch INTEGER, train_loss REAL, val_loss REAL, lr REAL,
    data TEXT, timestamp TEXT);
CREATE TABLE IF NOT EXISTS logs (
    batch_id TEXT, job_id TEXT, level TEXT, line TEXT, timestamp TEXT);
CREATE TABLE IF NOT EXISTS resources (batch_id TEXT, job_id TEXT, data TEXT, timestamp TEXT);
CREATE TABLE IF NOT EXISTS artifacts (
    id INTEGER PRIMARY KEY, batch_id TEXT NOT NULL, job_id TEXT, filename TEXT NOT NULL,
    size INTEGER NOT NULL, label TEXT, meta TEXT, path TEXT NOT NULL);
"""
_COLLECTOR_JSON_COLUMNS = frozenset(("env", "metrics", "data", "meta"))
_COLLECTOR_JOB_COLUMNS = ("batch_id, job_id, status, model, dataset, metrics, elapsed_s, "
                          "train_epochs, reason, started_at, ended_at")


class _CollectorError(Exception):
    """An error answer: the HTTP status and the `detail` the real server would send."""

    def __init__(self, status: int, detail: str, headers: dict | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers or {}


def _reject_json_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def _collector_json(raw: bytes, what: str = "body") -> object:
    """Parse strict JSON (RFC 8259) as the real server does, or answer 422."""
    try:
        value = _json_module().loads(raw.decode("utf-8"), parse_constant=_reject_json_constant)
        # "\ud800" parses, but SQLite cannot store a lone surrogate: refuse it here.
        _json_module().dumps(value, ensure_ascii=False).encode("utf-8")
    except (UnicodeError, ValueError) as exc:
        raise _CollectorError(422, f"{what} is not valid JSON: {exc}") from None
    return value


def _check_ingest_event(event: object) -> None:
    """Raise the answer the real server gives to an event it refuses."""
    if not isinstance(event, dict):
        raise _CollectorError(422, "an event must be a JSON object")
    missing = [key for key in _COLLECTOR_REQUIRED_KEYS if key not in event]
    if missing:
        raise _CollectorError(422, f"missing keys: {', '.join(missing)}")
    extra = sorted(set(event) - _COLLECTOR_ENVELOPE_KEYS)
    if extra:
        raise _CollectorError(422, f"unknown keys: {', '.join(extra)}")
    if event["schema_version"] != SCHEMA_VERSION:
        raise _CollectorError(415, f"unsupported schema_version {event['schema_version']!r}; "
                                   f"this server speaks {SCHEMA_VERSION!r}")
    event_type, event_id = event["event_type"], event["event_id"]
    if not isinstance(event_type, str) or event_type not in _COLLECTOR_EVENT_TYPES:
        raise _CollectorError(422, f"unknown event_type {event_type!r}")
    if not isinstance(event_id, str) or not _re_module().fullmatch(_COLLECTOR_UUID, event_id):
        raise _CollectorError(422, "event_id must be a UUID")
    timestamp = event["timestamp"]
    if not isinstance(timestamp, str) or not _re_module().fullmatch(_COLLECTOR_TIMESTAMP, timestamp):
        raise _CollectorError(422, "timestamp must be ISO 8601, e.g. 2026-04-23T09:23:06.123Z")
    batch_id, job_id = event["batch_id"], event.get("job_id")
    if not isinstance(batch_id, str) or not 1 <= len(batch_id) <= 128:
        raise _CollectorError(422, "batch_id must be a string of 1 to 128 characters")
    if job_id is not None and (not isinstance(job_id, str) or len(job_id) > 256):
        raise _CollectorError(422, "job_id must be null or a string of at most 256 characters")
    source = event["source"]
    if not isinstance(source, dict) or "project" not in source:
        raise _CollectorError(422, "source must be an object with a project")
    bad = sorted(k for k, v in source.items()
                 if k not in _SOURCE_KEYS or not isinstance(v, str))
    if bad:
        raise _CollectorError(422, f"source keys unknown or not strings: {', '.join(bad)}")
    if not isinstance(event.get("data", {}), dict):
        raise _CollectorError(422, "data must be a JSON object")
    if event_type in _JOB_EVENT_TYPES and not job_id:
        raise _CollectorError(400, f"{event_type} requires a job_id")


def _sql_value(value: object) -> object:
    """A value SQLite can bind: strings and 64-bit numbers as they are, the rest as JSON."""
    if value is None or isinstance(value, (str, float)):
        return value
    if isinstance(value, int) and -(2**63) <= value < 2**63:
        return value
    return _json_module().dumps(value)


def _safe_name(name: str, default: str) -> str:
    """One harmless path segment: no separators, no leading dots, no odd characters."""
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    return _re_module().sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".")[:200] or default


def _parse_multipart(body: bytes, content_type: str) -> dict:
    """The parts of a multipart/form-data body: {name: (filename or None, content)}."""
    boundary = _re_module().search(r'boundary="?([^";]+)"?', content_type)
    if not content_type.lower().startswith("multipart/form-data") or not boundary:
        raise _CollectorError(422, "expected a multipart/form-data body")
    parts = {}
    # A delimiter is CRLF "--" boundary; the first one may open the body without the CRLF.
    chunks = (b"\r\n" + body).split(b"\r\n--" + boundary.group(1).encode("latin-1"))
    for chunk in chunks[1:]:
        if chunk.startswith(b"--"):  # the closing delimiter
            break
        head, blank_line, content = chunk.partition(b"\r\n\r\n")
        name = _re_module().search(rb'\bname="([^"]*)"', head)
        if not blank_line or not name:
            raise _CollectorError(422, "malformed multipart part")
        filename = _re_module().search(rb'\bfilename="([^"]*)"', head)
        parts[name.group(1).decode("utf-8", "replace")] = (
            filename.group(1).decode("utf-8", "replace") if filename else None, content)
    return parts


def _collector_route(method: str, path: str) -> tuple | _CollectorError:
    """(method name, URL-decoded ids) for a request, or the 404/405 error to answer."""
    from urllib.parse import unquote

    path_known = False
    for route_method, pattern, name in _COLLECTOR_ROUTES:
        match = _re_module().fullmatch(pattern, path)
        if match and route_method == method:
            return name, [unquote(part) for part in match.groups()]
        path_known = path_known or bool(match)
    if path_known:
        return _CollectorError(405, "Method Not Allowed")
    return _CollectorError(404, "Not Found")


def _collector_http_server(collector: _Collector, address: tuple):
    """Build the threading HTTP server; http.server is imported only when one is needed."""
    import socketserver
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, which the SDK's connection reuse expects
        server_version = "argus-collector"
        # Headers and body leave in two writes: without TCP_NODELAY the body waits for the
        # client's delayed ACK, 40 ms per response on Linux.
        disable_nagle_algorithm = True
        timeout = _COLLECTOR_IDLE_TIMEOUT_S
        # Protocol-level errors (a garbled request line, PATCH…) answer JSON too. `explain`
        # comes from http.server's fixed table, so it needs no JSON escaping.
        error_message_format = '{"detail": "%(explain)s"}'
        error_content_type = "application/json"

        def setup(self) -> None:
            super().setup()
            with collector._lock:
                collector._connections.add(self.connection)

        def finish(self) -> None:
            with collector._lock:
                collector._connections.discard(self.connection)
            super().finish()

        def log_message(self, format: str, *args: object) -> None:
            if collector.verbose:
                super().log_message(format, *args)

        def _dispatch(self) -> None:
            path = self.path.split("?", 1)[0]
            route = _collector_route(self.command, path)
            limit = _COLLECTOR_MAX_JSON_BYTES
            if path.endswith("/artifacts"):
                limit = ARTIFACT_MAX_BYTES + _COLLECTOR_FORM_OVERHEAD
            extra = {}  # response headers of an error answer (Retry-After)
            try:
                self.body = self._read_body(limit)  # first, so that keep-alive survives errors
                if isinstance(route, _CollectorError):
                    raise route
                collector._authorize(self.headers.get("Authorization"))
                collector._rate_check(self.headers.get("Authorization") or "")
                if self.body is None:
                    raise _CollectorError(413, "Request body too large")
                name, ids = route
                if name.startswith("_"):
                    status, payload = getattr(collector, name)(self, *ids)
                else:
                    if ids:
                        collector._known_batch(ids[0])
                    status, payload = 200, getattr(collector, name)(*ids)
            except _CollectorError as exc:
                status, payload, extra = exc.status, {"detail": exc.detail}, exc.headers
            except Exception as exc:  # noqa: BLE001 - a bug must cost one request, not the server
                status, payload = 500, {"detail": f"internal error: {exc!r}"}
            body = _json_module().dumps(payload).encode("utf-8")
            self.send_response(status)
            for name, value in extra.items():
                self.send_header(name, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)

        def _read_body(self, limit: int) -> bytes | None:
            """The body, or None when it is over `limit`: then it is read and dropped, so
            the client gets the 413 instead of a connection reset while it is sending."""
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                self.close_connection = True
                raise _CollectorError(411, "Content-Length required")
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if length < 0:
                self.close_connection = True
                raise _CollectorError(400, "invalid Content-Length")
            if length <= limit:
                return self.rfile.read(length)
            while length > 0:
                chunk = self.rfile.read(min(length, 1 << 20))
                if not chunk:
                    break
                length -= len(chunk)
            return None

        do_GET = do_POST = do_PUT = do_DELETE = _dispatch

    class Server(ThreadingHTTPServer):
        daemon_threads = True

        def server_bind(self) -> None:
            # HTTPServer.server_bind looks up the host's FQDN, which hangs where DNS is broken.
            socketserver.TCPServer.server_bind(self)
            self.server_name, self.server_port = self.server_address[:2]

        def handle_error(self, request: object, client_address: object) -> None:
            if collector.verbose:  # mostly clients that hung up
                super().handle_error(request, client_address)

    return Server(address, Handler)


class _Collector:
    """A local Argus-compatible server: the ingest, stop and artifact routes over SQLite.

    `with _Collector() as collector:` serves on a free port from a background thread; give
    `collector.url` to the SDK. `serve_forever()` serves in the foreground (`argus serve`).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, db: str = ":memory:",
                 artifacts_dir: str | None = None, token: str | None = None,
                 verbose: bool = False, event_ms: float = 0.0,
                 rate_limit: tuple | None = None) -> None:
        try:
            import sqlite3
        except ImportError:  # some cluster builds of Python lack it
            raise RuntimeError("the local collector needs the sqlite3 module, which this "
                               "Python was built without") from None

        self.host, self.port = host, port
        self.token = token
        self.verbose = verbose
        # Like the real server under load (to try delivery against it): each event costs
        # event_ms of one writer for all requests, and each token has a request budget of
        # rate_limit = (burst, per second), answered 429 with Retry-After beyond it.
        self.event_s = max(0.0, float(event_ms)) / 1000.0
        self.rate_limit = rate_limit
        self._buckets = {}  # token -> (requests left, monotonic time)
        self._artifacts_dir = artifacts_dir
        self._lock = threading.Lock()  # guards the connection below and _connections
        # isolation_level=None: we issue BEGIN/COMMIT ourselves (one per request).
        self._db = sqlite3.connect(db, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.executescript(_COLLECTOR_SCHEMA)
        self._server = None
        self._serve_thread = None
        self._connections = set()  # open client sockets, shut by stop()

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host
        return f"http://{host}:{self.port}"

    @property
    def artifacts_dir(self) -> str:
        """Where uploads are written; a new temporary folder unless one was given."""
        with self._lock:
            if self._artifacts_dir is None:
                import tempfile

                self._artifacts_dir = tempfile.mkdtemp(prefix="argus-artifacts-")
            return self._artifacts_dir

    def start(self) -> _Collector:
        """Serve from a background daemon thread; returns self once the port is bound."""
        server = self._bind()
        self._serve_thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.1},
            name="argus-collector", daemon=True)
        self._serve_thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve from the calling thread until stop() or Ctrl-C."""
        server = self._bind()
        self._serve_thread = threading.current_thread()
        try:
            server.serve_forever(poll_interval=0.5)
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()

    def stop(self) -> None:
        """Stop serving and cut open connections; the database stays readable."""
        import socket

        server, self._server = self._server, None
        if server is None:
            return
        if self._serve_thread not in (None, threading.current_thread()):
            server.shutdown()  # returns within one poll interval of serve_forever
            self._serve_thread.join(timeout=5)
        server.server_close()
        with self._lock:
            connections = list(self._connections)
        for connection in connections:  # keep-alive clients must notice the server is gone
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self) -> _Collector:  # noqa: PYI034 - typing.Self is 3.11+
        return self if self._server is not None else self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _bind(self):
        if self._server is not None:
            raise RuntimeError("the collector is already serving")
        self._server = _collector_http_server(self, (self.host, self.port))
        self.port = self._server.server_address[1]
        return self._server

    # -- State, for the demo and for tests ------------------------------------------------

    def request_stop(self, batch_id: str, requested_by: str = "local") -> bool:
        """Ask a batch to stop, as the web UI's Stop button does; False if it is unknown."""
        with self._lock:
            cursor = self._db.execute(
                "UPDATE batches SET stop_requested_at = COALESCE(stop_requested_at, ?),"
                " stop_requested_by = COALESCE(stop_requested_by, ?) WHERE batch_id = ?",
                (_format_ts(_now()), requested_by, batch_id))
        return cursor.rowcount > 0

    def batches(self) -> list:
        return self._rows("SELECT * FROM batches ORDER BY started_at, batch_id")

    def batch(self, batch_id: str) -> dict | None:
        rows = self._rows("SELECT * FROM batches WHERE batch_id = ?", batch_id)
        return rows[0] if rows else None

    def jobs(self, batch_id: str) -> list:
        return self._rows(f"SELECT {_COLLECTOR_JOB_COLUMNS} FROM jobs WHERE batch_id = ?"
                          " ORDER BY rowid", batch_id)

    def epochs(self, batch_id: str, job_id: str) -> list:
        return self._rows("SELECT * FROM epochs WHERE batch_id = ? AND job_id = ?"
                          " ORDER BY epoch, rowid", batch_id, job_id)

    def artifacts(self, batch_id: str) -> list:
        return self._rows("SELECT * FROM artifacts WHERE batch_id = ? ORDER BY id", batch_id)

    def event_count(self, batch_id: str | None = None) -> int:
        """Events stored, all of them or one batch's."""
        if batch_id is None:
            return self.stats()["events"]
        return self._rows("SELECT COUNT(*) AS n FROM events WHERE batch_id = ?", batch_id)[0]["n"]

    def stats(self) -> dict:
        tables = ("events", "batches", "jobs", "epochs", "logs", "resources", "artifacts")
        counts = self._rows("SELECT " + ", ".join(f"(SELECT COUNT(*) FROM {table}) AS {table}"
                                                  for table in tables))[0]
        counts["resource_snapshots"] = counts.pop("resources")
        return counts

    def _rows(self, sql: str, *params: object) -> list:
        """The rows as plain dicts, with their JSON columns decoded."""
        with self._lock:
            rows = [dict(row) for row in self._db.execute(sql, params).fetchall()]
        for row in rows:
            for key in _COLLECTOR_JSON_COLUMNS.intersection(row):
                if row[key] is not None:
                    row[key] = _json_module().loads(row[key])
        return rows

    # -- Ingest ----------------------------------------------------------------------------

    def _authorize(self, header: str | None) -> None:
        import hmac

        if self.token is None:
            return
        scheme, _, credential = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not credential.strip():
            raise _CollectorError(401, "Authentication required")
        if not hmac.compare_digest(credential.strip().encode(), self.token.encode()):
            raise _CollectorError(401, "Invalid or expired API token")

    def _rate_check(self, header: str) -> None:
        if not self.rate_limit:
            return
        import math

        burst, per_s = self.rate_limit
        now = time.monotonic()
        with self._lock:
            left, then = self._buckets.get(header, (float(burst), now))
            left = min(float(burst), left + (now - then) * per_s)
            if left >= 1.0:
                self._buckets[header] = (left - 1.0, now)
                return
            self._buckets[header] = (left, now)
        wait = max(1, int(math.ceil((1.0 - left) / per_s))) if per_s > 0 else 60
        raise _CollectorError(429, "Rate limit exceeded", {"Retry-After": str(wait)})

    def _post_event(self, request) -> tuple:
        event = _collector_json(request.body)
        _check_ingest_event(event)
        db_id, outcome = self._store_all([event])[0]
        if db_id is None:
            raise _CollectorError(500, outcome)
        return 200, {"accepted": True, "event_id": db_id, "deduplicated": outcome}

    def _post_event_batch(self, request) -> tuple:
        body = _collector_json(request.body)
        events = body.get("events") if isinstance(body, dict) else None
        if not isinstance(events, list) or not 1 <= len(events) <= MAX_BATCH_EVENTS:
            raise _CollectorError(422, f"events must be a list of 1 to {MAX_BATCH_EVENTS}")
        for event in events:  # one bad event refuses the whole request, as upstream
            _check_ingest_event(event)
        results = []
        for event, (db_id, outcome) in zip(events, self._store_all(events)):
            status = "rejected" if db_id is None else "deduplicated" if outcome else "accepted"
            results.append({"event_id": event["event_id"], "status": status, "db_id": db_id,
                            "error": outcome if db_id is None else None})
        rejected = sum(result["status"] == "rejected" for result in results)
        return 200, {"accepted": len(results) - rejected, "rejected": rejected,
                     "results": results}

    def _store_all(self, events: list) -> list:
        """Store valid events in one transaction: [(db id, deduplicated) or (None, error)].

        A failing event is rolled back alone; its error starts with "internal", which tells
        the SDK to retry it later."""
        outcomes = []
        with self._lock:
            self._db.execute("BEGIN")
            try:
                for event in events:
                    if self.event_s:
                        time.sleep(self.event_s)  # one writer, one commit per event, as upstream
                    self._db.execute("SAVEPOINT event")
                    try:
                        outcomes.append(self._store(event))
                    except Exception as exc:  # noqa: BLE001 - any fault here is the server's
                        self._db.execute("ROLLBACK TO event")
                        outcomes.append((None, f"internal error: {exc!r}"))
                    self._db.execute("RELEASE event")
            finally:
                self._db.execute("COMMIT")
        return outcomes

    def _store(self, event: dict) -> tuple:
        db = self._db
        known = db.execute("SELECT id FROM events WHERE event_id = ?",
                           (event["event_id"],)).fetchone()
        if known:  # the payload of a repeated event_id is thrown away, as upstream
            return known[0], True
        kind, batch_id, job_id = event["event_type"], event["batch_id"], event.get("job_id")
        timestamp, data = event["timestamp"], event.get("data") or {}
        db_id = db.execute(
            "INSERT INTO events (event_id, event_type, batch_id, job_id, timestamp, raw)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (event["event_id"], kind, batch_id, job_id, timestamp, _json_module().dumps(event))).lastrowid
        # Any event makes its batch (and job) known, whatever order the events arrive in.
        db.execute("INSERT OR IGNORE INTO batches (batch_id, status, started_at)"
                   " VALUES (?, 'RUNNING', ?)", (batch_id, timestamp))
        if job_id:
            db.execute("INSERT OR IGNORE INTO jobs (batch_id, job_id, status)"
                       " VALUES (?, ?, 'RUNNING')", (batch_id, job_id))
        keys = (batch_id, job_id)
        if kind == "batch_start":
            # A second batch_start is a resume: fresh metadata, the first start time, and
            # a finished batch stays finished (its status is left alone).
            db.execute(
                "UPDATE batches SET experiment_type = ?, n_total = ?, project = ?, command = ?,"
                " started_at = MIN(started_at, ?) WHERE batch_id = ?",
                (_sql_value(data.get("experiment_type")), _sql_value(data.get("n_total_jobs")),
                 event["source"]["project"], _sql_value(data.get("command")), timestamp,
                 batch_id))
        elif kind in ("batch_done", "batch_failed"):
            status = "DONE" if kind == "batch_done" else "FAILED"
            db.execute("UPDATE batches SET status = ?, ended_at = ?, reason = ? WHERE batch_id = ?",
                       (status, timestamp, _sql_value(data.get("error", data.get("reason"))), batch_id))
        elif kind == "env_snapshot":  # the first one wins, as upstream
            db.execute("UPDATE batches SET env = ? WHERE batch_id = ? AND env IS NULL",
                       (_json_module().dumps(data), batch_id))
        elif kind == "job_start":  # a job started again (a resumed batch) is running again
            db.execute(
                "UPDATE jobs SET status = 'RUNNING', model = ?, dataset = ?, started_at = ?,"
                " ended_at = NULL, reason = NULL, start_event = ?"
                " WHERE batch_id = ? AND job_id = ?",
                (_sql_value(data.get("model")), _sql_value(data.get("dataset")), timestamp,
                 db_id) + keys)
        elif kind in ("job_done", "job_failed"):
            metrics = _json_module().dumps(data["metrics"]) if "metrics" in data else None
            db.execute(
                "UPDATE jobs SET status = ?, metrics = ?, elapsed_s = ?, train_epochs = ?,"
                " reason = ?, ended_at = ? WHERE batch_id = ? AND job_id = ?",
                ("DONE" if kind == "job_done" else "FAILED", metrics,
                 _sql_value(data.get("elapsed_s")), _sql_value(data.get("train_epochs")),
                 _sql_value(data.get("error", data.get("reason"))), timestamp) + keys)
        elif kind == "job_epoch":
            db.execute("INSERT INTO epochs VALUES (?, ?, ?, ?, ?, ?, ?, ?)", keys + tuple(
                _sql_value(data.get(key)) for key in ("epoch", "train_loss", "val_loss", "lr")
            ) + (_json_module().dumps(data), timestamp))
        elif kind == "log_line":
            db.execute("INSERT INTO logs VALUES (?, ?, ?, ?, ?)", keys + (
                _sql_value(data.get("level")), _sql_value(data.get("line")), timestamp))
        elif kind == "resource_snapshot":
            db.execute("INSERT INTO resources VALUES (?, ?, ?, ?)",
                       keys + (_json_module().dumps(data), timestamp))
        return db_id, False

    # -- Stop requests and artifacts --------------------------------------------------------

    def _known_batch(self, batch_id: str) -> dict:
        batch = self.batch(batch_id)
        if batch is None:
            raise _CollectorError(404, "batch not found")
        return batch

    def _get_stop(self, request, batch_id: str) -> tuple:
        batch = self._known_batch(batch_id)
        return 200, {"requested": batch["stop_requested_at"] is not None,
                     "requested_at": batch["stop_requested_at"],
                     "requested_by": batch["stop_requested_by"]}

    def _post_stop(self, request, batch_id: str) -> tuple:
        if not self.request_stop(batch_id, requested_by="api"):
            raise _CollectorError(404, "batch not found")
        return self._get_stop(request, batch_id)

    def _post_job_artifact(self, request, job_id: str) -> tuple:
        # Job ids are unique only within a batch and this route names no batch: the upload
        # belongs to the job with that id that started last.
        with self._lock:
            row = self._db.execute(
                "SELECT batch_id FROM jobs WHERE job_id = ? AND start_event IS NOT NULL"
                " ORDER BY start_event DESC LIMIT 1", (job_id,)).fetchone()
        if row is None:
            raise _CollectorError(404, "job not found")
        return self._save_artifact(request, row[0], job_id)

    def _post_batch_artifact(self, request, batch_id: str) -> tuple:
        self._known_batch(batch_id)
        return self._save_artifact(request, batch_id, None)

    def _save_artifact(self, request, batch_id: str, job_id: str | None) -> tuple:
        parts = _parse_multipart(request.body, request.headers.get("Content-Type", ""))
        filename, content = parts.get("file", (None, b""))
        if filename is None:
            raise _CollectorError(422, "a 'file' part with a filename is required")
        if len(content) > ARTIFACT_MAX_BYTES:
            raise _CollectorError(413, f"file is over {ARTIFACT_MAX_BYTES} bytes")
        label = parts["label"][1].decode("utf-8", "replace") if "label" in parts else None
        meta = _collector_json(parts["meta"][1], "meta") if "meta" in parts else {}
        if not isinstance(meta, dict):
            raise _CollectorError(422, "meta must be a JSON object")
        if job_id is not None:
            with self._lock:
                used = self._db.execute(
                    "SELECT COALESCE(SUM(size), 0) FROM artifacts WHERE batch_id = ?"
                    " AND job_id = ?", (batch_id, job_id)).fetchone()[0]
            if used + len(content) > ARTIFACT_MAX_JOB_BYTES:
                raise _CollectorError(413, f"job quota of {ARTIFACT_MAX_JOB_BYTES} bytes used up")
        filename = _safe_name(filename, "file")
        folder = os.path.join(self.artifacts_dir, _safe_name(batch_id, "_"),
                              _safe_name(job_id, "_") if job_id else "_batch")
        path = _write_new_file(folder, filename, content)
        with self._lock:
            artifact_id = self._db.execute(
                "INSERT INTO artifacts (batch_id, job_id, filename, size, label, meta, path)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (batch_id, job_id, filename, len(content), label, _json_module().dumps(meta), path),
            ).lastrowid
        return 201, {"id": artifact_id, "batch_id": batch_id, "job_id": job_id,
                     "filename": filename, "size": len(content), "label": label, "meta": meta,
                     "path": path}


def _write_new_file(folder: str, filename: str, content: bytes) -> str:
    """Write `content` into `folder` under `filename`, or `name-1.ext`… if that is taken."""
    os.makedirs(folder, exist_ok=True)
    stem, ext = os.path.splitext(filename)
    candidate, n = filename, 0
    while True:
        path = os.path.join(folder, candidate)
        try:
            with open(path, "xb") as file:  # "x": never overwrite an earlier upload
                file.write(content)
            return path
        except FileExistsError:
            n += 1
            candidate = f"{stem}-{n}{ext}"


def _json_module():
    import json

    return json


def _re_module():
    import re

    return re


# ---------------------------------------------------------------------------------------
# Command-line interface
# ---------------------------------------------------------------------------------------


def _cli_sender(url: str | None, token: str | None, directory: str | None = None):
    """A synchronous sender for the CLI (no worker thread), or None with a message."""
    sender = ExperimentReporter(url, "argus-cli", auth_token=token, spill_path=directory, _worker=False)
    if not sender.enabled:
        print("argus: no server URL: pass --url or set %s" % ENV_URL, file=sys.stderr)
        return None
    return sender


def _sync_pass(sender: ExperimentReporter, progress: bool, match=None) -> dict:
    """Send every claimable spill file that ``match(claim)`` accepts (every file: None) once."""
    sent = failed = 0
    t0 = _mono()
    skip = set()
    while True:
        before = sender.delivered
        outcome = sender.replayer._replay_once(RETRY_ATTEMPTS, skip=skip, match=match)
        sent += sender.delivered - before
        if outcome == "empty":
            break
        if sender.replayer._claim is not None:
            skip.add(sender.replayer._claim.path)
        if progress and outcome in ("sent", "unsent"):
            rate = sent / max(1e-6, _mono() - t0)
            left = sender.replayer._claim.left() if sender.replayer._claim is not None else 0
            sys.stderr.write("\rargus sync: %d sent (%.0f/s), %d left in this file " % (sent, rate, left))
            sys.stderr.flush()
        if outcome == "unsent":
            failed += 1
            break  # the server stopped answering: leave the rest for the next pass
    uploads_sent, uploads_left = _sync_uploads(sender) if not failed else (0, 0)
    if progress:
        sys.stderr.write("\n")
    return {"sent": sent, "unsent": failed, "uploads": uploads_sent, "uploads_left": uploads_left}


def _other_destinations(store: SpillStore, url: str | None) -> dict:
    """Events waiting for servers other than ``url``: {url: events}."""
    return {
        destination: count
        for destination, count in store.backlog()["destinations"].items()
        if destination != "(any)" and not _same_url(destination, url) and count
    }


def _sync_uploads(sender: ExperimentReporter) -> tuple:
    """Send the uploads recorded in offline mode whose files still exist."""
    store = sender.spill
    path = os.path.join(store.directory, _PENDING_UPLOADS)
    claimed = path + ".sync-%d" % os.getpid()
    sources = _orphaned_upload_claims(path)  # left by a sync that was killed
    try:
        os.rename(path, claimed)  # writers append to a fresh file meanwhile
        sources.append(claimed)
    except OSError:
        if not sources:
            return 0, 0
    pending = []
    for source in sources:
        try:
            with open(source, encoding="utf-8") as f:
                for line in f:
                    try:
                        pending.append(_loads(line))
                    except ValueError:  # a blank or torn line
                        pass
        except OSError:
            continue
    sent, keep = 0, []
    try:
        while pending:
            entry = pending[0]
            try:
                upload = _Upload(entry["route"], entry["path"], entry.get("label"), entry.get("meta"),
                                 "/api/batches/" in entry["route"])
            except (KeyError, TypeError, AttributeError):
                upload = None
            if upload is not None and (
                (entry.get("url") and not _same_url(entry["url"], sender.url))
                or (entry.get("token") and entry["token"] != _fingerprint(sender._token))
            ):
                keep.append(entry)  # for another server or token: its own sync sends it
            elif upload is not None and not os.path.exists(upload.path):
                print("argus sync: %s no longer exists; upload dropped" % upload.path, file=sys.stderr)
            elif upload is not None:
                if sender.sender._upload(upload) is not None:
                    sent += 1
                else:
                    keep.append(entry)
            pending.pop(0)
    finally:  # interrupted (Ctrl-C): what was not sent goes back for the next sync
        if keep or pending:
            store.record_upload_many(keep + pending)
        for source in sources:
            _unlink(source)
    return sent, len(keep)


def _orphaned_upload_claims(path: str) -> list:
    """``pending-uploads.jsonl.sync-<pid>`` files whose sync process is gone."""
    import glob

    orphans = []
    for claimed in glob.glob(glob.escape(path) + ".sync-*"):
        try:
            pid = int(claimed.rsplit("-", 1)[1])
        except ValueError:
            continue
        if pid == os.getpid() or not _pid_alive(pid):
            orphans.append(claimed)
    return orphans


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # it exists, owned by someone else
    return True


def _cmd_sync(args) -> int:
    if args.dry_run:  # reads the directory only: no server needed
        store = SpillStore(args.dir)
        backlog = store.backlog()
        print(
            "argus sync --dry-run: %d event(s) in %d file(s) (%d bytes), %d pending upload(s) in %s"
            % (backlog["events"], backlog["files"], backlog["bytes"], backlog["pending_uploads"], store.directory)
        )
        return 0
    url = _resolve_url(args.url)[0] if not _env_flag(ENV_DISABLE) else None
    if url is None and not args.url and not args.retarget:
        return _sync_each_destination(args)
    sender = _cli_sender(args.url, args.token, args.dir)
    if sender is None:
        return 2
    store = sender.spill
    progress = sys.stderr.isatty()
    others = _other_destinations(store, sender.url)
    if others and args.retarget:
        print(
            "argus sync: --retarget: sending %d event(s) written for %s to %s"
            % (sum(others.values()), ", ".join(sorted(others)), sender.url),
            file=sys.stderr,
        )
    elif others:
        for other, count in sorted(others.items()):
            print(
                "argus sync: %d event(s) in %s were written for %s, not %s: left alone. Run "
                "`argus sync` without --url to send each file to its own server, or add "
                "--retarget to send them here." % (count, store.directory, other, sender.url),
                file=sys.stderr,
            )
    total = _sync_loop(sender, args, progress, None if args.retarget else sender.replayer._for_us)
    backlog = store.backlog()
    left = backlog["events"]
    print(
        "argus sync: %d event(s) sent, %d upload(s) sent; %d event(s) left in %s, %d rejected (in %s)"
        % (total["sent"], total["uploads"], left, store.directory, store.rejected, _DEAD_LETTER)
    )
    return 0 if left == 0 and not backlog["pending_uploads"] else 1


def _sync_loop(sender: ExperimentReporter, args, progress: bool, match) -> dict:
    store = sender.spill
    total = {"sent": 0, "unsent": 0, "uploads": 0, "uploads_left": 0}
    delay = args.watch
    stop_at = _mono() + args.max_time if args.max_time else None
    try:
        while True:
            result = _sync_pass(sender, progress, match)
            for key in total:
                total[key] = total[key] + result[key] if key in ("sent", "uploads") else result[key]
            if not args.watch or (stop_at is not None and _mono() >= stop_at):
                break
            if args.until_empty:
                backlog = store.backlog()
                mine = sum(
                    count
                    for destination, count in backlog["destinations"].items()
                    if match is None or destination == "(any)" or _same_url(destination, sender.url)
                )
                if mine == 0 and backlog["pending_uploads"] == 0:
                    break
            delay = args.watch if not result["unsent"] else min(delay * 2, args.watch * 16)
            time.sleep(delay)
    except KeyboardInterrupt:
        pass
    return total


def _sync_each_destination(args) -> int:
    """No server configured: every spill file goes to the server it was written for. The
    token goes to a server only if a file for that server was written under it (the same
    fingerprint); files written under another token are left alone."""
    store = SpillStore(args.dir)
    token = _resolve_token(args.token)[0]
    fingerprint = _fingerprint(token)
    tokens = {}  # destination URL -> token fingerprints its files were written under
    for _mtime, _name, path, _size in store._candidates():
        try:
            with open(path, "rb") as f:
                header = _header(f.readline().decode("utf-8", "replace").strip())
        except OSError:
            continue
        if header is not None and header.get("url"):
            tokens.setdefault(header["url"], set()).add(header.get("token"))
    if not tokens:
        print("argus: no server URL: pass --url or set %s" % ENV_URL, file=sys.stderr)
        return 2
    progress = sys.stderr.isatty()
    sent = uploads = 0
    for url in sorted(tokens):
        use = token if fingerprint and fingerprint in tokens[url] else ""  # "": no token at all
        sender = _cli_sender(url, use, args.dir)
        if sender is None:
            continue

        use_fp = _fingerprint(use)

        def ours(claim, url=url, use_fp=use_fp):
            if not _same_url(claim.destination, url):
                return False
            if claim.token_fp and claim.token_fp != use_fp:
                print(
                    "argus sync: %s was written under another token (%s); left alone. Run "
                    "`argus sync` with that token." % (claim.path, claim.token_fp),
                    file=sys.stderr,
                )
                return False
            return True

        print("argus sync: sending the events written for %s there" % url, file=sys.stderr)
        total = _sync_loop(sender, args, progress, ours)
        sent += total["sent"]
        uploads += total["uploads"]
    backlog = store.backlog()
    print(
        "argus sync: %d event(s) sent, %d upload(s) sent; %d event(s) left in %s, %d rejected (in %s)"
        % (sent, uploads, backlog["events"], store.directory, store.rejected, _DEAD_LETTER)
    )
    return 0 if backlog["events"] == 0 and not backlog["pending_uploads"] else 1


def _redact(token: str | None) -> str | None:
    """Enough of a token to tell two apart, never enough to use: em_live_…x9."""
    if not token:
        return None
    prefix = "em_live_" if token.startswith("em_live_") else ""
    tail = token[-2:] if len(token) - len(prefix) >= 16 else ""
    return prefix + "…" + tail


def _cmd_status(args) -> int:
    url, url_source = _resolve_url(args.url)
    token, token_source = _resolve_token(args.token)
    offline = _offline_mode()
    store = SpillStore(args.dir)
    report = {
        "version": __version__,
        "url": url,
        "url_source": url_source or "default",
        "token": _redact(token),
        "token_source": token_source or "default",
        "transport": _transport_name(),
        "transport_source": "environment (%s)" % ENV_TRANSPORT if os.environ.get(ENV_TRANSPORT) else "default",
        "spill_dir": store.directory,
        "spill_dir_source": "argument" if args.dir else (
            "environment (%s)" % ENV_SPILL_DIR if os.environ.get(ENV_SPILL_DIR) else "default"
        ),
        "offline": offline,
        "offline_source": (
            "environment (%s)" % ENV_OFFLINE if _env_flag(ENV_OFFLINE)
            else "environment (%s)" % ENV_MODE if offline else "default"
        ),
        "disabled": _env_flag(ENV_DISABLE),
        "disabled_source": "environment (%s)" % ENV_DISABLE if os.environ.get(ENV_DISABLE) else "default",
        "durable": _env_flag(ENV_DURABLE),
        "durable_source": "environment (%s)" % ENV_DURABLE if os.environ.get(ENV_DURABLE) else "default",
        "drain_s": _drain_s(),
        "drain_s_source": "environment (%s)" % ENV_DRAIN_S if os.environ.get(ENV_DRAIN_S) else "default",
        "backlog": store.backlog(),
        "server": None,
    }
    if url and not offline:
        report["server"] = _probe_server(url, token)
    if args.json:
        print(_dumps(report))
    else:
        rows = [
            ("version", __version__, ""),
            ("url", url or "-", report["url_source"]),
            ("token", report["token"] or "-", report["token_source"]),
            ("transport", report["transport"], report["transport_source"]),
            ("spill dir", store.directory, report["spill_dir_source"]),
            ("offline", "yes" if offline else "no", report["offline_source"]),
            ("disabled", "yes" if report["disabled"] else "no", report["disabled_source"]),
            ("durable", "yes" if report["durable"] else "no", report["durable_source"]),
            ("exit drain", "%g s" % report["drain_s"], report["drain_s_source"]),
        ]
        b = report["backlog"]
        rows.append(
            ("backlog", "%d event(s) in %d file(s), %d bytes" % (b["events"], b["files"], b["bytes"]),
             "oldest %s" % (b["oldest"] or "-"))
        )
        rows.append(("dead letter", "%d event(s)" % b["dead_letter"], _DEAD_LETTER))
        rows.append(("pending uploads", str(b["pending_uploads"]), _PENDING_UPLOADS))
        if report["server"]:
            rows.append(("server", report["server"]["answer"], report["server"]["detail"]))
        width = max(len(r[0]) for r in rows)
        for name, value, source in rows:
            print("%-*s  %s%s" % (width, name, value, "   (%s)" % source if source else ""))
    server = report["server"]
    return 0 if server is None or server["answer"] == "ok" else 1


def _probe_server(url: str, token: str | None) -> dict:
    """POST an empty batch: a 422 proves an Argus server that accepts the token."""
    try:
        status, _h, body = _make_transport(url, token).request(
            "POST", "/api/events/batch", b'{"events":[]}', {"Content-Type": "application/json"}, 5.0
        )
    except _NetworkError as exc:
        return {"answer": "unreachable", "detail": str(exc)}
    if status in (200, 422):
        return {"answer": "ok", "detail": "answers; token accepted" if token else "answers (no token)"}
    if status in (401, 403):
        return {"answer": "token refused", "detail": "%d %s" % (status, _error_text(body))}
    return {"answer": "unexpected answer", "detail": "%d %s" % (status, _error_text(body))}


def _parse_value(text: str):
    try:
        return _loads(text)
    except ValueError:
        return text


def _cmd_emit(args) -> int:
    if args.event_type not in EVENT_TYPES and args.event_type not in _SERVER_EXTRA_TYPES:
        print("argus emit: unknown event type %r; use one of %s" % (args.event_type, ", ".join(EVENT_TYPES)),
              file=sys.stderr)
        return 2
    if args.event_type in _JOB_EVENT_TYPES and not args.job_id:
        print("argus emit: %s needs --job-id" % args.event_type, file=sys.stderr)
        return 2
    try:
        _check_batch_id(args.batch_id)
        if args.job_id is not None:
            _check_job_id(args.job_id)
    except (TypeError, ValueError) as exc:
        print("argus emit: %s" % exc, file=sys.stderr)
        return 2
    data = {}
    for item in args.fields:
        key, sep, value = item.partition("=")
        if not sep or not key:
            print("argus emit: expected key=value, got %r" % item, file=sys.stderr)
            return 2
        data[key] = _parse_value(value)
    url, _ = _resolve_url(args.url)
    sender = ExperimentReporter(
        url, args.project, auth_token=args.token, batch_id=args.batch_id, _worker=False
    )
    record = (args.event_type, args.batch_id, args.job_id, _now(), _jsonable(data), 0)
    pair = sender._encode(record)
    if not sender.enabled or _offline_mode():
        sender.spill.append([pair[1]])
        sender.spill.close()
        print("argus emit: no server (offline or no URL); event saved to %s" % sender.spill.directory,
              file=sys.stderr)
        return 1
    unsent = sender.sender._send([pair], RETRY_ATTEMPTS if args.retry else 1)
    if unsent:
        sender.spill.append([line for _, line in unsent])
        sender.spill.close()
        print("argus emit: not delivered; saved to %s for `argus sync`" % sender.spill.directory,
              file=sys.stderr)
        return 1
    if sender.spill.rejected:
        print("argus emit: the server rejected the event (see %s)" % _DEAD_LETTER, file=sys.stderr)
        return 1
    print(pair[0])
    return 0


def _cmd_batch_id(args) -> int:
    if args.new:
        print(new_batch_id(args.prefix or "batch"))
        return 0
    if not args.project or not args.experiment:
        print("argus batch-id: give --project and --experiment, or --new", file=sys.stderr)
        return 2
    print(derive_batch_id(args.project, args.experiment, args.git_sha, prefix=args.prefix or "bench"))
    return 0


def _cmd_stop(args) -> int:
    url, _ = _resolve_url(args.url)
    if not url:
        print("argus stop: no server URL: pass --url or set %s" % ENV_URL, file=sys.stderr)
        return 2
    token, _ = _resolve_token(args.token)
    try:
        status, _h, body = _make_transport(url, token).request(
            "POST", "/api/batches/%s/stop" % _quote(args.batch_id), b"{}",
            {"Content-Type": "application/json"}, 10.0,
        )
    except _NetworkError as exc:
        print("argus stop: %s" % exc, file=sys.stderr)
        return 1
    if 200 <= status < 300:
        print("stop requested for %s" % args.batch_id)
        return 0
    print("argus stop: %d %s" % (status, _error_text(body)), file=sys.stderr)
    return 1


def _cmd_serve(args) -> int:
    rate_limit = None
    if args.rate_limit:
        try:
            burst, _, per_s = args.rate_limit.partition("/")
            rate_limit = (float(burst), float(per_s))
        except ValueError:
            print("argus serve: --rate-limit takes BURST/PER_S, e.g. 60/10", file=sys.stderr)
            return 2
    collector = _Collector(args.host, args.port, db=args.db, artifacts_dir=args.artifacts, token=args.token,
                           event_ms=args.event_ms, rate_limit=rate_limit)
    print("argus collector listening on %s (database %s); Ctrl-C stops it" % (collector.url, args.db),
          flush=True)
    try:
        collector.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        collector.stop()
    return 0


def _tiny_png(path: str, width: int = 64, height: int = 32) -> None:
    """Write a small gradient PNG with the standard library (the demo's artifact)."""
    import struct
    import zlib

    def chunk(kind: bytes, payload: bytes) -> bytes:
        body = kind + payload
        return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)

    rows = b"".join(
        b"\x00" + b"".join(bytes((x * 4 % 256, y * 8 % 256, 160)) for x in range(width))
        for y in range(height)
    )
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def _print_table(title: str, header: tuple, rows: list) -> None:
    cells = [tuple("-" if c is None else str(c) for c in row) for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(header)]
    print("\n" + title)
    print("  " + "  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("  " + "  ".join("-" * w for w in widths))
    for row in cells:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)))


def _cmd_demo(args) -> int:
    """The same output on every run; its files live in a temporary folder removed at the end."""
    import shutil
    import tempfile

    workdir = tempfile.mkdtemp(prefix="argus-demo-")
    try:
        return _run_demo(workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _run_demo(workdir: str) -> int:
    import math

    saved = {k: os.environ.get(k) for k in (ENV_SPILL_DIR, ENV_DISABLE, ENV_OFFLINE, ENV_MODE, "RANK", "SLURM_PROCID")}
    os.environ[ENV_SPILL_DIR] = os.path.join(workdir, "spill")  # never touch the user's store
    for name in (ENV_DISABLE, ENV_OFFLINE, ENV_MODE, "RANK", "SLURM_PROCID"):
        os.environ.pop(name, None)
    plots = os.path.join(workdir, "plots")
    os.makedirs(plots)
    print("argus-reporter %s demo: a local collector, two simulated jobs, one Stop request" % __version__)
    try:
        with _Collector(artifacts_dir=os.path.join(workdir, "artifacts")) as collector:
            with Reporter(
                "demo",
                batch_id=derive_batch_id("argus-demo", "demo", git_sha="demo", prefix="demo"),  # same every run
                source_project="argus-demo",
                experiment_type="demo",
                n_total=2,
                monitor_url=collector.url,
                heartbeat=False,
                stop_polling=0.2,
                resource_snapshot=False,
                auto_upload_dirs=[plots],
            ) as r:
                with r.job("demo-linear", model="linear", dataset="synthetic") as job:
                    for epoch in range(5):
                        loss = 1.0 / (epoch + 1)
                        job.epoch(epoch, train_loss=round(loss, 4), val_loss=round(loss * 1.1, 4), lr=1e-3)
                    job.log("finished 5 epochs")
                    png = os.path.join(plots, "loss.png")
                    _tiny_png(png)
                    job.upload(png)
                    job.metrics({"MSE": 0.2, "R2": 0.91})
                with r.job("demo-mlp", model="mlp", dataset="synthetic") as job:
                    for epoch in range(50):
                        if job.stopped:
                            job.log("Stop requested: ending at epoch %d" % epoch, level="WARNING")
                            break
                        job.epoch(epoch, train_loss=round(math.exp(-epoch / 4), 4), lr=1e-3)
                        if epoch == 2:  # someone presses Stop in the UI: the poller sees it
                            r.flush(5.0)
                            collector.request_stop(r.batch_id, requested_by="demo")
                            deadline = time.monotonic() + 10
                            while not job.stopped and time.monotonic() < deadline:
                                time.sleep(0.05)
            batch = collector.batch(r.batch_id) or {}
            _print_table(
                "batch",
                ("batch_id", "status", "experiment_type", "n_total"),
                [(r.batch_id, batch.get("status"), batch.get("experiment_type"), batch.get("n_total"))],
            )
            rows = []
            for j in collector.jobs(r.batch_id):
                epochs = collector.epochs(r.batch_id, j["job_id"])
                last = epochs[-1] if epochs else {}
                status = j["status"]
                if j["job_id"] == "demo-mlp" and r.stopped and len(epochs) < 50:
                    status += " (stopped early)"
                rows.append(
                    (j["job_id"], status, len(epochs), last.get("train_loss"), last.get("val_loss"),
                     _dumps(j["metrics"]) if j.get("metrics") else None)
                )
            _print_table("jobs", ("job_id", "status", "epochs", "last train_loss", "last val_loss", "metrics"), rows)
            _print_table(
                "artifacts",
                ("job_id", "filename", "bytes"),
                [(a["job_id"] or "(batch)", a["filename"], a["size"]) for a in collector.artifacts(r.batch_id)],
            )
            sender = r._sender
            print(
                "\nevents delivered: %d (stored by the collector: %d); spilled: %d; stop honoured: %s"
                % (sender.delivered if sender else 0, collector.event_count(r.batch_id),
                   sender.spill.spilled if sender else 0, "yes" if r.stopped else "no")
            )
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return 0 if r.stopped and sender is not None and sender.spill.spilled == 0 else 1


def _build_parser():
    import argparse

    parser = argparse.ArgumentParser(
        prog="argus", description="argus-reporter %s: the Argus SDK's command line" % __version__
    )
    parser.add_argument("--version", action="version", version="argus-reporter %s" % __version__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("sync", help="send spilled events (and offline uploads) to the server")
    p.add_argument("--dir", help="spill directory (default: $%s or ~/.argus-reporter)" % ENV_SPILL_DIR)
    p.add_argument("--url", help="server URL (default: $%s)" % ENV_URL)
    p.add_argument("--token", help="SDK token (default: $%s)" % ENV_TOKEN)
    p.add_argument("--watch", type=float, metavar="SECONDS", help="keep syncing every SECONDS")
    p.add_argument("--dry-run", action="store_true", help="only report what would be sent")
    p.add_argument("--until-empty", action="store_true", help="with --watch: stop once nothing is left")
    p.add_argument("--max-time", type=float, metavar="SECONDS", help="with --watch: stop after SECONDS")
    p.add_argument(
        "--retarget",
        action="store_true",
        help="send every spilled event to --url/$%s, also those written for another server" % ENV_URL,
    )
    p.set_defaults(func=_cmd_sync)

    p = sub.add_parser("status", help="resolved configuration, spill backlog, server check")
    p.add_argument("--dir", help="spill directory")
    p.add_argument("--url", help="server URL")
    p.add_argument("--token", help="SDK token")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("emit", help="send one event (e.g. from a SLURM epilog)")
    p.add_argument("event_type", help="one of: " + ", ".join(EVENT_TYPES))
    p.add_argument("--batch-id", required=True)
    p.add_argument("--job-id")
    p.add_argument("--project", default=os.environ.get("ARGUS_PROJECT") or "default")
    p.add_argument("--url")
    p.add_argument("--token")
    p.add_argument("--retry", action="store_true", help="retry 5xx/network errors with backoff")
    p.add_argument("fields", nargs="*", metavar="key=value", help="data fields; values parsed as JSON")
    p.set_defaults(func=_cmd_emit)

    p = sub.add_parser("batch-id", help="print a derived (or a new) batch id")
    p.add_argument("--project")
    p.add_argument("--experiment")
    p.add_argument("--git-sha", help='commit to hash (default: git rev-parse HEAD; "" means no-git)')
    p.add_argument("--prefix")
    p.add_argument("--new", action="store_true", help="a fresh random id instead")
    p.set_defaults(func=_cmd_batch_id)

    p = sub.add_parser("serve", help="run a small local collector (for trying the SDK)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8765, help="port (default: %(default)s)")
    p.add_argument("--db", default=":memory:", help="SQLite file (default: in memory)")
    p.add_argument("--artifacts", help="folder for uploaded files (default: a temporary folder)")
    p.add_argument("--token", help="require this token (default: accept any request)")
    p.add_argument(
        "--event-ms",
        type=float,
        default=0.0,
        help="like the real server under load: each event costs this many ms of one writer "
        "shared by all requests, e.g. 7 (default: %(default)s)",
    )
    p.add_argument(
        "--rate-limit",
        metavar="BURST/PER_S",
        help="like the real server: a request budget per token, e.g. 60/10; beyond it 429 with "
        "Retry-After (default: none)",
    )
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("stop", help="request a stop of a batch (local collector)")
    p.add_argument("batch_id")
    p.add_argument("--url")
    p.add_argument("--token")
    p.set_defaults(func=_cmd_stop)

    p = sub.add_parser("demo", help="a simulated training against an in-process collector")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv=None) -> int:
    """Run the ``argus`` command line; returns the exit status."""
    parser = _build_parser()
    # `emit TYPE --batch-id B key=value`: argparse has already matched the empty `fields`
    # when it reaches the options, so key=value after them come back as extras.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if getattr(args, "func", None) is not _cmd_emit or any(e.startswith("-") for e in extra):
            parser.error("unrecognized arguments: %s" % " ".join(extra))
        args.fields = list(args.fields) + extra
    if not _logger().handlers and not _logger().parent.handlers:
        import logging

        logging.basicConfig(level=logging.WARNING, format="%(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
