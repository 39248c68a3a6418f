"""A crash scenario: the real pipeline under load while its processes are killed with
SIGKILL (and, for the soak, while the collector misbehaves), then an audit of what the
collector received against what the producers were told was committed.

    config = ChaosConfig(events=50_000, rate=2500, kills={"writer": 2, "sender": 2,
                                                          "supervisor": 1})
    outcome = run_scenario(workdir, config)
    assert outcome.lost == [] and outcome.duplicates <= outcome.duplicate_bound

What runs (all real processes on 127.0.0.1):

- a ``LocalCollector`` and a ``Pipeline`` (``sp-pipeline start``) with small, fast
  settings (``ChaosConfig.pipeline_args``);
- ``producers`` load processes (multiprocessing *spawn*: fresh interpreters), each a
  ``Client(resend_after=0.5)`` tracking ``rate / producers`` events per second and
  calling ``flush()`` every ``flush_every`` events. A ``FlushTimeout`` or ``BufferFull``
  (writer down) is retried, never given up, so the producer rides through restarts;
  the eids of a successful ``flush()`` are recorded as *confirmed*;
- a chaos loop in the calling process that follows a seeded schedule (``Step``): it
  kills the writer, a sender or the supervisor with SIGKILL, waits until the pipeline
  runs again (children.json shows every child running under the current supervisor),
  and switches collector faults on and off through ``LocalCollector.set_faults``.
  After a supervisor kill its children get SIGTERM from the kernel (PDEATHSIG, see
  ``sp_pipeline/role.py``) and the scenario starts a new supervisor at once on the same
  run directory and store, as a service manager would; producers keep their sockets
  (same ipc:// path: ZeroMQ reconnects).

The audit (``Outcome``): *lost* = confirmed eids neither delivered nor dead-lettered
(must be empty); *duplicates* = deliveries beyond the first, per eid; dead letters by
reason, read from the store read-only; kills by role; faults by kind.

Duplicate bound. A delivered event is sent again only when the report of the request
that carried it never reaches the writer's store, so duplicates are confined to the
requests in flight when something failed:

- a killed sender loses at most the requests it had in flight:
  ``inflight x batch_max_events`` events;
- a killed writer (or a killed supervisor, whose writer stops while senders still
  report) loses the reports of every sender's requests:
  ``senders x inflight x batch_max_events`` events;
- producers resend unconfirmed frames after a writer restart, but the writer drops
  frames whose (producer, seq) it already committed (``ingest.py``), so resends add
  nothing: the bound leaves them out on purpose, and a dedupe bug would break it;
- a collector that answers slower than ``read_timeout`` records requests the sender
  counts as failed, so every event recorded during such a window may come again: the
  bound adds the good events recorded while a "slow" fault was on, plus the requests
  still in flight when it went off (``senders x inflight x batch_max_events``: later
  requests get no delay). 503s and resets record nothing: they cause no duplicates.
"""

from __future__ import annotations

import collections
import contextlib
import json
import multiprocessing
import os
import random
import signal
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Set

from sp_pipeline.store import open_readonly
from sp_pipeline.testing import LocalCollector, Pipeline, http_json, wait_until

ROLES = ("writer", "sender", "supervisor")

#: Collector faults the soak injects: kind -> (seconds switched on, fields for set_faults).
#: "slow" gets its delay from the read timeout (see ``ChaosConfig.fault_fields``).
FAULTS: Mapping[str, tuple] = {
    "outage_503": (30.0, {"status": 503}),
    "half_503": (20.0, {"fail_rate": 0.5, "fail_status": 503}),
    "slow": (10.0, {}),
    "resets": (20.0, {"reset_rate": 0.3}),
}
_CLEAR = {"status": None, "fail_rate": None, "fail_status": None, "delay_ms": None,
          "reset_rate": None}


