"""The Grafana dashboard and the Prometheus alert rules in ``sp_pipeline/grafana/``.

No pipeline runs here: the dashboard's structure is checked in Python, and every PromQL
expression (dashboard targets and alert rules) goes through ``promtool``: the rule file
as it is (``promtool check rules``), the dashboard's expressions as recording rules of a
generated file, and the alerts' behaviour on synthetic series (``promtool test rules``).
Tests that need promtool skip when it is not installed (``scripts/test`` installs it).

The helpers ``dashboard_expressions``, ``alert_rules``, ``metric_names`` and
``promtool_path`` are also used by ``tests/integration/test_metrics.py``, which checks
the names against a real scrape.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple

import pytest

GRAFANA_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "sp_pipeline", "grafana")
DASHBOARD_PATH = os.path.normpath(os.path.join(GRAFANA_DIR, "sp-pipeline-dashboard.json"))
ALERTS_PATH = os.path.normpath(os.path.join(GRAFANA_DIR, "alerts.yml"))

_METRIC_NAME = re.compile(r"\bsp_pipeline_[a-z_]+\b")
# Grafana's interval variables stand for durations; every other variable in our
# expressions sits inside a regex matcher (job=~"$job"), where ".*" means "all".
_INTERVAL_VARIABLE = re.compile(r"\$(?:\{__(?:rate_interval|interval|range)\}|__(?:rate_interval|interval|range)\b)")
_OTHER_VARIABLE = re.compile(r"\$(?:\{\w+\}|\w+)")


# ---------------------------------------------------------------- helpers (shared)

def load_dashboard() -> Dict[str, Any]:
    with open(DASHBOARD_PATH) as fh:
        return json.load(fh)


def iter_panels(panels: List[Dict[str, Any]]) -> Iterator[Dict[str, Any]]:
    """Every panel, rows' nested (collapsed) panels included; rows themselves too."""
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels", []))


def dashboard_expressions(dashboard: Optional[Dict[str, Any]] = None) -> List[str]:
    """The PromQL of every panel target, as written (Grafana variables unexpanded)."""
    dashboard = dashboard or load_dashboard()
    return [t["expr"] for p in iter_panels(dashboard["panels"]) for t in p.get("targets", [])]


def template_queries(dashboard: Optional[Dict[str, Any]] = None) -> List[str]:
    """The queries of the ``query`` template variables (``label_values(...)``)."""
    dashboard = dashboard or load_dashboard()
    out = []
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]
            out.append(query["query"] if isinstance(query, dict) else query)
    return out


def expand_variables(expr: str) -> str:
    """PromQL that Prometheus can parse: interval variables -> ``1m``, others -> ``.*``."""
    return _OTHER_VARIABLE.sub(".*", _INTERVAL_VARIABLE.sub("1m", expr))


def alert_rules() -> List[Dict[str, Any]]:
    """The rules of ``alerts.yml`` as dicts (alert, expr, for, labels, annotations)."""
    with open(ALERTS_PATH) as fh:
        doc = read_yaml_subset(fh.read())
    groups = doc["groups"]
    assert len(groups) == 1, "alerts.yml must hold exactly one group"
    return groups[0]["rules"]


def metric_names(exprs: List[str]) -> Set[str]:
    """Every ``sp_pipeline_*`` identifier in the expressions (sample names as exposed,
    so histograms appear as ``..._bucket``, counters as ``..._total``)."""
    return {name for expr in exprs for name in _METRIC_NAME.findall(expr)}


def promtool_path() -> str:
    """Path of promtool, or skip the calling test."""
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not installed (Debian package 'prometheus'; scripts/test installs it)")
    return path


def run_promtool(*args: str, stdin: Optional[bytes] = None) -> subprocess.CompletedProcess:
    return subprocess.run([promtool_path(), *args], input=stdin, capture_output=True,
                          timeout=60)


# ---------------------------------------------------------------- a YAML subset reader

def read_yaml_subset(text: str) -> Any:
    """Parse the YAML subset ``alerts.yml`` uses (PyYAML is not a dependency).

    Supported: block mappings, block sequences of mappings (``- key: value``),
    plain, single- and double-quoted scalars, folded scalars (``>-``, ``>``) and
    whole-line comments. Anything else raises ValueError, so the file cannot drift into
    syntax this reader would misread without a test failing.
    """
    tokens = _tokens(text)
    value, end = _block(tokens, 0, tokens[0][0])
    if end != len(tokens):
        raise ValueError(f"unexpected indentation at {tokens[end]}")
    return value


