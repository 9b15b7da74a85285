"""Benchmarks of ``start_session`` through the async embedding API (``runtime.open_runtime``).

One run, on a throwaway SQLite database in a temporary directory (the default backend, WAL),
with the password project in ``tests/fixtures/password_functions`` deployed to app ``bench``
and its DEMO_PASSWORD secret set (the UserAttemptedStartSession handler compares it with
hmac, and creates the user on first sign-in; UserStartedSession only logs). Sequential
kinds, measured in blocks interleaved with each other so a drift in the machine hits all of
them alike:

- returning:  ``start_session`` of a user that exists (the common case), back to back;
- quiesced:   the same, but with the runtime's background work drained before each call,
              so no earlier session's hooks compete with it (the difference is their cost);
- new user:   a new username each time: the handler creates the user;
- guest:      app ``guest``, nothing deployed, guest users enabled, returning guest: the
              session path without the sandbox, database only (the floor);
- guest new:  the same, a new guest user each time;
- invoke:     ``app.invoke("UserAttemptedStartSession", ...)`` for a returning user: the
              sandbox part alone (the invocation is stored; no session is);
- hop:        one no-op ``run_in_executor`` round trip, as every async method makes.

Every started session is ended with ``end_session`` right after it, outside the timed region
(its latency is reported apart). UserStartedSession (deployed in ``bench``) and the
UserEndedSession check run in the runtime's background threads, as in production: they are
included in "returning" and "new user", since a server sees them too, and drained between
blocks so one kind's hooks never land in another's. Throughput: N asyncio tasks start
sessions for returning users as fast as they can (a fixed count, ended after the window);
it is reported for the window alone and including the time to drain the background hooks
it queued (the rate a server could sustain).

Per operation, each kind also reports the CPU and the database transactions of its blocks
divided by its count: a whole session's worth (start, the untimed end, and the hooks of
both), not the timed call alone. Host CPU is this process (database work, the sandbox's
host side, the event loop); machine CPU is every busy CPU on the machine, sandbox workers
included, and anything else that runs meanwhile (the load average is recorded for that).
Transactions are counted with a listener on the engine's ``begin`` event (about 1 us each).

``python bench/session_bench.py`` prints Markdown tables; ``--json`` prints one JSON object
and nothing else on stdout (progress goes to stderr, ``--quiet`` drops it); ``--quick`` runs
about a tenth of the iterations, as a smoke test.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import os
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import benchlib
import sqlalchemy
from benchlib import emit, log, machine_basics, parser, percentile, self_cpu_s
from sqlalchemy import event

from runtime import AsyncApp, AsyncRuntime, open_runtime
from runtime.sessions import SessionResult

FUNCTIONS = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "password_functions"
PASSWORD = "letmein"
AUTH: dict[str, Any] = {"password": PASSWORD}
USERS = 50  # returning users (and returning guests), used in turn
BLOCKS = 10


@dataclass(frozen=True)
class Iterations:
    warmup: int
    returning: int
    quiesced: int
    new_user: int
    guest: int
    guest_new: int
    invoke: int
    hop: int
    throughput: int
    throughput_tasks: int

    @classmethod
    def full(cls) -> Iterations:
        return cls(50, 2000, 500, 600, 1500, 600, 1500, 3000, 3000, 8)

    @classmethod
    def quick(cls) -> Iterations:
        return cls(5, 200, 50, 60, 150, 60, 150, 300, 300, 8)


# ---- measuring ----------------------------------------------------------------------------


def system_busy_ticks() -> int:
    """Jiffies all CPUs spent not idle, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    steal_guest = sum(fields[7:]) if len(fields) > 7 else 0
    return sum(fields) - idle - steal_guest


@dataclass
class Samples:
    """Durations (ns) of one kind, and the CPU its blocks used (untimed work included)."""

    ns: list[int] = field(default_factory=list)
    self_s: float = 0.0
    system_s: float = 0.0
    transactions: int = 0

    def ms(self, p: float) -> float:
        return percentile(sorted(v / 1e6 for v in self.ns), p)

    def per_op(self) -> tuple[float, float, float]:
        """Per operation: CPU (ms) of this process and of the machine, transactions."""
        n = max(1, len(self.ns))
        return self.self_s / n * 1e3, self.system_s / n * 1e3, self.transactions / n


def ok(result: SessionResult, *, guest: bool) -> dict[str, Any]:
    if result.session is None:
        raise RuntimeError(f"start_session failed: {result.error}")
    if result.session["user"]["is_guest"] is not guest:
        raise RuntimeError(f"unexpected user: {result.session['user']}")
    return result.session


# ---- the benchmark ------------------------------------------------------------------------


