"""Every configuration option, declared once.

Each ``Option`` carries its name, type, default, help and the roles that read it. The
command line flags (``--collector``), environment variables (``SP_PIPELINE_COLLECTOR``),
TOML keys (``collector = "..."``) and ``docs/configuration.md`` all come from this table.
Precedence: flag, then environment, then file, then default.

``Settings`` is the immutable result; the supervisor passes it to each child as JSON,
never as live handles.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

from .errors import ConfigError

ENV_PREFIX = "SP_PIPELINE_"


def _positive_int(v: Any) -> int:
    n = _int(v)
    if n <= 0:
        raise ValueError("must be a positive integer")
    return n


def _int(v: Any) -> int:
    if isinstance(v, bool):
        raise ValueError("must be an integer")
    if isinstance(v, int):
        return v
    if isinstance(v, str) and v.strip().lstrip("-").isdigit():
        return int(v)
    raise ValueError("must be an integer")


def _positive_float(v: Any) -> float:
    if isinstance(v, bool):
        raise ValueError("must be a number")
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise ValueError("must be a number") from None
    if not f > 0 or f == float("inf"):
        raise ValueError("must be a positive, finite number")
    return f


def _bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(v, str) and v.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError("must be a string")
    return v


def _choice(*choices: str) -> Callable[[Any], str]:
    def parse(v: Any) -> str:
        if not isinstance(v, str) or v.lower() not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return v.lower()

    parse.choices = choices  # type: ignore[attr-defined]
    return parse


def _statuses(v: Any) -> Tuple[int, ...]:
    items = v.split(",") if isinstance(v, str) else v
    if not isinstance(items, (list, tuple)):
        raise ValueError("must be a list of HTTP status codes")
    out = []
    for item in items:
        code = _int(item.strip() if isinstance(item, str) else item)
        if not 100 <= code <= 599:
            raise ValueError(f"{code} is not an HTTP status code")
        out.append(code)
    return tuple(sorted(set(out)))


def _host_port(v: Any) -> str:
    s = _str(v)
    host, sep, port = s.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("must be HOST:PORT")
    return s


def _url(v: Any) -> str:
    s = _str(v)
    if not (s.startswith("http://") or s.startswith("https://")) or len(s) < 10:
        raise ValueError("must be an http:// or https:// URL")
    return s.rstrip("/")


def _endpoint(v: Any) -> str:
    s = _str(v)
    if s and not (s.startswith("ipc://") or s.startswith("tcp://")):
        raise ValueError("must be an ipc:// or tcp:// ZeroMQ address")
    return s


@dataclass(frozen=True)
class Option:
    name: str
    parse: Callable[[Any], Any]
    default: Any
    help: str
    metavar: str = "VALUE"

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


OPTIONS: Tuple[Option, ...] = (
    # Where things are.
    Option("collector", _url, "http://127.0.0.1:9095", "Snowplow collector base URL", "URL"),
    Option("method", _choice("post", "get"), "post", "POST batches to /tp2, or GET /i per event"),
    Option("store", _str, ".sp-pipeline/events.db", "SQLite database file", "PATH"),
    Option("run_dir", _str, ".sp-pipeline/run", "pidfile, sockets, metrics files (created 0700)", "DIR"),
    Option("ingest", _endpoint, "", "ZeroMQ endpoint producers connect to "
           "(default ipc://RUN_DIR/ingest.sock)", "ENDPOINT"),
    Option("ingest_allow_remote", _bool, False, "allow tcp:// ingest on a non-loopback address"),
    Option("ingest_curve_secret_key", _str, "", "Z85 CURVE secret key of the ingest socket "
           "(enables CURVE authentication)", "KEY"),
    Option("ingest_curve_client_keys", _str, "", "file of allowed producer Z85 public keys, "
           "one per line", "PATH"),
    Option("metrics_addr", _host_port, "127.0.0.1:9465", "where the exporter serves /metrics", "HOST:PORT"),
    Option("senders", _positive_int, 2, "number of sender processes", "N"),
    Option("log_format", _choice("text", "json"), "text", "log lines as plain text or JSON"),
    Option("log_level", _choice("debug", "info", "warning", "error"), "info", "log level"),
    Option("drain_timeout", _positive_float, 10.0, "seconds allowed for a graceful stop", "SECONDS"),
    # Writer and store.
    Option("synchronous", _choice("normal", "full"), "normal", "SQLite synchronous mode "
           "(full survives power loss)"),
    Option("commit_max_events", _positive_int, 5000, "events per commit at most", "N"),
    Option("commit_interval_ms", _positive_float, 5.0, "longest wait before a commit", "MS"),
    Option("max_queued_events", _positive_int, 10_000_000, "cap on queued events", "N"),
    Option("max_queued_bytes", _positive_int, 4 << 30, "cap on queued payload bytes", "BYTES"),
    Option("when_full", _choice("block", "drop_oldest"), "block", "what happens at the cap"),
    Option("max_dead_letters", _positive_int, 1_000_000, "cap on dead letters (the oldest are "
           "deleted beyond it, counted)", "N"),
    Option("max_event_bytes", _positive_int, 1 << 20, "largest accepted event payload", "BYTES"),
    Option("lease_seconds", _positive_float, 30.0, "lease lifetime (longer than a request)", "SECONDS"),
    Option("wal_max_bytes", _positive_int, 64 << 20, "WAL size that forces a truncating checkpoint", "BYTES"),
    # Senders.
    Option("byte_limit", _positive_int, 40000, "POST body byte limit", "BYTES"),
    Option("batch_max_events", _positive_int, 500, "events per request at most", "N"),
    Option("inflight", _positive_int, 8, "requests in flight per sender", "N"),
    Option("connect_timeout", _positive_float, 3.0, "HTTP connect timeout", "SECONDS"),
    Option("read_timeout", _positive_float, 5.0, "HTTP read timeout", "SECONDS"),
    Option("gzip", _bool, False, "gzip POST bodies"),
    Option("ca_bundle", _str, "", "CA bundle for https collectors (default: system)", "PATH"),
    Option("retry_base", _positive_float, 0.5, "first retry delay", "SECONDS"),
    Option("retry_max_delay", _positive_float, 60.0, "longest retry delay", "SECONDS"),
    Option("retry_max_attempts", _positive_int, 50, "attempts before dead-lettering", "N"),
    Option("retry_max_age", _positive_float, 7 * 86400.0, "age before dead-lettering", "SECONDS"),
    Option("dead_letter_statuses", _statuses, (400, 401, 403, 410, 413, 422),
           "statuses that dead-letter a batch at once", "CODES"),
)

OPTIONS_BY_NAME: Dict[str, Option] = {o.name: o for o in OPTIONS}


@dataclass(frozen=True)
class Settings:
    collector: str
    method: str
    store: str
    run_dir: str
    ingest: str
    ingest_allow_remote: bool
    ingest_curve_secret_key: str
    ingest_curve_client_keys: str
    metrics_addr: str
    senders: int
    log_format: str
    log_level: str
    drain_timeout: float
    synchronous: str
    commit_max_events: int
    commit_interval_ms: float
    max_queued_events: int
    max_queued_bytes: int
    when_full: str
    max_dead_letters: int
    max_event_bytes: int
    lease_seconds: float
    wal_max_bytes: int
    byte_limit: int
    batch_max_events: int
    inflight: int
    connect_timeout: float
    read_timeout: float
    gzip: bool
    ca_bundle: str
    retry_base: float
    retry_max_delay: float
    retry_max_attempts: int
    retry_max_age: float
    dead_letter_statuses: Tuple[int, ...]

    @property
    def ingest_endpoint(self) -> str:
        return self.ingest or f"ipc://{os.path.abspath(self.run_dir)}/ingest.sock"

    @property
    def lease_endpoint(self) -> str:
        return f"ipc://{os.path.abspath(self.run_dir)}/lease.sock"

    @property
    def metrics_dir(self) -> str:
        return os.path.join(os.path.abspath(self.run_dir), "metrics")

    @property
    def pidfile(self) -> str:
        return os.path.join(os.path.abspath(self.run_dir), "sp-pipeline.pid")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Settings":
        raw = json.loads(text)
        raw["dead_letter_statuses"] = tuple(raw["dead_letter_statuses"])
        return cls(**raw)

    def replace(self, **changes: Any) -> "Settings":
        return dataclasses.replace(self, **changes)


def _check_declared() -> None:
    fields = [f.name for f in dataclasses.fields(Settings)]
    if fields != [o.name for o in OPTIONS]:
        raise AssertionError("Settings fields and OPTIONS are out of step")


_check_declared()


def _apply(option: Option, raw: Any, source: str) -> Any:
    try:
        return option.parse(raw)
    except ValueError as exc:
        raise ConfigError(f"{option.name} (from {source}): {raw!r} {exc}") from None


def load(
    flags: Optional[Mapping[str, Any]] = None,
    env: Optional[Mapping[str, str]] = None,
    config_file: Optional[str] = None,
) -> Settings:
    """Build Settings from flags (option name -> raw value, None meaning unset), the
    environment and an optional TOML file. Raises ConfigError naming the option, the
    source and the rule."""
    flags = flags or {}
    env = os.environ if env is None else env
    file_values: Dict[str, Any] = {}
    if config_file:
        file_values = read_toml(config_file)
    values: Dict[str, Any] = {}
    for opt in OPTIONS:
        if flags.get(opt.name) is not None:
            values[opt.name] = _apply(opt, flags[opt.name], opt.flag)
        elif opt.env in env:
            values[opt.name] = _apply(opt, env[opt.env], opt.env)
        elif opt.name in file_values:
            values[opt.name] = _apply(opt, file_values[opt.name], config_file or "file")
        else:
            values[opt.name] = opt.default
    settings = Settings(**values)
    check(settings)
    return settings


def read_toml(path: str) -> Dict[str, Any]:
    import tomllib  # here, not at import: roles read JSON settings and never need it

    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot read ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: not valid TOML ({exc})") from None
    out: Dict[str, Any] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in OPTIONS_BY_NAME:
            raise ConfigError(f"config file {path}: unknown option {key!r}")
        out[name] = value
    return out


def check(s: Settings) -> None:
    """Rules that involve several options."""
    if s.lease_seconds <= s.connect_timeout + s.read_timeout:
        raise ConfigError(
            "lease_seconds must be longer than connect_timeout + read_timeout "
            f"({s.lease_seconds:g} <= {s.connect_timeout + s.read_timeout:g})"
        )
    if s.retry_max_delay < s.retry_base:
        raise ConfigError("retry_max_delay must be at least retry_base")
    if s.byte_limit < 200:
        raise ConfigError("byte_limit must be at least 200 bytes")
    endpoint = s.ingest_endpoint
    if endpoint.startswith("tcp://") and not s.ingest_allow_remote:
        host = endpoint[len("tcp://"):].rpartition(":")[0]
        if host not in ("127.0.0.1", "localhost", "[::1]", "::1"):
            raise ConfigError(
                f"ingest {endpoint}: tcp ingest must bind to loopback unless "
                "ingest_allow_remote is true"
            )


def as_dict(s: Settings) -> Dict[str, Any]:
    d = dataclasses.asdict(s)
    d["dead_letter_statuses"] = list(s.dead_letter_statuses)
    return d


def defaults() -> Settings:
    return load({}, env={})


def add_arguments(parser: Any, names: Optional[Sequence[str]] = None) -> None:
    """Add one argparse flag per option (default None so that precedence works)."""
    for opt in OPTIONS:
        if names is not None and opt.name not in names:
            continue
        choices = getattr(opt.parse, "choices", None)
        parser.add_argument(
            opt.flag,
            dest=opt.name,
            default=None,
            metavar=opt.metavar if not choices else None,
            choices=choices,
            help=f"{opt.help} (env {opt.env}, default {opt.default!r})",
        )


def flags_from_namespace(ns: Any) -> Dict[str, Any]:
    return {o.name: getattr(ns, o.name, None) for o in OPTIONS}


__all__ = ["OPTIONS", "Option", "Settings", "load", "defaults", "add_arguments"]


def render_markdown() -> str:
    """``docs/configuration.md``, generated from OPTIONS (a test keeps the file in step)."""
    lines = [
        "# Configuration",
        "",
        "Generated from `sp_pipeline/config.py` (`python -m sp_pipeline.config > "
        "docs/configuration.md`); a test fails when this file and the code disagree.",
        "",
        "Every option can be given as a command-line flag, as an environment variable or as "
        "a key of the TOML file named by `--config` (or `SP_PIPELINE_CONFIG`). Precedence: "
        "flag, then environment, then file, then default. `sp-pipeline check-config` prints "
        "the effective values.",
        "",
        "| option (TOML key) | flag | environment | default | meaning |",
        "|---|---|---|---|---|",
    ]
    for o in OPTIONS:
        default = o.default
        if isinstance(default, tuple):
            default = ",".join(map(str, default))
        choices = getattr(o.parse, "choices", None)
        meaning = o.help + (f" (one of: {', '.join(choices)})" if choices else "")
        lines.append(f"| `{o.name}` | `{o.flag}` | `{o.env}` | `{default!s}` | {meaning} |")
    lines += [
        "",
        "Example TOML file:",
        "",
        "```toml",
        'collector = "https://collector.example.com"',
        'store = "/var/lib/sp-pipeline/events.db"',
        'run_dir = "/run/sp-pipeline"',
        "senders = 2",
        'when_full = "block"',
        "dead_letter_statuses = [400, 401, 403, 410, 413, 422]",
        "```",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(render_markdown(), end="")
