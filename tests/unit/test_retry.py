"""Delivery policy arithmetic: injected clock and seeded RNG, no sleeping."""

from __future__ import annotations

import random
from email.utils import format_datetime
from datetime import datetime, timezone

import pytest

from sp_pipeline import config
from sp_pipeline.retry import (
    RETRY_AFTER_CAP,
    Outcome,
    Pause,
    RetryPolicy,
    classify,
    parse_retry_after,
)
from sp_pipeline.store.base import QueuedEvent

NOW = 1_700_000_000.0
NO_JITTER = RetryPolicy(jitter=0.0)


class FixedRandom(random.Random):
    """Returns the same draw every time: pins jitter to an edge."""

    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value
        self.draws = 0

    def random(self) -> float:
        self.draws += 1
        return self.value


# ---------------------------------------------------------------- classification

@pytest.mark.parametrize(
    "status, outcome",
    [
        (200, Outcome.DELIVERED), (201, Outcome.DELIVERED), (204, Outcome.DELIVERED),
        (299, Outcome.DELIVERED),
        (500, Outcome.RETRY), (502, Outcome.RETRY), (503, Outcome.RETRY), (504, Outcome.RETRY),
        (408, Outcome.RETRY), (429, Outcome.RETRY), (None, Outcome.RETRY),
        (400, Outcome.DEAD), (401, Outcome.DEAD), (403, Outcome.DEAD), (410, Outcome.DEAD),
        (413, Outcome.DEAD), (422, Outcome.DEAD),
        # Decided here: redirects, other 4xx and oddities are retried (module docstring).
        (301, Outcome.RETRY), (302, Outcome.RETRY), (307, Outcome.RETRY), (308, Outcome.RETRY),
        (404, Outcome.RETRY), (405, Outcome.RETRY), (409, Outcome.RETRY), (100, Outcome.RETRY),
        (600, Outcome.RETRY),
    ],
)
def test_classification_table(status, outcome):
    assert classify(status) is outcome
    assert RetryPolicy().classify(status) is outcome


def test_dead_letter_statuses_are_configurable():
    policy = RetryPolicy(dead_letter_statuses=frozenset({404}))
    assert policy.classify(404) is Outcome.DEAD
    assert policy.classify(400) is Outcome.RETRY


def test_2xx_wins_over_a_misconfigured_dead_letter_list():
    assert classify(200, frozenset({200})) is Outcome.DELIVERED


def test_from_settings_reads_every_retry_option():
    s = config.defaults().replace(
        retry_base=0.25, retry_max_delay=30.0, retry_max_attempts=7,
        retry_max_age=3600.0, dead_letter_statuses=(400, 404),
    )
    p = RetryPolicy.from_settings(s)
    assert (p.base, p.max_delay, p.max_attempts, p.max_age) == (0.25, 30.0, 7, 3600.0)
    assert p.dead_letter_statuses == frozenset({400, 404})
    assert RetryPolicy.from_settings(config.defaults()) == RetryPolicy()


@pytest.mark.parametrize(
    "kwargs",
    [dict(base=0), dict(base=2.0, max_delay=1.0), dict(max_attempts=0), dict(max_age=0),
     dict(jitter=-0.1), dict(jitter=1.5), dict(max_delay=float("inf"))],
)
def test_policy_rejects_nonsense(kwargs):
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)


# ---------------------------------------------------------------- backoff

def test_backoff_doubles_from_base_then_caps():
    delays = [NO_JITTER.backoff(n, retry_after=None, rng=random.Random(1)) for n in range(1, 11)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0]


def test_backoff_survives_huge_attempt_counts():
    assert NO_JITTER.backoff(10_000, retry_after=None, rng=random.Random(1)) == 60.0


def test_backoff_rejects_attempt_zero():
    with pytest.raises(ValueError):
        NO_JITTER.backoff(0, retry_after=None, rng=random.Random(1))


def test_jitter_edges_shorten_by_at_most_the_fraction():
    p = RetryPolicy(jitter=0.2)
    assert p.backoff(3, retry_after=None, rng=FixedRandom(0.0)) == 2.0
    assert p.backoff(3, retry_after=None, rng=FixedRandom(0.999999)) == pytest.approx(1.6, abs=1e-5)
    assert p.backoff(20, retry_after=None, rng=FixedRandom(0.0)) == 60.0  # cap is a true cap


def test_jitter_bounds_over_many_draws_and_they_spread():
    p = RetryPolicy(jitter=0.2)
    rng = random.Random(42)
    for n in range(1, 12):
        exp = min(0.5 * 2 ** (n - 1), 60.0)
        draws = [p.backoff(n, retry_after=None, rng=rng) for _ in range(200)]
        assert all(0.8 * exp <= d <= exp for d in draws)
        assert max(draws) - min(draws) > 0.1 * exp  # jitter really spreads senders