_LINE = re.compile(r"^(?P<indent> *)(?P<dash>- +)?(?P<key>[A-Za-z_][\w-]*):(?: +(?P<value>.*))?$")


def _tokens(text: str) -> List[Tuple[int, bool, str, Any]]:
    """(key column, starts a sequence item, key, scalar value or None for a block)."""
    lines = text.splitlines()
    out: List[Tuple[int, bool, str, Any]] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = _LINE.match(line)
        if m is None:
            raise ValueError(f"unsupported YAML line: {line!r}")
        column = len(m["indent"]) + len(m["dash"] or "")
        raw = (m["value"] or "").strip()
        if raw in (">", ">-"):
            folded: List[str] = []
            while i < len(lines) and (not lines[i].strip()
                                      or len(lines[i]) - len(lines[i].lstrip()) > column):
                folded.append(lines[i].strip())
                i += 1
            value: Any = " ".join(folded).strip() + ("\n" if raw == ">" else "")
        elif raw == "":
            value = None
        else:
            value = _scalar(raw)
        out.append((column, bool(m["dash"]), m["key"], value))
    return out


def _scalar(raw: str) -> str:
    if raw.startswith('"'):
        return json.loads(raw)  # our double-quoted strings use no YAML-only escapes
    if raw.startswith("'"):
        if not raw.endswith("'"):
            raise ValueError(f"unterminated quoted scalar: {raw!r}")
        return raw[1:-1].replace("''", "'")
    if " #" in raw or raw[0] in "[{&*!|%@`":
        raise ValueError(f"unsupported plain scalar: {raw!r}")
    return raw


def _block(tokens, pos: int, column: int) -> Tuple[Any, int]:
    if tokens[pos][1]:
        items = []
        while pos < len(tokens) and tokens[pos][0] == column and tokens[pos][1]:
            item, pos = _mapping(tokens, pos, column, first_is_item=True)
            items.append(item)
        return items, pos
    return _mapping(tokens, pos, column, first_is_item=False)


def _mapping(tokens, pos: int, column: int, first_is_item: bool) -> Tuple[Dict[str, Any], int]:
    out: Dict[str, Any] = {}
    first = True
    while pos < len(tokens) and tokens[pos][0] == column and (first or not tokens[pos][1]):
        if tokens[pos][1] and not first_is_item:
            break
        _, _, key, value = tokens[pos]
        first = False
        pos += 1
        if value is None:
            if pos >= len(tokens) or tokens[pos][0] <= column:
                raise ValueError(f"key {key!r} has no value")
            value, pos = _block(tokens, pos, tokens[pos][0])
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out, pos


# ---------------------------------------------------------------- dashboard structure

def _datasource_uid(ds: Any) -> Optional[str]:
    return ds.get("uid") if isinstance(ds, dict) else ds


def test_dashboard_is_a_grafana_model_with_a_prometheus_datasource_variable():
    dash = load_dashboard()
    assert dash["uid"] and dash["title"]
    assert 36 <= dash["schemaVersion"] <= 41
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("job", "instance"):
        assert _datasource_uid(variables[name]["datasource"]) == "${datasource}"


def test_every_panel_and_target_uses_the_datasource_variable():
    panels = [p for p in iter_panels(load_dashboard()["panels"]) if p["type"] != "row"]
    assert len(panels) >= 15
    for panel in panels:
        where = f"panel {panel['title']!r}"
        assert panel["type"] in ("timeseries", "stat"), where
        assert _datasource_uid(panel["datasource"]) == "${datasource}", where
        assert panel["targets"], where
        for target in panel["targets"]:
            assert _datasource_uid(target["datasource"]) == "${datasource}", where
            assert target["expr"].strip(), where


def test_every_panel_has_a_description_and_a_unit():
    for panel in iter_panels(load_dashboard()["panels"]):
        if panel["type"] != "row":
            assert len(panel.get("description", "")) > 20, panel["title"]
            assert panel["fieldConfig"]["defaults"]["unit"], panel["title"]


def test_panels_have_unique_ids_and_do_not_overlap():
    cells: Dict[Tuple[int, int], str] = {}
    ids = set()
    for panel in iter_panels(load_dashboard()["panels"]):
        assert panel["id"] not in ids, f"duplicate panel id {panel['id']}"
        ids.add(panel["id"])
        g = panel["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, panel["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]


