"""A node's TOML configuration and home folder.

A node home holds ``node.toml``, the node's identity bundle (see ``govshare.model.identity``),
the data store ``node.db`` and the audit log ``audit.db``. Every path in the config is relative
to the home unless absolute.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from govshare.node.compute import BACKENDS, RAY, ComputeSettings
from govshare.node.home_permissions import make_private
from govshare.node.queries.engines import EngineSettings
from govshare.protocols.errors import MalformedInput, NotFound

CONFIG_NAME = "node.toml"

# Threads for the server's store and log calls (catalogue, audit, status); the server itself
# runs on one event loop and protocol work in a process pool.
DEFAULT_MAX_WORKERS = 16
# Queries computing at once, and admitted queries waiting beyond those
# (govshare.node.queries.capacity).
DEFAULT_MAX_RUNNING = 4
DEFAULT_MAX_QUEUED = 124
# Submissions taken at once; beyond, RESOURCE_EXHAUSTED (govshare.node.queries.capacity.Intake).
DEFAULT_MAX_INTAKE = 64
# Seconds a stopping node lets in-flight RPCs finish before cancelling them.
DEFAULT_GRACE_SECONDS = 5.0
# Seconds between audit-log checkpoints when entries keep arriving.
DEFAULT_CHECKPOINT_INTERVAL = 10.0
# Seconds a node waits for its peer's part of a protocol before aborting the query.
DEFAULT_PROTOCOL_TIMEOUT = 300.0
# Joint queries one analyst may submit to this node per minute (a probing defence).
DEFAULT_RATE_LIMIT_PER_MINUTE = 30
# Working days (Monday to Friday) the operator has to answer an access application before it
# is overdue and `audit check` warns (govshare.node.policy.applications).
DEFAULT_APPLICATION_DEADLINE_DAYS = 5
# Structured logs (govshare.node.observability.logs): where and from which level.
LOG_TO_STDERR = "stderr"
DEFAULT_LOG_LEVEL = "info"
LOG_LEVELS = ("debug", "info", "warning", "error")
# The metrics and health endpoint (govshare.node.observability.endpoint) is off unless set: a
# fixed default port would collide where several nodes share a machine (the demo runs five),
# and an unauthenticated port should be opened by the operator, not by default. The address
# the README, the Docker image and the systemd unit use:
DOCUMENTED_METRICS_ADDRESS = "127.0.0.1:9102"
# Overrides [observability] metrics (the Docker image sets it for its HEALTHCHECK); "" = off.
METRICS_ENV = "GOVSHARE_METRICS"
# Days a receiving node keeps the keys of its own that matched a membership query (its
# results) before it deletes them, overwritten, and logs it: long enough for the department to
# act on them, short enough that the node holds no standing list of matches.
DEFAULT_RESULTS_DAYS = 90

TEMPLATE = """\
# govshare node configuration. Paths are relative to this file's folder.
[node]
# Address the node's gRPC server listens on (mutual TLS only).
listen = "{listen}"
# Identity bundle: tls.key, tls.crt, signing.key, ca.crt, roster.json.
identity = "{identity}"
# SQLite store for datasets, grants, approvals and budgets.
database = "node.db"
# SQLite append-only audit log.
audit_database = "audit.db"
# Threads for store and log calls (catalogue, audit, status).
max_workers = {max_workers}
# Queries computing at once; a query waiting for its peer gives its turn back.
max_running = {max_running}
# Queries admitted beyond those, waiting for a turn or a peer; a run beyond is refused with
# RESOURCE_EXHAUSTED and a retry hint. Each admitted query holds its sets in memory.
max_queued = {max_queued}
# Submissions taken at once (each writes the store and the log); beyond, RESOURCE_EXHAUSTED.
max_intake = {max_intake}
# Seconds in-flight calls may finish after SIGTERM/SIGINT.
grace_seconds = {grace_seconds}
# Seconds between audit-log checkpoints.
checkpoint_interval = {checkpoint_interval}
# Seconds to wait for a peer's part of a protocol before aborting the query.
protocol_timeout = {protocol_timeout}
# Joint queries one analyst may submit per minute.
rate_limit_per_minute = {rate_limit_per_minute}
# Processes for the cryptographic work (0 = one per CPU).
workers = 0
# A HIGH risk alert about an analyst (govshare node alerts) suspends the analyst's queries at
# this node until the operator clears it (govshare node alerts clear).
suspend_on_high_alert = false
# Working days to answer an analyst's access application (govshare grant request) before it
# is overdue (an alert in govshare audit check); 0 = overdue once anything else is logged.
application_deadline_days = {application_deadline_days}