@dataclass(frozen=True)
class ChaosConfig:
    """One scenario. Times in seconds, rates in events per second.

    ``kills``: exact number of kills per role, spread at random over the load (CI).
    ``kill_every``: mean seconds between kills per role, jittered x0.5..x1.5 (soak).
    ``faults_every``: mean seconds between collector faults (0: none), cycling through
    ``fault_kinds`` in a seeded random order.
    """

    events: int = 50_000
    rate: float = 2500.0
    producers: int = 2
    flush_every: int = 500
    seed: int = 1
    kills: Mapping[str, int] = field(default_factory=dict)
    kill_every: Mapping[str, float] = field(default_factory=dict)
    faults_every: float = 0.0
    fault_kinds: Sequence[str] = tuple(FAULTS)
    senders: int = 2
    inflight: int = 2
    batch_max_events: int = 100
    lease_seconds: float = 6.0
    connect_timeout: float = 1.0
    read_timeout: float = 2.0
    collector_args: Sequence[str] = ("--good-cap", "60000")
    recover_timeout: float = 30.0
    delivery_timeout: float = 90.0

    @property
    def load_seconds(self) -> float:
        return self.events / self.rate

    def pipeline_args(self) -> List[str]:
        return ["--senders", str(self.senders), "--inflight", str(self.inflight),
                "--batch-max-events", str(self.batch_max_events),
                "--lease-seconds", f"{self.lease_seconds:g}",
                "--connect-timeout", f"{self.connect_timeout:g}",
                "--read-timeout", f"{self.read_timeout:g}",
                "--retry-base", "0.2", "--retry-max-delay", "2", "--drain-timeout", "8",
                "--metrics-addr", "127.0.0.1:0"]

    @property
    def all_in_flight(self) -> int:
        """Most events in the requests of every sender at one moment."""
        return self.senders * self.inflight * self.batch_max_events

    def in_flight_window(self, role: str) -> int:
        """Most events one kill of ``role`` can make the collector receive twice."""
        return self.all_in_flight // self.senders if role == "sender" else self.all_in_flight

    def fault_fields(self, kind: str) -> Dict[str, object]:
        if kind == "slow":
            return {"delay_ms": (self.read_timeout + 1.0) * 1000}
        return dict(FAULTS[kind][1])


# ------------------------------------------------------------------ schedule


class Step(NamedTuple):
    """At ``at`` seconds after the load starts: ``action`` ("kill", "fault", "clear")
    with ``arg`` (a role or a fault kind)."""

    at: float
    action: str
    arg: str


def counted_kills(rng: random.Random, start: float, end: float,
                  counts: Mapping[str, int]) -> List[Step]:
    """Exactly ``counts[role]`` kills per role, one per equal slot of [start, end), at a
    random point in the middle 70 % of its slot (so kills never land back to back)."""
    roles = [role for role, n in counts.items() for _ in range(n)]
    rng.shuffle(roles)
    if not roles:
        return []
    slot = (end - start) / len(roles)
    return [Step(start + slot * (i + rng.uniform(0.15, 0.85)), "kill", role)
            for i, role in enumerate(roles)]


def periodic_kills(rng: random.Random, start: float, end: float,
                   every: Mapping[str, float]) -> List[Step]:
    """Kills of each role every ``every[role]`` seconds on average (x0.5..x1.5 jitter)."""
    steps = []
    for role, mean in every.items():
        t = start + mean * rng.uniform(0.5, 1.5)
        while mean > 0 and t < end:
            steps.append(Step(t, "kill", role))
            t += mean * rng.uniform(0.5, 1.5)
    return steps


def fault_windows(rng: random.Random, start: float, end: float, every: float,
                  kinds: Sequence[str]) -> List[Step]:
    """Non-overlapping collector faults: on at a jittered interval, off after the kind's
    duration."""
    order = list(kinds)
    rng.shuffle(order)
    steps: List[Step] = []
    t = start + every * rng.uniform(0.5, 1.0)
    i = 0
    while every > 0 and order and t < end:
        kind = order[i % len(order)]
        duration = FAULTS[kind][0]
        steps += [Step(t, "fault", kind), Step(t + duration, "clear", kind)]
        t += duration + every * rng.uniform(0.5, 1.5)
        i += 1
    return steps


def build_schedule(cfg: ChaosConfig) -> List[Step]:
    """Every step of a run, in time order; the same for the same config (seeded)."""
    rng = random.Random(cfg.seed)
    start, end = 1.5, max(1.5, cfg.load_seconds - 1.5)
    steps = counted_kills(rng, start, end, cfg.kills)
    steps += periodic_kills(rng, start, end, cfg.kill_every)
    steps += fault_windows(rng, start, end, cfg.faults_every, cfg.fault_kinds)
    return sorted(steps)


# ------------------------------------------------------------------ producers