class Bench:
    def __init__(self, rt: AsyncRuntime, bench: AsyncApp, guest: AsyncApp) -> None:
        self.rt, self.bench, self.guest = rt, bench, guest
        self.counter = 0
        self.end = Samples()
        self.hop_pool = concurrent.futures.ThreadPoolExecutor(32, thread_name_prefix="hop")
        self.transactions = 0
        lock = threading.Lock()

        def on_begin(_connection: Any) -> None:
            with lock:
                self.transactions += 1

        event.listen(rt.sync.db.engine, "begin", on_begin)

    def fresh_name(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}-{self.counter}"

    def user(self, i: int) -> str:
        return f"user-{i % USERS}"

    async def ended(self, app: AsyncApp, session: Mapping[str, Any]) -> None:
        t0 = time.perf_counter_ns()
        await app.end_session(session["id"])
        self.end.ns.append(time.perf_counter_ns() - t0)

    # Each kind: one timed operation, and the untimed work around it. Returns the duration.

    async def returning(self, i: int) -> int:
        t0 = time.perf_counter_ns()
        result = await self.bench.start_session(self.user(i), AUTH)
        took = time.perf_counter_ns() - t0
        await self.ended(self.bench, ok(result, guest=False))
        return took

    async def quiesced(self, i: int) -> int:
        await self.rt.drain()
        return await self.returning(i)

    async def new_user(self, i: int) -> int:
        name = self.fresh_name("new")
        t0 = time.perf_counter_ns()
        result = await self.bench.start_session(name, AUTH)
        took = time.perf_counter_ns() - t0
        await self.ended(self.bench, ok(result, guest=False))
        return took

    async def guest_returning(self, i: int) -> int:
        t0 = time.perf_counter_ns()
        result = await self.guest.start_session(f"guest-{i % USERS}")
        took = time.perf_counter_ns() - t0
        await self.ended(self.guest, ok(result, guest=True))
        return took

    async def guest_new(self, i: int) -> int:
        name = self.fresh_name("guest-new")
        t0 = time.perf_counter_ns()
        result = await self.guest.start_session(name)
        took = time.perf_counter_ns() - t0
        await self.ended(self.guest, ok(result, guest=True))
        return took

    async def invoke(self, i: int) -> int:
        payload = {"username": self.user(i), "auth_params": AUTH}
        t0 = time.perf_counter_ns()
        invocation = await self.bench.invoke("UserAttemptedStartSession", payload)
        took = time.perf_counter_ns() - t0
        if not invocation.succeeded:
            raise RuntimeError(f"invocation failed: {invocation.error}")
        return took

    async def hop(self, i: int) -> int:
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter_ns()
        await loop.run_in_executor(self.hop_pool, int)
        return time.perf_counter_ns() - t0

    async def setup(self) -> None:
        for i in range(USERS):  # the handler creates them; guests are created on the spot
            await self.ended(
                self.bench, ok(await self.bench.start_session(self.user(i), AUTH), guest=False)
            )
            await self.ended(
                self.guest, ok(await self.guest.start_session(f"guest-{i}"), guest=True)
            )
        self.end.ns.clear()
        await self.rt.drain()

    async def sequential(self, it: Iterations, quiet: bool) -> dict[str, Samples]:
        kinds: dict[str, tuple[Callable[[int], Awaitable[int]], int]] = {
            "returning": (self.returning, it.returning),
            "quiesced": (self.quiesced, it.quiesced),
            "new_user": (self.new_user, it.new_user),
            "guest": (self.guest_returning, it.guest),
            "guest_new": (self.guest_new, it.guest_new),
            "invoke": (self.invoke, it.invoke),
            "hop": (self.hop, it.hop),
        }
        for fn, _ in kinds.values():
            for i in range(it.warmup):
                await fn(i)
        await self.rt.drain()
        self.end.ns.clear()
        samples = {kind: Samples() for kind in kinds}
        tick = os.sysconf("SC_CLK_TCK")
        for block in range(BLOCKS):
            log(quiet, f"sequential block {block + 1}/{BLOCKS}")
            for kind, (fn, total) in kinds.items():
                gc.collect()
                s = samples[kind]
                tx0 = self.transactions
                self0, sys0 = self_cpu_s(), system_busy_ticks()
                for i in range(total // BLOCKS):
                    s.ns.append(await fn(i))
                await self.rt.drain()  # this block's hooks are its own cost, not the next's
                s.self_s += self_cpu_s() - self0
                s.system_s += (system_busy_ticks() - sys0) / tick
                s.transactions += self.transactions - tx0
        return samples

    async def throughput(self, it: Iterations) -> dict[str, Any]:
        tasks = it.throughput_tasks
        per_task = it.throughput // tasks
        latencies: list[int] = []
        started: list[str] = []

        async def worker(index: int, count: int) -> None:
            for i in range(count):
                t0 = time.perf_counter_ns()
                result = await self.bench.start_session(self.user(index * count + i), AUTH)
                latencies.append(time.perf_counter_ns() - t0)
                started.append(ok(result, guest=False)["id"])

        await asyncio.gather(*(worker(t, it.warmup) for t in range(tasks)))
        await self.rt.drain()
        latencies.clear()
        gc.collect()
        tick = os.sysconf("SC_CLK_TCK")
        tx0 = self.transactions
        wall0, self0, sys0 = time.perf_counter(), self_cpu_s(), system_busy_ticks()
        await asyncio.gather(*(worker(t, per_task) for t in range(tasks)))
        window_s = time.perf_counter() - wall0
        await self.rt.drain()
        drained_s = time.perf_counter() - wall0
        self_s, system_s = self_cpu_s() - self0, (system_busy_ticks() - sys0) / tick
        transactions = self.transactions - tx0
        for session_id in started:  # untimed: the sessions started in the window end here
            await self.bench.end_session(session_id)
        await self.rt.drain()
        total = per_task * tasks
        values = sorted(v / 1e6 for v in latencies)
        return {
            "throughput_tasks": tasks,
            "throughput_sessions": total,
            "throughput_per_s": total / window_s,
            "throughput_with_background_per_s": total / drained_s,
            "throughput_window_s": window_s,
            "throughput_background_drain_s": drained_s - window_s,
            "throughput_latency_p50_ms": percentile(values, 50),
            "throughput_latency_p99_ms": percentile(values, 99),
            "throughput_host_cpu_cores": self_s / drained_s,
            "throughput_machine_cpu_cores": system_s / drained_s,
            "throughput_host_cpu_ms_per_session": self_s / total * 1e3,
            "throughput_db_transactions_per_session": transactions / total,
        }

    def close(self) -> None:
        self.hop_pool.shutdown()


def results_of(samples: Mapping[str, Samples], end: Samples) -> dict[str, Any]:
    r: dict[str, Any] = {}
    for kind, s in {**samples, "end_session": end}.items():
        r[f"{kind}_p50_ms"] = s.ms(50)
        r[f"{kind}_p90_ms"] = s.ms(90)
        r[f"{kind}_p99_ms"] = s.ms(99)
        r[f"{kind}_max_ms"] = s.ms(100)
        r[f"{kind}_count"] = len(s.ns)
        if kind not in ("end_session", "hop"):
            cpu, machine_cpu, transactions = s.per_op()
            r[f"{kind}_host_cpu_ms"] = cpu
            r[f"{kind}_machine_cpu_ms"] = machine_cpu
            r[f"{kind}_db_transactions"] = transactions
    p50 = {kind: r[f"{kind}_p50_ms"] for kind in (*samples, "end_session")}
    r["returning_vs_guest"] = p50["returning"] / p50["guest"]
    r["returning_vs_invoke"] = p50["returning"] / p50["invoke"]
    r["returning_vs_quiesced"] = p50["returning"] / p50["quiesced"]
    r["new_user_vs_returning"] = p50["new_user"] / p50["returning"]
    r["returning_minus_invoke_ms"] = p50["returning"] - p50["invoke"]
    r["background_cost_ms"] = p50["returning"] - p50["quiesced"]
    return r


def machine(load_before: float) -> dict[str, Any]:
    return {
        **machine_basics(),
        "sqlite": sqlite3.sqlite_version,
        "sqlalchemy": sqlalchemy.__version__,
        "loadavg_1m_before": load_before,
        "loadavg_1m_after": os.getloadavg()[0],
    }


async def run(it: Iterations, *, quick: bool, quiet: bool) -> dict[str, Any]:
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="chatfn-session-bench-") as tmp:
        async with open_runtime(f"sqlite:///{tmp}/bench.db") as rt:
            bench_app = await rt.ensure_app("bench")
            await bench_app.deploy(FUNCTIONS)
            await bench_app.set_secret("DEMO_PASSWORD", PASSWORD)
            guest_app = await rt.create_app("guest", guest_users="enabled")
            bench = Bench(rt, bench_app, guest_app)
            try:
                log(quiet, f"setup: {USERS} users and {USERS} guests")
                await bench.setup()
                samples = await bench.sequential(it, quiet)
                log(quiet, f"throughput: {it.throughput_tasks} concurrent tasks")
                throughput = await bench.throughput(it)
            finally:
                bench.close()
    results = results_of(samples, bench.end)
    results.update(throughput)
    # Above 1: concurrency helps; below: N tasks get less done than one task in a loop.
    results["throughput_vs_sequential"] = results["throughput_per_s"] * (
        results["returning_p50_ms"] / 1e3
    )
    results["machine"] = machine(load_before)
    results["iterations"] = asdict(it)
    results["quick"] = quick
    results["elapsed_s"] = time.perf_counter() - started
    return results