def test_backoff_draws_one_number_and_is_reproducible():
    rng = FixedRandom(0.5)
    RetryPolicy().backoff(4, retry_after=None, rng=rng)
    assert rng.draws == 1
    a = [RetryPolicy().backoff(5, retry_after=None, rng=random.Random(7)) for _ in range(3)]
    assert len(set(a)) == 1


def test_retry_after_is_a_floor_and_may_pass_max_delay():
    assert NO_JITTER.backoff(1, retry_after=120.0, rng=random.Random(1)) == 120.0
    assert NO_JITTER.backoff(8, retry_after=5.0, rng=random.Random(1)) == 60.0
    # Even the shortest jittered delay never beats Retry-After.
    assert RetryPolicy(jitter=1.0).backoff(1, retry_after=0.4, rng=FixedRandom(0.99)) == 0.4


def test_retry_after_is_capped_at_one_hour():
    assert NO_JITTER.backoff(1, retry_after=10 * 86400.0, rng=random.Random(1)) == RETRY_AFTER_CAP
    assert RETRY_AFTER_CAP == 3600.0


def test_negative_retry_after_is_ignored():
    assert NO_JITTER.backoff(2, retry_after=-50.0, rng=random.Random(1)) == 1.0


# ---------------------------------------------------------------- Retry-After header

def test_parse_retry_after_delta_seconds():
    assert parse_retry_after("120", NOW) == 120.0
    assert parse_retry_after(" 0 ", NOW) == 0.0


def test_parse_retry_after_http_date():
    when = datetime.fromtimestamp(NOW + 90, tz=timezone.utc)
    assert parse_retry_after(format_datetime(when, usegmt=True), NOW) == pytest.approx(90.0)
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", 1445412480.0 - 30) == 30.0


def test_parse_retry_after_date_without_zone_is_utc():
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 -0000", 1445412480.0 - 30) == 30.0


def test_parse_retry_after_past_date_is_zero():
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", NOW) == 0.0


@pytest.mark.parametrize("value", [None, "", "  ", "soon", "-5", "1.5", "Wed, 99 Foo", "１２"])
def test_parse_retry_after_rejects_garbage(value):
    assert parse_retry_after(value, NOW) is None


# ---------------------------------------------------------------- decide

def decide(status, attempts=0, age=0.0, retry_after=None, policy=NO_JITTER):
    return policy.decide(
        status, attempts=attempts, enqueued_at=NOW - age, now=NOW,
        retry_after=retry_after, rng=random.Random(3),
    )


def test_decide_delivered():
    d = decide(204)
    assert (d.outcome, d.retry_at, d.reason) == (Outcome.DELIVERED, None, None)


def test_decide_dead_status_names_the_code():
    d = decide(413)
    assert (d.outcome, d.reason, d.retry_at) == (Outcome.DEAD, "status_413", None)


def test_decide_retry_is_absolute_and_counts_this_attempt():
    first = decide(503, attempts=0)
    assert (first.outcome, first.delay, first.retry_at) == (Outcome.RETRY, 0.5, NOW + 0.5)
    third = decide(None, attempts=2)
    assert third.retry_at == NOW + 2.0


def test_decide_honours_retry_after():
    d = decide(429, retry_after=parse_retry_after("30", NOW))
    assert d.retry_at == NOW + 30.0


def test_budget_spent_by_attempts():
    p = RetryPolicy(max_attempts=3, jitter=0.0)
    assert decide(503, attempts=1, policy=p).outcome is Outcome.RETRY
    spent = decide(503, attempts=2, policy=p)  # this was attempt 3 of 3
    assert (spent.outcome, spent.reason) == (Outcome.DEAD, "retry_budget_attempts")


def test_budget_spent_by_age():
    p = RetryPolicy(max_age=3600.0, jitter=0.0)
    assert decide(None, age=3599.0, policy=p).outcome is Outcome.RETRY
    old = decide(None, age=3600.0, policy=p)
    assert (old.outcome, old.reason) == (Outcome.DEAD, "retry_budget_age")


def test_budget_does_not_touch_delivered_or_dead_status():
    p = RetryPolicy(max_attempts=1, max_age=1.0)
    assert decide(200, attempts=99, age=1e6, policy=p).outcome is Outcome.DELIVERED
    assert decide(400, attempts=99, age=1e6, policy=p).reason == "status_400"


# ---------------------------------------------------------------- decide_batch

def row(i: int, attempts: int = 0, age: float = 0.0) -> QueuedEvent:
    return QueuedEvent(id=i, payload=b"{}", enqueued_at=NOW - age, attempts=attempts)