def produce(index: int, endpoint: str, count: int, rate: float, flush_every: int,
            out_path: str, abort, progress) -> None:
    """Body of one producer process: track ``count`` events at ``rate`` per second,
    flush every ``flush_every``, retry through outages until ``abort`` is set, and
    write what was confirmed (and what never was) as JSON to ``out_path``.

    ``progress[2 * index]`` / ``[2 * index + 1]``: events tracked / confirmed so far."""
    from sp_pipeline import Client
    from sp_pipeline.errors import BufferFull, FlushTimeout
    from sp_pipeline.events import StructuredEvent

    confirmed: List[str] = []
    batch: List[str] = []
    tally = collections.Counter()
    started = time.monotonic()
    client = Client(endpoint, namespace="crash", app_id=f"producer-{index}", resend_after=0.5)

    def flush(timeout: float) -> bool:
        try:
            client.flush(timeout)
        except FlushTimeout:
            tally["flush_timeouts"] += 1
            return False
        confirmed.extend(batch)
        batch.clear()
        progress[2 * index + 1] = len(confirmed)
        return True

    for i in range(count):
        if abort.is_set():
            break
        ahead = started + i / rate - time.monotonic()
        if ahead > 0.005:
            time.sleep(ahead)  # pacing the offered load, not waiting for a condition
        while not abort.is_set():
            try:
                batch.append(client.track(StructuredEvent("crash", f"p{index}", value=i)))
                break
            except BufferFull:
                tally["buffer_full"] += 1
                flush(0.5)
        progress[2 * index] = i + 1
        if len(batch) >= flush_every:
            flush(2.0)  # a timeout keeps the batch: the next flush covers it
    while batch and not abort.is_set() and not flush(2.0):
        pass
    tally["resent_frames"] = client.stats.resent_frames
    client.close(timeout=None)
    with open(out_path, "w") as fh:
        json.dump({"index": index, "confirmed": confirmed, "unconfirmed": batch,
                   "counters": dict(tally), "seconds": time.monotonic() - started}, fh)


class Producers:
    """The producer processes of a run; ``stop()`` aborts and reaps them all."""

    def __init__(self, workdir: str, endpoint: str, cfg: ChaosConfig) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.abort = ctx.Event()
        self.progress = ctx.Array("q", 2 * cfg.producers, lock=False)
        self.paths = [os.path.join(workdir, f"producer-{i}.json") for i in range(cfg.producers)]
        shares = [cfg.events // cfg.producers + (i < cfg.events % cfg.producers)
                  for i in range(cfg.producers)]
        self.procs = [ctx.Process(target=produce, name=f"producer-{i}", daemon=True,
                                  args=(i, endpoint, shares[i], cfg.rate / cfg.producers,
                                        cfg.flush_every, self.paths[i], self.abort,
                                        self.progress))
                      for i in range(cfg.producers)]
        for p in self.procs:
            p.start()

    def running(self) -> bool:
        return any(p.is_alive() for p in self.procs)

    def counts(self) -> tuple:
        """(tracked, confirmed) so far, over every producer."""
        values = list(self.progress)
        return sum(values[0::2]), sum(values[1::2])

    def join(self, timeout: float) -> List[dict]:
        """Wait for every producer to finish; their reports. Raises if one failed."""
        with contextlib.suppress(TimeoutError):
            wait_until(lambda: not self.running(), timeout, "the producers to finish",
                       interval=0.1)
        self.abort.set()  # late ones stop tracking and write what they have
        wait_until(lambda: not self.running(), 30, "aborted producers to exit", interval=0.1)
        failed = [p.name for p in self.procs if p.exitcode != 0]
        if failed:
            raise RuntimeError(f"producer(s) failed: {failed}")
        reports = []
        for path in self.paths:
            with open(path) as fh:
                reports.append(json.load(fh))
        return reports

    def stop(self) -> None:
        self.abort.set()
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join(5)


# ------------------------------------------------------------------ chaos