def fmt(value: Any, digits: int = 2) -> str:
    return benchlib.fmt(value, digits)


# ---- report -------------------------------------------------------------------------------


LABELS = {
    "returning": "start_session, returning user (background hooks included)",
    "quiesced": "start_session, returning user, background drained first",
    "new_user": "start_session, new user (handler creates it)",
    "guest": "start_session, guest app, no handler, returning guest (floor)",
    "guest_new": "start_session, guest app, no handler, new guest",
    "invoke": "app.invoke(UserAttemptedStartSession), returning user",
    "end_session": "end_session (untimed in the above)",
    "hop": "one run_in_executor round trip (no-op)",
}


def markdown(r: Mapping[str, Any]) -> str:
    m = r["machine"]
    lines = [
        f"Session benchmark: {m['cpu_count']} CPUs ({m['cpu_model']}), Python {m['python']}, "
        f"SQLite {m['sqlite']}, SQLAlchemy {m['sqlalchemy']}, load average "
        f"{fmt(m['loadavg_1m_before'])} -> {fmt(m['loadavg_1m_after'])}"
        f"{' (quick)' if r['quick'] else ''}",
        "",
        "| path | p50 | p99 | max | per op: host / machine CPU, transactions | n |",
        "|---|---|---|---|---|---|",
    ]
    for kind, label in LABELS.items():
        per_op = ""
        if kind not in ("end_session", "hop"):
            per_op = (
                f"{fmt(r[f'{kind}_host_cpu_ms'])} / {fmt(r[f'{kind}_machine_cpu_ms'])} ms, "
                f"{fmt(r[f'{kind}_db_transactions'], 1)}"
            )
        lines.append(
            f"| {label} | {fmt(r[f'{kind}_p50_ms'])} ms | {fmt(r[f'{kind}_p99_ms'])} ms "
            f"| {fmt(r[f'{kind}_max_ms'])} ms | {per_op} | {r[f'{kind}_count']:,} |"
        )
    tasks = r["throughput_tasks"]
    rows = [
        ("returning / guest (p50)", f"{fmt(r['returning_vs_guest'])}x"),
        ("returning / invoke (p50)", f"{fmt(r['returning_vs_invoke'])}x"),
        ("returning - invoke (p50)", f"{fmt(r['returning_minus_invoke_ms'])} ms"),
        (
            "returning / quiesced (p50): earlier sessions' hooks",
            f"{fmt(r['returning_vs_quiesced'])}x (+{fmt(r['background_cost_ms'])} ms)",
        ),
        ("new user / returning (p50)", f"{fmt(r['new_user_vs_returning'])}x"),
        (f"throughput, {tasks} tasks, returning users", f"{fmt(r['throughput_per_s'], 0)} /s"),
        (
            "throughput including its background hooks",
            f"{fmt(r['throughput_with_background_per_s'], 0)} /s "
            f"(drain {fmt(r['throughput_background_drain_s'])} s)",
        ),
        (
            "throughput latency p50 / p99",
            f"{fmt(r['throughput_latency_p50_ms'])} / {fmt(r['throughput_latency_p99_ms'])} ms",
        ),
        (
            "throughput / sequential rate (1 / returning p50)",
            f"{fmt(r['throughput_vs_sequential'])}x",
        ),
        (
            "throughput CPU: host / machine (cores)",
            f"{fmt(r['throughput_host_cpu_cores'])} / {fmt(r['throughput_machine_cpu_cores'])}",
        ),
        (
            "throughput per session (start + hooks): host CPU, transactions",
            f"{fmt(r['throughput_host_cpu_ms_per_session'])} ms, "
            f"{fmt(r['throughput_db_transactions_per_session'], 1)}",
        ),
        ("iterations", ", ".join(f"{k} {v}" for k, v in r["iterations"].items())),
        ("run time", f"{fmt(r['elapsed_s'], 1)} s"),
    ]
    lines += ["", "| comparison | value |", "|---|---|", *(f"| {a} | {b} |" for a, b in rows)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parser(__doc__).parse_args(argv)
    it = Iterations.quick() if args.quick else Iterations.full()
    results = asyncio.run(run(it, quick=args.quick, quiet=args.quiet))
    return emit(results, args.json, markdown)


if __name__ == "__main__":
    sys.exit(main())
