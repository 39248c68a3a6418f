"""metrics.observe_many must expose exactly what per-value observe() would."""

from hypothesis import given, settings, strategies as st
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from sp_pipeline.metrics import observe_many

BUCKETS = (0.001, 0.01, 0.1, 1.0, 10.0)


def _samples(name, registry):
    return [line.split(" ", 1)[1] for line in generate_latest(registry).decode().splitlines()
            if line.startswith(name + "_") and "_created" not in line]


@settings(max_examples=100)
@given(st.lists(st.floats(min_value=0, max_value=100, allow_nan=False), max_size=50))
def test_same_exposition_as_observe(values):
    registry = CollectorRegistry()
    one = Histogram("one", "per value", buckets=BUCKETS, registry=registry)
    many = Histogram("many", "batched", buckets=BUCKETS, registry=registry)
    for v in values:
        one.observe(v)
    observe_many(many, values)
    expected, got = _samples("one", registry), _samples("many", registry)
    assert got[:-1] == expected[:-1]  # buckets and count
    assert abs(float(got[-1]) - float(expected[-1])) < 1e-6  # sum, float rounding aside


def test_boundary_values_land_in_their_own_bucket():
    registry = CollectorRegistry()
    h = Histogram("edge", "edges", buckets=BUCKETS, registry=registry)
    observe_many(h, [0.01, 1.0])
    lines = dict(line.rsplit(" ", 1) for line in generate_latest(registry).decode().splitlines()
                 if line.startswith("edge_bucket"))
    assert lines['edge_bucket{le="0.001"}'] == "0.0"
    assert lines['edge_bucket{le="0.01"}'] == "1.0"
    assert lines['edge_bucket{le="1.0"}'] == "2.0"