class Chaos:
    """Carries out kill and fault steps against one pipeline and collector, and keeps
    the tallies the duplicate bound needs."""

    def __init__(self, pipeline: Pipeline, collector: LocalCollector, cfg: ChaosConfig,
                 log: Callable[[str], None]) -> None:
        self.pipeline = pipeline
        self.collector = collector
        self.cfg = cfg
        self.log = log
        self.rng = random.Random(cfg.seed + 1)
        self.kills: Dict[str, int] = collections.Counter()
        self.faults: Dict[str, int] = collections.Counter()
        self.recovery_seconds: List[float] = []
        self.slow_deliveries = 0
        self._slow_start_good = 0
        self.old_groups: List[int] = []  # process groups of killed supervisors
        self.outliving = 0  # children of killed supervisors found alive at the end

    def state(self) -> dict:
        try:
            with open(os.path.join(self.pipeline.run_dir, "children.json")) as fh:
                return json.load(fh)
        except (OSError, ValueError):
            return {}

    def healthy(self) -> bool:
        """Every child runs under the supervisor we started last. Raises if that
        supervisor exited (a role went FATAL, or it could not start)."""
        proc = self.pipeline.proc
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"sp-pipeline start exited {proc.returncode}; "
                               f"see {self.pipeline.log_path}")
        state = self.state()
        children = state.get("children") or []
        return (proc is not None and state.get("supervisor_pid") == proc.pid and bool(children)
                and all(c["state"] == "running" and c["pid"] for c in children))

    def wait_healthy(self, what: str) -> float:
        started = time.monotonic()
        wait_until(self.healthy, self.cfg.recover_timeout, what, interval=0.05)
        return time.monotonic() - started

    def do(self, step: Step) -> None:
        if step.action == "kill":
            self.kill(step.arg)
        elif step.action == "fault":
            self.faults[step.arg] += 1
            if step.arg == "slow":
                self._slow_start_good = self.collector.counts()["good"]
            fields = self.cfg.fault_fields(step.arg)
            fields["seed"] = self.rng.randrange(1 << 30)  # reproducible rate draws
            self.collector.set_faults(**fields)
            self.log(f"fault on: {step.arg}")
        elif step.action == "clear":
            self.collector.set_faults(**_CLEAR)
            if step.arg == "slow":
                recorded = self.collector.counts()["good"] - self._slow_start_good
                self.slow_deliveries += recorded + self.cfg.all_in_flight
            self.log(f"fault off: {step.arg}")

    def kill(self, role: str) -> None:
        self.wait_healthy(f"the pipeline to run before killing the {role}")
        if role == "supervisor":
            self._kill_supervisor()
        else:
            self._kill_child(role)
        self.kills[role] += 1
        took = self.wait_healthy(f"the pipeline to recover from a killed {role}")
        self.recovery_seconds.append(took)
        self.log(f"killed the {role}; running again after {took:.2f} s")

    def _kill_child(self, role: str) -> None:
        victims = [c for c in self.state()["children"] if c["role"] == role]
        victim = self.rng.choice(victims)
        os.kill(victim["pid"], signal.SIGKILL)
        # Wait for the supervisor to notice, so healthy() cannot see the old pid.
        wait_until(lambda: all(c["pid"] != victim["pid"] for c in self.state()["children"]),
                   self.cfg.recover_timeout, f"the supervisor to reap {role} {victim['pid']}")

    def _kill_supervisor(self) -> None:
        proc = self.pipeline.proc
        assert proc is not None
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        self.old_groups.append(proc.pid)  # its children share its process group
        self.pipeline.start(wait_ready=False)  # at once, as a service manager would

    def stragglers(self) -> int:
        """Children of killed supervisors still alive now (should be none: PDEATHSIG)."""
        alive = 0
        for pgid in self.old_groups:
            try:
                os.killpg(pgid, 0)
                alive += 1
            except ProcessLookupError:
                pass
        return alive

    def reap_old_groups(self) -> None:
        for pgid in self.old_groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)


def run_chaos(chaos: Chaos, steps: Sequence[Step], producers: Producers, t0: float,
              log: Callable[[str], None], report_every: float = 0.0) -> None:
    """Carry out ``steps`` at their times (seconds after ``t0``) while producers run;
    steps not reached when the producers finish are skipped, except "clear" so no
    fault stays on."""
    next_report = report_every
    for step in steps:
        due = _due(step.at, t0, producers)
        while not due():
            with contextlib.suppress(TimeoutError):
                wait_until(due, 1.0, "the next step", interval=0.05)
            if report_every and time.monotonic() - t0 >= next_report:
                tracked, confirmed = producers.counts()
                log(f"t={time.monotonic() - t0:5.0f} s  tracked {tracked}  confirmed "
                    f"{confirmed}  kills {dict(chaos.kills)}  faults {dict(chaos.faults)}")
                next_report += report_every
        if producers.running() or step.action == "clear":
            chaos.do(step)


