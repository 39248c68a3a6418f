"""Settings: precedence, parse errors naming option and source, cross-option rules,
JSON round trip."""

from __future__ import annotations

import dataclasses

import pytest

from sp_pipeline import config
from sp_pipeline.config import OPTIONS, Settings, load
from sp_pipeline.errors import ConfigError


def write_toml(tmp_path, text: str) -> str:
    path = tmp_path / "sp.toml"
    path.write_text(text)
    return str(path)


# ----------------------------------------------------------------------- precedence


def test_defaults_when_nothing_is_given():
    s = load({}, env={})
    for opt in OPTIONS:
        assert getattr(s, opt.name) == opt.default, opt.name


def test_precedence_flag_over_env_over_file_over_default(tmp_path):
    toml = write_toml(tmp_path, "senders = 3\ncommit_max_events = 700\nbyte_limit = 9000\n")
    env = {"SP_PIPELINE_SENDERS": "5", "SP_PIPELINE_COMMIT_MAX_EVENTS": "800"}
    s = load({"senders": "7"}, env=env, config_file=toml)
    assert s.senders == 7  # flag beats env and file
    assert s.commit_max_events == 800  # env beats file
    assert s.byte_limit == 9000  # file beats default
    assert s.inflight == config.OPTIONS_BY_NAME["inflight"].default


def test_a_flag_of_none_is_unset(tmp_path):
    s = load({"senders": None}, env={"SP_PIPELINE_SENDERS": "4"})
    assert s.senders == 4


def test_toml_keys_may_use_dashes(tmp_path):
    s = load({}, env={}, config_file=write_toml(tmp_path, "batch-max-events = 42\n"))
    assert s.batch_max_events == 42


def test_env_names_come_from_the_option_names():
    assert {o.env for o in OPTIONS} >= {"SP_PIPELINE_COLLECTOR", "SP_PIPELINE_WHEN_FULL"}
    assert all(o.flag == "--" + o.name.replace("_", "-") for o in OPTIONS)


# ----------------------------------------------------------------------- parse errors


@pytest.mark.parametrize(
    "name, raw, rule",
    [
        ("senders", "0", "positive integer"),
        ("senders", "two", "integer"),
        ("commit_interval_ms", "-1", "positive"),
        ("drain_timeout", "inf", "finite"),
        ("when_full", "explode", "block, drop_oldest"),
        ("gzip", "maybe", "true or false"),
        ("collector", "ftp://x.example", "http"),
        ("metrics_addr", "nowhere", "HOST:PORT"),
        ("ingest", "udp://1.2.3.4:5", "ipc:// or tcp://"),
        ("dead_letter_statuses", "400,999", "999 is not an HTTP status"),
    ],
)
def test_a_bad_flag_names_option_source_and_rule(name, raw, rule):
    opt = config.OPTIONS_BY_NAME[name]
    with pytest.raises(ConfigError) as info:
        load({name: raw}, env={})
    msg = str(info.value)
    assert msg.startswith(f"{name} (from {opt.flag})")
    assert rule in msg and repr(raw) in msg


def test_a_bad_env_value_names_the_variable():
    with pytest.raises(ConfigError, match=r"senders \(from SP_PIPELINE_SENDERS\).*positive"):
        load({}, env={"SP_PIPELINE_SENDERS": "-2"})


def test_a_bad_file_value_names_the_file(tmp_path):
    toml = write_toml(tmp_path, 'retry_max_attempts = "lots"\n')
    with pytest.raises(ConfigError, match=rf"retry_max_attempts \(from {toml}\).*integer"):
        load({}, env={}, config_file=toml)


def test_a_bool_is_not_an_integer(tmp_path):
    toml = write_toml(tmp_path, "senders = true\n")
    with pytest.raises(ConfigError, match="senders"):
        load({}, env={}, config_file=toml)


def test_unknown_toml_key_is_refused_by_name(tmp_path):
    toml = write_toml(tmp_path, "senders = 2\nsendrs = 3\n")
    with pytest.raises(ConfigError, match=r"unknown option 'sendrs'") as info:
        load({}, env={}, config_file=toml)
    assert toml in str(info.value)


def test_malformed_toml_is_refused_with_the_file_name(tmp_path):
    toml = write_toml(tmp_path, "senders = [\n")
    with pytest.raises(ConfigError, match="not valid TOML") as info:
        load({}, env={}, config_file=toml)
    assert toml in str(info.value)


def test_missing_config_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load({}, env={}, config_file=str(tmp_path / "absent.toml"))


# ----------------------------------------------------------------------- cross-option rules


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "example.com"])
def test_tcp_ingest_on_a_non_loopback_host_is_refused(host):
    with pytest.raises(ConfigError, match="loopback.*ingest_allow_remote"):
        load({"ingest": f"tcp://{host}:5555"}, env={})


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]"])
def test_tcp_ingest_on_loopback_is_allowed(host):
    assert load({"ingest": f"tcp://{host}:5555"}, env={}).ingest_endpoint == f"tcp://{host}:5555"


def test_tcp_ingest_on_any_host_when_allowed():
    s = load({"ingest": "tcp://0.0.0.0:5555", "ingest_allow_remote": "true"}, env={})
    assert s.ingest_allow_remote is True


def test_lease_must_outlast_a_request():
    with pytest.raises(ConfigError, match="lease_seconds must be longer"):
        load({"lease_seconds": "8", "connect_timeout": "3", "read_timeout": "5"}, env={})
    s = load({"lease_seconds": "8.5", "connect_timeout": "3", "read_timeout": "5"}, env={})
    assert s.lease_seconds == 8.5


def test_retry_max_delay_at_least_retry_base():
    with pytest.raises(ConfigError, match="retry_max_delay"):
        load({"retry_base": "10", "retry_max_delay": "5"}, env={})


def test_byte_limit_floor():
    with pytest.raises(ConfigError, match="byte_limit"):
        load({"byte_limit": "100"}, env={})


# ----------------------------------------------------------------------- derived and JSON


def test_default_ingest_is_ipc_inside_the_run_dir(tmp_path):
    s = load({"run_dir": str(tmp_path / "run")}, env={})
    assert s.ingest_endpoint == f"ipc://{tmp_path}/run/ingest.sock"
    assert s.lease_endpoint == f"ipc://{tmp_path}/run/lease.sock"
    assert s.metrics_dir == str(tmp_path / "run" / "metrics")


def test_settings_json_round_trip(tmp_path):
    s = load({"senders": "3", "dead_letter_statuses": "413,400", "gzip": "yes",
              "store": str(tmp_path / "e.db"), "commit_interval_ms": "2.5"}, env={})
    back = Settings.from_json(s.to_json())
    assert back == s
    assert back.dead_letter_statuses == (400, 413)
    assert isinstance(back.dead_letter_statuses, tuple)


def test_settings_are_immutable():
    s = config.defaults()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.senders = 9  # type: ignore[misc]
    assert s.replace(senders=9).senders == 9 and s.senders == 2