@pytest.mark.parametrize("needle", [
    "rate(sp_pipeline_ingest_events_total",
    'sp_pipeline_sender_events_total{job=~"$job", instance=~"$instance", outcome="delivered"}',
    "sp_pipeline_store_queued_events",
    "sp_pipeline_store_leased_events",
    "sp_pipeline_store_oldest_event_age_seconds",
    'outcome=~"retried|dead_lettered"',
    "sp_pipeline_store_dead_letter_events",
    "sum by (reason) (rate(sp_pipeline_store_dead_lettered_events_total",
    "sum by (code) (rate(sp_pipeline_sender_requests_total",
    "sum by (role) (increase(sp_pipeline_process_restarts_total",
    "sp_pipeline_store_full",
    "sp_pipeline_store_wal_bytes",
])
def test_dashboard_shows(needle):
    assert any(needle in expr for expr in dashboard_expressions()), needle


@pytest.mark.parametrize("histogram", [
    "sp_pipeline_sender_request_seconds",
    "sp_pipeline_store_commit_seconds",
    "sp_pipeline_delivery_latency_seconds",
])
def test_dashboard_shows_p50_p90_p99_of(histogram):
    exprs = dashboard_expressions()
    for q in ("0.5", "0.9", "0.99"):
        assert any(expr.startswith(f"histogram_quantile({q},") and f"{histogram}_bucket" in expr
                   and "by (le)" in expr for expr in exprs), (histogram, q)


def test_expand_variables():
    assert expand_variables('rate(x{job=~"$job"}[$__rate_interval])') == 'rate(x{job=~".*"}[1m])'
    assert expand_variables("increase(x[${__range}])") == "increase(x[1m])"
    assert expand_variables('x{i=~"${instance}"}') == 'x{i=~".*"}'


# ---------------------------------------------------------------- alert rules

def test_yaml_subset_reader():
    doc = read_yaml_subset(
        "# c\na:\n  - name: 'it''s'\n    b:\n      c: \"q\\\"\"\n    d: >-\n      x\n      y\n"
        "  - name: n2\ne: plain text\n")
    assert doc == {"a": [{"name": "it's", "b": {"c": 'q"'}, "d": "x y"}, {"name": "n2"}],
                   "e": "plain text"}
    with pytest.raises(ValueError):
        read_yaml_subset("a: [1, 2]\n")


def test_every_alert_has_for_severity_summary_and_description():
    rules = alert_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names)) >= 6
    for rule in rules:
        assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_alert_rule_file_passes_promtool():
    result = run_promtool("check", "rules", ALERTS_PATH)
    out = result.stdout.decode() + result.stderr.decode()
    assert result.returncode == 0, out
    assert f"SUCCESS: {len(alert_rules())} rules found" in out  # the reader saw them all


def test_dashboard_expressions_parse(tmp_path):
    exprs = [expand_variables(e) for e in dashboard_expressions()]
    rules = [{"record": f"check:expr_{i}", "expr": e} for i, e in enumerate(exprs)]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))  # JSON is YAML
    result = run_promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


def test_template_queries_name_existing_selectors():
    # label_values(metric{...}, label) is Grafana syntax, not PromQL; check its selector.
    for query in template_queries():
        m = re.fullmatch(r"label_values\((?P<selector>.+), *(?P<label>\w+)\)", query)
        assert m, query
        assert metric_names([m["selector"]]) == {"sp_pipeline_store_queued_events"}


# ---------------------------------------------------------------- alert behaviour

def _series(name: str, values: str, instance: str = "a", **labels: str) -> Dict[str, str]:
    all_labels = {"job": "sp", "instance": instance, **labels}
    inner = ",".join(f'{k}="{v}"' for k, v in sorted(all_labels.items()))
    return {"series": f"{name}{{{inner}}}", "values": values}


def _expect(alert: str, at: str, *firing: Dict[str, str]) -> Dict[str, Any]:
    return {"eval_time": at, "alertname": alert, "exp_alerts": [
        {"exp_labels": labels} for labels in firing]}