def _due(at: float, t0: float, producers: Producers) -> Callable[[], bool]:
    return lambda: time.monotonic() - t0 >= at or not producers.running()


# ------------------------------------------------------------------ audit


@dataclass
class Outcome:
    """What a run proved. ``lost`` lists confirmed eids neither delivered nor
    dead-lettered; ``duplicates`` counts deliveries beyond the first per eid."""

    seed: int
    seconds: float
    load_seconds: float
    events_offered: int
    events_tracked: int
    events_confirmed: int
    events_delivered: int
    deliveries: int
    lost: List[str]
    duplicates: int
    max_copies: int
    duplicate_bound: int
    bound_terms: Dict[str, int]
    unknown_delivered: int
    collector_bad: int
    copies_compared: int
    copies_differing: int
    dead_letters: Dict[str, int]
    kills: Dict[str, int]
    faults: Dict[str, int]
    recovery_seconds_max: float
    supervisor_children_outliving: int
    producer_counters: Dict[str, int]
    pipeline_exit: Optional[int]

    @property
    def processes_killed(self) -> int:
        return sum(self.kills.values())

    def to_json(self) -> dict:
        out = asdict(self)
        out["lost"] = len(self.lost)
        out["lost_sample"] = self.lost[:20]
        out["processes_killed"] = self.processes_killed
        out["faults_injected"] = sum(self.faults.values())
        return out

    def summary(self) -> str:
        lines = [
            f"seed {self.seed}: {self.seconds:.1f} s in all, load {self.load_seconds:.1f} s",
            f"events offered {self.events_offered}, tracked {self.events_tracked}, "
            f"confirmed by flush() {self.events_confirmed}",
            f"delivered {self.events_delivered} distinct eids in {self.deliveries} deliveries",
            f"lost {len(self.lost)}   duplicates {self.duplicates} (bound "
            f"{self.duplicate_bound}: {self.bound_terms}; most copies of one eid "
            f"{self.max_copies})",
            f"processes killed {self.processes_killed} {dict(self.kills)}; longest recovery "
            f"{self.recovery_seconds_max:.2f} s; children outliving a killed supervisor "
            f"{self.supervisor_children_outliving}",
            f"faults injected {sum(self.faults.values())} {dict(self.faults)}",
            f"dead letters {sum(self.dead_letters.values())} {dict(self.dead_letters)}",
            f"duplicated eids compared copy by copy {self.copies_compared}, differing "
            f"beyond stm {self.copies_differing}; bad events at the collector "
            f"{self.collector_bad}",
            f"producers {self.producer_counters}; delivered but never tracked "
            f"{self.unknown_delivered}; pipeline exit {self.pipeline_exit}",
        ]
        return "\n".join(lines)


def dead_letters(store: str) -> Dict[str, List[str]]:
    """Eids in the store's dead_letters table, by reason (read-only)."""
    out: Dict[str, List[str]] = collections.defaultdict(list)
    with open_readonly(store) as ro:
        offset = 0
        while page := ro.dead_letters(1000, offset):
            for d in page:
                out[d.reason].append(json.loads(d.payload)["eid"])
            offset += len(page)
    return dict(out)


def settled(pipeline: Pipeline, collector: LocalCollector, confirmed: Set[str]) -> bool:
    """Every confirmed eid is delivered or dead-lettered, and the queue is empty (so no
    late duplicate is still on its way)."""
    if open_readonly(pipeline.store).stats(time.time()).queued:
        return False  # cheap check first: /micro/eids is a large answer
    dead = {e for eids in dead_letters(pipeline.store).values() for e in eids}
    return not (confirmed - set(collector.eids()) - dead)


def compare_copies(collector: LocalCollector, delivered: Dict[str, int],
                   rng: random.Random, sample: int = 20) -> tuple:
    """(eids compared, eids whose copies differ) over a sample of duplicated eids still
    held by the collector: copies of one event must be the same event, ``stm`` (the
    send time, set per request) aside."""
    duplicated = sorted(e for e, n in delivered.items() if n > 1)
    compared = differing = 0
    for eid in rng.sample(duplicated, min(sample, len(duplicated))):
        copies = http_json(f"{collector.url}/micro/good?eid={eid}")
        if len(copies) < 2:
            continue  # older than the collector's good-event cap
        bodies = [{k: v for k, v in c["event"].items() if k != "stm"} for c in copies]
        compared += 1
        differing += any(b != bodies[0] for b in bodies)
    return compared, differing