[observability]
# Structured logs, one JSON object a line: "stderr", or a file (relative to this folder).
log = "stderr"
# debug, info (a line per query event: received, decided, running, released or failed,
# settled), warning or error.
log_level = "info"
# Plain-HTTP GET /metrics (Prometheus) and GET /healthz on this address, e.g.
# "127.0.0.1:9102"; "" = off. Neither needs a federation certificate nor writes to the audit
# log: keep the address local or reachable by the operator only. $GOVSHARE_METRICS overrides.
metrics = ""

[compute]
# Where the per-row cryptography runs: "local" (this machine's processes, see workers) or
# "ray" (tasks on the department's own Ray cluster, which must run this govshare version;
# README, "Heavy work on a Ray cluster").
backend = "local"
# ray: "auto" (the cluster this machine belongs to), "host:6379" or "ray://host:10001".
address = "auto"
# ray: CPUs each task asks for.
num_cpus = 1

[retention]
# Days this node keeps the keys of its own that matched a membership query sent to it
# (govshare node results); older ones are deleted, overwritten, and the deletion logged
# (results.expired), at start and then hourly. 0 = kept until removed by hand.
results_days = {results_days}

[engines]
# Membership's RR22 engine (govshare query psi --engine rr22): the Python of a virtual
# environment with spu 0.9.5 (make secretflow builds .venv/secretflow); "" = not offered, and
# such queries are refused. Its link listens on the host of [node] listen, mutual TLS with this
# node's certificate.
rr22_python = ""
# libpsi's RR22 low-communication mode (less traffic, more computation).
rr22_low_comm = false
"""


@dataclass(frozen=True)
class NodeConfig:
    home: Path
    listen: str
    identity_dir: Path
    database_path: Path
    audit_database_path: Path
    max_workers: int = DEFAULT_MAX_WORKERS
    max_running: int = DEFAULT_MAX_RUNNING
    max_queued: int = DEFAULT_MAX_QUEUED
    max_intake: int = DEFAULT_MAX_INTAKE
    grace_seconds: float = DEFAULT_GRACE_SECONDS
    checkpoint_interval: float = DEFAULT_CHECKPOINT_INTERVAL
    protocol_timeout: float = DEFAULT_PROTOCOL_TIMEOUT
    rate_limit_per_minute: int = DEFAULT_RATE_LIMIT_PER_MINUTE
    workers: int = 0
    suspend_on_high_alert: bool = False
    application_deadline_days: int = DEFAULT_APPLICATION_DEADLINE_DAYS
    # [observability]: JSON logs to this file (None: stderr), from this level; the metrics and
    # health endpoint's address (None: off).
    log_file: Path | None = None
    log_level: str = DEFAULT_LOG_LEVEL
    metrics_address: str | None = None
    # [compute]: the backend of the per-row work (govshare.node.compute).
    compute: ComputeSettings = field(default_factory=ComputeSettings)
    # [retention] results_days: days membership results are kept here (0 = no limit).
    results_days: int = DEFAULT_RESULTS_DAYS
    # [engines]: PSI engines beside ECDH-PSI (govshare.node.queries.engines).
    engines: EngineSettings = field(default_factory=EngineSettings)

    @classmethod
    def load(cls, home: Path, *, environ: Mapping[str, str] | None = None) -> NodeConfig:
        """Read ``home/node.toml``; ``$GOVSHARE_METRICS`` in ``environ`` (default: the
        process's) overrides ``[observability] metrics``.

        Raises:
            NotFound: the home has no config (run ``govshare node init``).
            MalformedInput: the config is not valid TOML or has a wrong value.
        """
        path = home / CONFIG_NAME
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise NotFound(
                f"no node config at {path}; run 'govshare node init --home {home}' first"
            ) from None
        except tomllib.TOMLDecodeError as exc:
            raise MalformedInput(f"{path}: {exc}", field=CONFIG_NAME) from None
        section = raw.get("node")
        if not isinstance(section, dict):
            raise MalformedInput(f"{path}: missing [node] table", field="node")

        def text(key: str, default: str | None = None) -> str:
            value = section.get(key, default)
            if not isinstance(value, str) or not value:
                raise MalformedInput(f"{path}: node.{key} must be a non-empty string", field=key)
            return value

        def number(key: str, default: float) -> float:
            value = section.get(key, default)
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise MalformedInput(f"{path}: node.{key} must be a positive number", field=key)
            return float(value)

        log_file, log_level, metrics_address = _observability(
            raw.get("observability", {}), home, path, environ
        )
        return cls(
            home=home,
            listen=text("listen"),
            identity_dir=home / text("identity", "."),
            database_path=home / text("database", "node.db"),
            audit_database_path=home / text("audit_database", "audit.db"),
            max_workers=int(number("max_workers", DEFAULT_MAX_WORKERS)),
            max_running=int(number("max_running", DEFAULT_MAX_RUNNING)),
            max_queued=_count(section.get("max_queued", DEFAULT_MAX_QUEUED), "max_queued", path),
            max_intake=int(number("max_intake", DEFAULT_MAX_INTAKE)),
            grace_seconds=number("grace_seconds", DEFAULT_GRACE_SECONDS),
            checkpoint_interval=number("checkpoint_interval", DEFAULT_CHECKPOINT_INTERVAL),
            protocol_timeout=number("protocol_timeout", DEFAULT_PROTOCOL_TIMEOUT),
            rate_limit_per_minute=int(
                number("rate_limit_per_minute", DEFAULT_RATE_LIMIT_PER_MINUTE)
            ),
            workers=_workers(section.get("workers", 0), path),
            suspend_on_high_alert=_flag(section, "suspend_on_high_alert", path),
            application_deadline_days=_count(
                section.get("application_deadline_days", DEFAULT_APPLICATION_DEADLINE_DAYS),
                "application_deadline_days",
                path,
            ),
            log_file=log_file,
            log_level=log_level,
            metrics_address=metrics_address,
            compute=_compute(raw.get("compute", {}), path),
            results_days=_retention(raw.get("retention", {}), path),
            engines=_engines(raw.get("engines", {}), home, path, text("listen")),
        )


def _engines(section: object, home: Path, path: Path, listen: str) -> EngineSettings:
    """The [engines] table; absent: ECDH-PSI only."""
    if not isinstance(section, dict):
        raise MalformedInput(f"{path}: [engines] must be a table", field="engines")
    python = section.get("rr22_python", "")
    if not isinstance(python, str):
        raise MalformedInput(f"{path}: engines.rr22_python must be a path", field="rr22_python")
    low_comm = section.get("rr22_low_comm", False)
    if not isinstance(low_comm, bool):
        raise MalformedInput(
            f"{path}: engines.rr22_low_comm must be true or false", field="rr22_low_comm"
        )
    host = listen.rsplit(":", 1)[0].strip("[]") or "0.0.0.0"
    return EngineSettings(
        rr22_python=home / python if python.strip() else None,
        rr22_low_comm=low_comm,
        link_host=host,
    )


def _retention(section: object, path: Path) -> int:
    """[retention] results_days; absent: :data:`DEFAULT_RESULTS_DAYS`."""
    if not isinstance(section, dict):
        raise MalformedInput(f"{path}: [retention] must be a table", field="retention")
    days = section.get("results_days", DEFAULT_RESULTS_DAYS)
    if isinstance(days, bool) or not isinstance(days, int) or days < 0:
        raise MalformedInput(
            f"{path}: retention.results_days must be 0 or a positive integer", field="results_days"
        )
    return days


def _compute(section: object, path: Path) -> ComputeSettings:
    """The [compute] table; absent: the local process pool."""
    if not isinstance(section, dict):
        raise MalformedInput(f"{path}: [compute] must be a table", field="compute")
    backend = section.get("backend", "local")
    if backend not in BACKENDS:
        raise MalformedInput(
            f"{path}: compute.backend must be one of {', '.join(BACKENDS)}", field="backend"
        )
    address = section.get("address", "auto")
    if not isinstance(address, str) or not address.strip():
        raise MalformedInput(f"{path}: compute.address must be a non-empty string", field="address")
    numbers = {}
    for key, default in (("num_cpus", 1.0), ("connect_timeout", ComputeSettings.connect_timeout)):
        value = section.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise MalformedInput(f"{path}: compute.{key} must be a positive number", field=key)
        numbers[key] = float(value)
    if backend == RAY and not (address == "auto" or ":" in address):
        raise MalformedInput(
            f"{path}: compute.address must be 'auto', host:port or ray://host:port",
            field="address",
        )
    return ComputeSettings(
        backend=backend,
        address=address.strip(),
        num_cpus=numbers["num_cpus"],
        connect_timeout=numbers["connect_timeout"],
    )


def _observability(
    section: object, home: Path, path: Path, environ: Mapping[str, str] | None
) -> tuple[Path | None, str, str | None]:
    """(log file or None for stderr, log level, metrics address or None) of [observability]."""
    if not isinstance(section, dict):
        raise MalformedInput(f"{path}: [observability] must be a table", field="observability")

    def text(key: str, default: str) -> str:
        value = section.get(key, default)
        if not isinstance(value, str):
            raise MalformedInput(f"{path}: observability.{key} must be a string", field=key)
        return value.strip()

    log = text("log", LOG_TO_STDERR) or LOG_TO_STDERR
    level = text("log_level", DEFAULT_LOG_LEVEL).lower()
    if level not in LOG_LEVELS:
        raise MalformedInput(
            f"{path}: observability.log_level must be one of {', '.join(LOG_LEVELS)}",
            field="log_level",
        )
    metrics = text("metrics", "")
    env = os.environ if environ is None else environ
    if METRICS_ENV in env:
        metrics = env[METRICS_ENV].strip()
    if metrics and ":" not in metrics:
        raise MalformedInput(
            f"{path}: observability.metrics must be host:port (e.g. "
            f"{DOCUMENTED_METRICS_ADDRESS!r}) or empty",
            field="metrics",
        )
    return (None if log == LOG_TO_STDERR else home / log), level, (metrics or None)


def _workers(value: object, path: Path) -> int:
    return _count(value, "workers", path)


def _count(value: object, key: str, path: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise MalformedInput(f"{path}: node.{key} must be 0 or a positive integer", field=key)
    return value


def _flag(section: dict[str, object], key: str, path: Path) -> bool:
    value = section.get(key, False)
    if not isinstance(value, bool):
        raise MalformedInput(f"{path}: node.{key} must be true or false", field=key)
    return value


def write_default(home: Path, *, listen: str, identity: str = ".") -> Path:
    """Write a fresh ``node.toml`` with documented defaults; refuse to overwrite one.

    The folder becomes a node home: it and everything in it are made private (folders 0700,
    files 0600, :func:`~govshare.node.home_permissions.make_private`), as the node checks at
    every start.
    """
    path = home / CONFIG_NAME
    if path.exists():
        raise MalformedInput(f"{path} already exists; edit it or choose another home")
    home.mkdir(parents=True, exist_ok=True)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    make_private(home)
    path.write_text(
        TEMPLATE.format(
            listen=listen,
            identity=identity,
            max_workers=DEFAULT_MAX_WORKERS,
            max_running=DEFAULT_MAX_RUNNING,
            max_queued=DEFAULT_MAX_QUEUED,
            max_intake=DEFAULT_MAX_INTAKE,
            grace_seconds=DEFAULT_GRACE_SECONDS,
            checkpoint_interval=DEFAULT_CHECKPOINT_INTERVAL,
            protocol_timeout=DEFAULT_PROTOCOL_TIMEOUT,
            rate_limit_per_minute=DEFAULT_RATE_LIMIT_PER_MINUTE,
            application_deadline_days=DEFAULT_APPLICATION_DEADLINE_DAYS,
            results_days=DEFAULT_RESULTS_DAYS,
        ),
        encoding="utf-8",
    )
    return path