def _rule_test(tmp_path, series: List[Dict[str, str]], tests: List[Dict[str, Any]]) -> None:
    """Run ``promtool test rules`` on the rules of alerts.yml without their annotations
    (promtool compares rendered annotations; the prose is not what is tested here)."""
    rules = [{k: v for k, v in r.items() if k != "annotations"} for r in alert_rules()]
    rules_path = tmp_path / "alerts-under-test.yml"
    rules_path.write_text(json.dumps({"groups": [{"name": "sp-pipeline", "rules": rules}]}))
    test_path = tmp_path / "alerts-test.yml"
    test_path.write_text(json.dumps({
        "rule_files": [str(rules_path)], "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": series, "alert_rule_test": tests}],
    }))
    result = run_promtool("test", "rules", str(test_path))
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


def _fired(severity: str, instance: str = "a", **labels: str) -> Dict[str, str]:
    return {"job": "sp", "instance": instance, "severity": severity, **labels}


def test_store_full_and_oldest_event_alerts(tmp_path):
    promtool_path()
    _rule_test(tmp_path, [
        _series("sp_pipeline_store_full", "0 0 1x20"),
        _series("sp_pipeline_store_oldest_event_age_seconds", "0+60x30"),  # 60 s per minute
    ], [
        _expect("SpPipelineStoreFull", "2m"),  # full, but not for 1m yet
        _expect("SpPipelineStoreFull", "4m", _fired("critical")),
        _expect("SpPipelineOldestEventTooOld", "20m"),  # above 900 s from 16m, for 5m
        _expect("SpPipelineOldestEventTooOld", "21m", _fired("critical")),
    ])


def test_no_deliveries_fires_even_before_the_first_delivery(tmp_path):
    promtool_path()
    _rule_test(tmp_path, [
        # a: events wait, nothing was ever delivered (no delivered series at all)
        _series("sp_pipeline_store_queued_events", "50x20", "a"),
        # b: events wait but senders deliver
        _series("sp_pipeline_store_queued_events", "50x20", "b"),
        _series("sp_pipeline_sender_events_total", "0+100x20", "b", outcome="delivered"),
        # c: delivered once, then stuck
        _series("sp_pipeline_store_queued_events", "50x20", "c"),
        _series("sp_pipeline_sender_events_total", "0 100 200 200x17", "c", outcome="delivered"),
        # d: idle, nothing waits
        _series("sp_pipeline_store_queued_events", "0x20", "d"),
    ], [
        _expect("SpPipelineNoDeliveries", "4m"),  # waiting, but not for 5m yet
        _expect("SpPipelineNoDeliveries", "6m", _fired("critical", "a")),
        _expect("SpPipelineNoDeliveries", "14m", _fired("critical", "a"), _fired("critical", "c")),
    ])


def test_dead_letters_alert_catches_the_first_batch(tmp_path):
    promtool_path()
    _rule_test(tmp_path, [
        # the reason's counter appears already at 5: increase() alone would miss it
        _series("sp_pipeline_store_dead_lettered_events_total", "_x5 5x30", reason="status_400"),
        _series("sp_pipeline_store_dead_letter_events", "0x5 5x30"),
        # b: a later batch on an existing series
        _series("sp_pipeline_store_dead_lettered_events_total", "1x10 4x20", "b", reason="x"),
        _series("sp_pipeline_store_dead_letter_events", "1x30", "b"),  # purged meanwhile
    ], [
        _expect("SpPipelineDeadLettersRising", "4m"),
        _expect("SpPipelineDeadLettersRising", "8m", _fired("warning", "a")),
        _expect("SpPipelineDeadLettersRising", "13m", _fired("warning", "a"),
                _fired("warning", "b")),
        _expect("SpPipelineDeadLettersRising", "27m"),  # quiet for 15 minutes: resolved
    ])


def test_restart_and_backlog_alerts(tmp_path):
    promtool_path()
    _rule_test(tmp_path, [
        _series("sp_pipeline_process_restarts_total", "0 1 2 3 3x20", role="sender"),
        _series("sp_pipeline_process_restarts_total", "0 1 2 2x20", role="writer"),
        _series("sp_pipeline_store_queued_events", "2000+100x40", "a"),
        _series("sp_pipeline_store_queued_events", "0+20x40", "small"),  # grows, under floor
        _series("sp_pipeline_store_queued_events", "5000x40", "flat"),
    ], [
        _expect("SpPipelineRoleRestarting", "5m", _fired("warning", role="sender")),
        _expect("SpPipelineRoleRestarting", "30m"),
        _expect("SpPipelineBacklogGrowing", "10m"),  # deriv needs 2 samples; for 15m
        _expect("SpPipelineBacklogGrowing", "20m", _fired("warning", "a")),
    ])