def audit(cfg: ChaosConfig, chaos: Chaos, reports: List[dict], delivered: Dict[str, int],
          dead: Dict[str, List[str]], seconds: float, exit_code: Optional[int],
          collector_facts: Mapping[str, int]) -> Outcome:
    confirmed = {e for r in reports for e in r["confirmed"]}
    tracked = confirmed | {e for r in reports for e in r["unconfirmed"]}
    dead_eids = {e for eids in dead.values() for e in eids}
    terms = {f"{role}_kills": chaos.kills.get(role, 0) * cfg.in_flight_window(role)
             for role in ROLES}
    terms["slow_collector"] = chaos.slow_deliveries
    counters: Dict[str, int] = collections.Counter()
    for r in reports:
        counters.update(r["counters"])
    return Outcome(
        seed=cfg.seed, seconds=seconds, load_seconds=max(r["seconds"] for r in reports),
        events_offered=cfg.events, events_tracked=len(tracked),
        events_confirmed=len(confirmed), events_delivered=len(delivered),
        deliveries=sum(delivered.values()),
        lost=sorted(confirmed - set(delivered) - dead_eids),
        duplicates=sum(n - 1 for n in delivered.values()),
        max_copies=max(delivered.values(), default=0),
        duplicate_bound=sum(terms.values()), bound_terms=terms,
        unknown_delivered=len(set(delivered) - tracked),
        collector_bad=collector_facts["bad"], copies_compared=collector_facts["compared"],
        copies_differing=collector_facts["differing"],
        dead_letters={reason: len(eids) for reason, eids in dead.items()},
        kills=dict(chaos.kills), faults=dict(chaos.faults),
        recovery_seconds_max=max(chaos.recovery_seconds, default=0.0),
        supervisor_children_outliving=chaos.outliving,
        producer_counters=dict(counters), pipeline_exit=exit_code,
    )


def run_scenario(workdir: str, cfg: ChaosConfig, log: Callable[[str], None] = lambda s: None,
                 report_every: float = 0.0) -> Outcome:
    """Run ``cfg`` in ``workdir`` (short: it holds the ipc:// socket) and audit it.

    Every process started here is stopped or killed before returning. Raises
    TimeoutError when the pipeline does not recover from a kill in
    ``recover_timeout``; an undelivered confirmed event is reported in
    ``Outcome.lost``, not raised."""
    started = time.monotonic()
    steps = build_schedule(cfg)
    log(f"seed {cfg.seed}: {len(steps)} steps over {cfg.load_seconds:.0f} s of load")
    with contextlib.ExitStack() as stack:
        collector = stack.enter_context(LocalCollector(workdir, *cfg.collector_args))
        pipeline = stack.enter_context(Pipeline(workdir, collector.url, *cfg.pipeline_args()))
        chaos = Chaos(pipeline, collector, cfg, log)
        stack.callback(chaos.reap_old_groups)
        producers = Producers(workdir, pipeline.ingest, cfg)
        stack.callback(producers.stop)
        run_chaos(chaos, steps, producers, time.monotonic(), log, report_every)
        reports = producers.join(cfg.load_seconds + cfg.delivery_timeout)
        confirmed = {e for r in reports for e in r["confirmed"]}
        with contextlib.suppress(TimeoutError):
            wait_until(lambda: settled(pipeline, collector, confirmed), cfg.delivery_timeout,
                       "every confirmed event delivered", interval=0.5)
        exit_code = pipeline.stop()
        chaos.outliving = chaos.stragglers()
        delivered = collector.eids()
        dead = dead_letters(pipeline.store)
        compared, differing = compare_copies(collector, delivered, random.Random(cfg.seed))
        facts = {"bad": collector.counts()["bad"], "compared": compared, "differing": differing}
    return audit(cfg, chaos, reports, delivered, dead, time.monotonic() - started, exit_code,
                 facts)


__all__ = ["ChaosConfig", "Outcome", "Step", "build_schedule", "run_scenario"]