def test_batch_split_by_per_row_budget():
    p = RetryPolicy(max_attempts=5, max_age=100.0, jitter=0.0)
    rows = [row(1), row(2, attempts=4), row(3, age=200.0), row(4, attempts=2), row(5, attempts=4),
            row(6, attempts=1)]
    b = p.decide_batch(503, rows, now=NOW, retry_after=None, rng=random.Random(0))
    assert [r.id for r in b.delivered] == []
    assert [r.id for r in b.retry] == [1, 4, 6]
    # Shared retry_at from the most-tried retried row: attempts 2 -> attempt 3 -> 2 s.
    assert (b.delay, b.retry_at) == (2.0, NOW + 2.0)
    assert [(reason, [r.id for r in rs]) for reason, rs in b.dead] == [
        ("retry_budget_attempts", [2, 5]), ("retry_budget_age", [3]),
    ]


def test_batch_every_row_in_exactly_one_group():
    rng = random.Random(9)
    p = RetryPolicy(max_attempts=6, max_age=50.0)
    for status in (200, 400, 503, None, 302):
        rows = [row(i, attempts=rng.randrange(8), age=rng.uniform(0, 100)) for i in range(40)]
        b = p.decide_batch(status, rows, now=NOW, retry_after=None, rng=rng)
        ids = [r.id for r in b.delivered] + [r.id for r in b.retry]
        ids += [r.id for _, rs in b.dead for r in rs]
        assert sorted(ids) == list(range(40))
        assert (b.retry_at is None) == (not b.retry)


def test_batch_delivered_and_dead_status():
    rows = [row(1, attempts=60), row(2)]
    ok = RetryPolicy().decide_batch(200, rows, now=NOW, retry_after=None, rng=random.Random(0))
    assert (ok.delivered, ok.retry, ok.dead, ok.retry_at) == (tuple(rows), (), (), None)
    bad = RetryPolicy().decide_batch(422, rows, now=NOW, retry_after=None, rng=random.Random(0))
    assert bad.dead == (("status_422", tuple(rows)),)


def test_batch_draws_at_most_once():
    rng = FixedRandom(0.5)
    RetryPolicy().decide_batch(503, [row(i, attempts=i) for i in range(10)], now=NOW,
                               retry_after=None, rng=rng)
    assert rng.draws == 1


def test_batch_honours_retry_after():
    b = NO_JITTER.decide_batch(503, [row(1)], now=NOW, retry_after=45.0, rng=random.Random(0))
    assert b.retry_at == NOW + 45.0


# ---------------------------------------------------------------- Pause

def test_pause_opens_closed_and_doubles_on_consecutive_failures():
    pause = Pause(NO_JITTER, random.Random(0))
    assert pause.wait(NOW) == 0.0
    pause.observe(Outcome.RETRY, now=NOW)
    assert pause.wait(NOW) == 0.5
    assert pause.wait(NOW + 0.2) == pytest.approx(0.3)
    assert pause.wait(NOW + 0.5) == 0.0
    pause.observe(Outcome.RETRY, now=NOW + 0.5)
    assert pause.wait(NOW + 0.5) == 1.0
    pause.observe(Outcome.RETRY, now=NOW + 1.5)
    assert (pause.failures, pause.until()) == (3, NOW + 3.5)


def test_pause_caps_at_max_delay_while_collector_stays_down():
    pause = Pause(NO_JITTER, random.Random(0))
    t = NOW
    for _ in range(30):
        pause.observe(Outcome.RETRY, now=t)
        t = pause.until()
    assert pause.wait(t - 60.0) == 60.0


def test_pause_honours_retry_after():
    pause = Pause(NO_JITTER, random.Random(0))
    pause.observe(Outcome.RETRY, now=NOW, retry_after=30.0)
    assert pause.wait(NOW) == 30.0


def test_pause_success_clears_it():
    pause = Pause(NO_JITTER, random.Random(0))
    for _ in range(5):
        pause.observe(Outcome.RETRY, now=NOW)
    pause.observe(Outcome.DELIVERED, now=NOW)
    assert (pause.wait(NOW), pause.failures) == (0.0, 0)
    pause.observe(Outcome.RETRY, now=NOW)
    assert pause.wait(NOW) == 0.5  # the doubling starts over


def test_pause_later_shorter_failure_keeps_the_longer_wait():
    pause = Pause(NO_JITTER, random.Random(0))
    pause.observe(Outcome.RETRY, now=NOW, retry_after=100.0)
    pause.observe(Outcome.RETRY, now=NOW + 1)  # 1 s backoff would end at NOW + 2
    assert pause.until() == NOW + 100.0


def test_pause_ignores_dead_letter_answers():
    pause = Pause(NO_JITTER, random.Random(0))
    pause.observe(Outcome.DEAD, now=NOW)
    assert pause.wait(NOW) == 0.0
    pause.observe(Outcome.RETRY, now=NOW)
    pause.observe(Outcome.DEAD, now=NOW)
    assert (pause.wait(NOW), pause.failures) == (0.5, 1)
