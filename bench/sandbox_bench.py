"""Benchmarks of the sandbox: what process isolation costs per invocation, and what it saves.

Measured in one run, on one trivial handler that makes one host call
(``context.users.check_user_exists(event.username)``):

- warm:        ``WorkerPool.invoke`` on a warm worker (the production path);
- floor:       a raw socketpair round trip to a forked echo child with the same codec and
               framing (``sandbox.wire``), doubled: one round trip for the invocation, one for
               the host call. Also the same four-message conversation measured directly,
               and a bare round trip (fixed bytes, ``recv_into``: no codec, no framing).
               Measured in blocks interleaved with the warm run, so both see the same machine;
- in-process:  the same restricted code called directly in this process (no isolation);
- fresh:       the naive sandbox, a new ``python -I`` interpreter per invocation;
- spawn:       template fork to a ready worker;
- memory:      an idle worker's private memory (what each extra worker really costs);
- throughput:  two workers under concurrent load from four threads;
- OS layers:   template boot, worker spawn and warm invoke with every isolation layer
               (``Policy.layers``) on, with none, and with each layer alone; the layers a
               template actually set up are recorded next to each figure.

``python bench/sandbox_bench.py`` prints a Markdown table with the targets; ``--json`` prints
one JSON object and nothing else on stdout (progress goes to stderr, ``--quiet`` drops it);
``--quick`` runs about a tenth of the iterations, as a smoke test. The script pins nothing:
run it under ``taskset -c 0`` to see the same figures without cross-core wake-ups.
"""

from __future__ import annotations

import gc
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from benchlib import emit, fmt, log, machine_basics, parser, percentile, self_cpu_s

from sandbox import DEFAULT_POLICY, Deployment, DeploymentPool, Limits, Policy, WorkerPool
from sandbox.compiler import compile_source
from sandbox.guards import Guards
from sandbox.handler_api import Context, Event, SessionRejected, UserExistsError
from sandbox.policy import ALL_LAYERS, LAYERS
from sandbox.process import WorkerHandle
from sandbox.wire import FrameReader, encode

ROOT = str(Path(__file__).resolve().parent.parent)
HANDLER_FILE = "h.py"
HANDLER = "h"
HANDLER_SRC = (
    "def handle_event(event, context):\n"
    "    return context.users.check_user_exists(event.username)\n"
)
EVENT: dict[str, Any] = {"username": "bob"}
APP = "bench"
TIMEOUT_MS = 5000
FRAME_CAP = 1 << 20
MIB = 1024 * 1024


def user_exists(name: str) -> bool:
    return name == "bob"


CAPABILITIES: dict[str, Callable[..., Any]] = {"users.check_user_exists": user_exists}

# The naive sandbox: a fresh interpreter per invocation that compiles the handler with the
# same RestrictedPython rules and guards, answers its one host call over stdin/stdout (JSON
# lines), and prints the result. No OS limits: it is the cheapest honest version of the idea.
FRESH_CHILD = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from sandbox.compiler import compile_source
from sandbox.guards import Guards
from sandbox.handler_api import Context, Event, SessionRejected, UserExistsError
from sandbox.policy import DEFAULT_POLICY

def call(name, *args, **kwargs):
    msg = {"t": "call", "name": name, "args": list(args), "kwargs": kwargs}
    sys.stdout.write(json.dumps(msg) + "\n")
    sys.stdout.flush()
    reply = json.loads(sys.stdin.readline())
    return reply["value"]

code, errors = compile_source(sys.argv[3], sys.argv[2], is_handler=True)
if errors:
    raise SystemExit(str(errors[0]))
guards = Guards(DEFAULT_POLICY, sys.stderr.write)
ns = guards.namespace("h", {"SessionRejected": SessionRejected, "UserExistsError": UserExistsError})
exec(code, ns)
ctx = Context(app="bench", invocation_id=sys.argv[5], timeout_ms=5000, call=call,
              log=sys.stderr.write)
value = ns["handle_event"](Event(json.loads(sys.argv[4])), ctx)
sys.stdout.write(json.dumps({"t": "result", "ok": True, "value": value}) + "\n")
"""


@dataclass(frozen=True)
class Iterations:
    warmup: int
    warm: int
    floor: int
    inprocess: int
    fresh: int
    spawn: int
    throughput: int
    throughput_threads: int

    @classmethod
    def full(cls) -> Iterations:
        return cls(300, 3000, 5000, 20000, 25, 50, 6000, 4)

    @classmethod
    def quick(cls) -> Iterations:
        return cls(30, 300, 500, 2000, 3, 5, 600, 4)


# ---- measuring ----------------------------------------------------------------------------


def summarize(ns: list[int], scale: float) -> dict[str, float]:
    """p50/p90/p99/max/mean of durations in ns, divided by ``scale`` (1e3: us, 1e6: ms)."""
    values = sorted(v / scale for v in ns)
    return {
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "max": values[-1],
        "mean": sum(values) / len(values),
    }


def system_busy_ticks() -> int:
    """Jiffies all CPUs spent not idle, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    steal_guest = sum(fields[7:]) if len(fields) > 7 else 0  # steal, guest(_nice)
    return sum(fields) - idle - steal_guest


@dataclass
class CpuSample:
    """CPU used while a block ran: by this process, and by the whole machine."""

    wall_s: float = 0.0
    self_s: float = 0.0
    system_s: float = 0.0


@contextmanager
def cpu_accounting() -> Iterator[CpuSample]:
    sample = CpuSample()
    tick = os.sysconf("SC_CLK_TCK")
    wall0, self0, sys0 = time.perf_counter(), self_cpu_s(), system_busy_ticks()
    try:
        yield sample
    finally:
        sample.wall_s = time.perf_counter() - wall0
        sample.self_s = self_cpu_s() - self0
        sample.system_s = (system_busy_ticks() - sys0) / tick


def smaps_rollup(pid: int) -> dict[str, int] | None:
    """/proc/<pid>/smaps_rollup in kB, or None when it cannot be read (not root)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    out: dict[str, int] = {}
    for line in lines:
        parts = line.split()
        if len(parts) == 3 and parts[2] == "kB":
            out[parts[0].rstrip(":")] = int(parts[1])
    return out


def memory_of(pid: int) -> dict[str, float | None]:
    rollup = smaps_rollup(pid)
    if rollup is None:
        return {"private_mib": None, "rss_mib": None, "pss_mib": None}
    private = rollup.get("Private_Clean", 0) + rollup.get("Private_Dirty", 0)
    return {
        "private_mib": private / 1024,
        "rss_mib": rollup.get("Rss", 0) / 1024,
        "pss_mib": rollup.get("Pss", 0) / 1024,
    }


# ---- the floor: raw frames to a forked echo child -----------------------------------------


def invoke_message(invocation_id: str) -> dict[str, Any]:
    """Same shape as the frame ``DeploymentPool.invoke`` sends."""
    return {
        "t": "invoke",
        "handler": HANDLER,
        "event": EVENT,
        "ctx": {"app": APP, "invocation_id": invocation_id, "timeout_ms": TIMEOUT_MS},
    }


CALL_MESSAGE: dict[str, Any] = {
    "t": "call",
    "name": "users.check_user_exists",
    "args": ["bob"],
    "kwargs": {},
}
REPLY_MESSAGE: dict[str, Any] = {"t": "reply", "ok": True, "value": True}
RESULT_MESSAGE: dict[str, Any] = {"t": "result", "ok": True, "value": True}


def echo_child(sock: socket.socket) -> NoReturn:
    """Answers an invoke with a host call and a reply with a result, like a worker would."""
    status = 0
    try:
        reader = FrameReader(sock, FRAME_CAP)
        while True:
            try:
                msg = reader.read()
            except EOFError:
                break
            answer = CALL_MESSAGE if msg.get("t") == "invoke" else RESULT_MESSAGE
            sock.sendall(encode(answer, FRAME_CAP))
    except BaseException:  # a forked child must never return into the bench
        status = 1
    finally:
        os._exit(status)


def bare_echo_child(sock: socket.socket, request_size: int, reply: bytes) -> NoReturn:
    """No codec at all: reads ``request_size`` bytes into a fixed buffer, writes ``reply``."""
    status = 0
    try:
        buf = bytearray(65536)
        view = memoryview(buf)
        while True:
            got = 0
            while got < request_size:
                n = sock.recv_into(view[got:])
                if n == 0:
                    raise EOFError
                got += n
            sock.sendall(reply)
    except EOFError:
        pass
    except BaseException:  # a forked child must never return into the bench
        status = 1
    finally:
        os._exit(status)


def fork_child(body: Callable[[socket.socket], NoReturn]) -> tuple[int, socket.socket]:
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:
        parent.close()
        body(child)
    child.close()
    return pid, parent


class Floor:
    """The echo children, forked up front (before any thread exists in this process) and
    measured later, interleaved with the warm run so both see the same conditions."""

    def __init__(self) -> None:
        invocation_id = uuid.uuid4().hex
        self.invoke = invoke_message(invocation_id)
        self.request = encode(self.invoke, FRAME_CAP)
        self.reply = encode(CALL_MESSAGE, FRAME_CAP)
        self.pid, self.sock = fork_child(echo_child)
        request_size = len(self.request)
        reply = self.reply
        self.bare_pid, self.bare = fork_child(lambda s: bare_echo_child(s, request_size, reply))
        self.reader = FrameReader(self.sock, FRAME_CAP)
        self.bare_buf = memoryview(bytearray(65536))

    def round_trip(self) -> None:
        """What the pool does per frame: encode, send, poll with a deadline, recv, decode."""
        self.sock.sendall(encode(self.invoke, FRAME_CAP))
        self.reader.read(time.monotonic() + TIMEOUT_MS / 1000)

    def conversation(self) -> None:
        """The four messages of one invocation: invoke -> call, reply -> result."""
        deadline = time.monotonic() + TIMEOUT_MS / 1000
        self.sock.sendall(encode(self.invoke, FRAME_CAP))
        self.reader.read(deadline)
        self.sock.sendall(encode(REPLY_MESSAGE, FRAME_CAP))
        self.reader.read(deadline)

    def bare_round_trip(self) -> None:
        """The kernel and interpreter minimum: fixed bytes out, recv_into a fixed buffer."""
        self.bare.sendall(self.request)
        got = 0
        while got < len(self.reply):
            n = self.bare.recv_into(self.bare_buf[got:])
            if n == 0:
                raise EOFError
            got += n

    def close(self) -> None:
        self.sock.close()
        self.bare.close()
        os.waitpid(self.pid, 0)
        os.waitpid(self.bare_pid, 0)


# ---- in-process: the same restricted code, no isolation -----------------------------------


def bench_inprocess(it: Iterations) -> dict[str, Any]:
    code, errors = compile_source(HANDLER_FILE, HANDLER_SRC, is_handler=True)
    if code is None:
        raise RuntimeError(f"handler does not compile: {errors}")
    sink: list[str] = []
    guards = Guards(DEFAULT_POLICY, sink.append)
    namespace = guards.namespace(
        HANDLER, {"SessionRejected": SessionRejected, "UserExistsError": UserExistsError}
    )
    exec(code, namespace)
    handler: Callable[[Event, Context], Any] = namespace["handle_event"]
    caps: Mapping[str, Callable[..., Any]] = CAPABILITIES

    def call(name: str, *args: Any, **kwargs: Any) -> Any:
        return caps[name](*args, **kwargs)

    def once() -> None:
        guards.violations.clear()
        context = Context(
            app=APP,
            invocation_id=uuid.uuid4().hex,
            timeout_ms=TIMEOUT_MS,
            call=call,
            log=sink.append,
        )
        if handler(Event(EVENT), context) is not True or guards.violations:
            raise RuntimeError("in-process handler gave the wrong answer")

    for _ in range(it.warmup):
        once()
    gc.collect()
    samples: list[int] = []
    for _ in range(it.inprocess):
        t0 = time.perf_counter_ns()
        once()
        samples.append(time.perf_counter_ns() - t0)
    us = summarize(samples, 1e3)
    return {"inprocess_p50_us": us["p50"], "inprocess_p99_us": us["p99"]}


# ---- the naive sandbox: a fresh interpreter per invocation --------------------------------


def fresh_invoke() -> Any:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-I",
            "-c",
            FRESH_CHILD,
            ROOT,
            HANDLER_SRC,
            HANDLER_FILE,
            json.dumps(EVENT),
            uuid.uuid4().hex,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={"LANG": "C.UTF-8"},
        cwd="/",
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        value: Any = None
        for line in proc.stdout:
            msg = json.loads(line)
            if msg["t"] == "call":
                answer = CAPABILITIES[msg["name"]](*msg["args"], **msg["kwargs"])
                proc.stdin.write(json.dumps({"t": "reply", "ok": True, "value": answer}).encode())
                proc.stdin.write(b"\n")
                proc.stdin.flush()
            elif msg["t"] == "result":
                value = msg["value"]
        proc.stdin.close()
        stderr = proc.stderr.read() if proc.stderr is not None else b""
        if proc.wait() != 0 or value is not True:
            raise RuntimeError(f"fresh-process handler failed: {stderr.decode()[-2000:]}")
        return value
    finally:
        proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def bench_fresh(it: Iterations) -> dict[str, Any]:
    fresh_invoke()  # warm the page cache
    samples: list[int] = []
    for _ in range(it.fresh):
        t0 = time.perf_counter_ns()
        fresh_invoke()
        samples.append(time.perf_counter_ns() - t0)
    ms = summarize(samples, 1e6)
    return {"fresh_process_p50_ms": ms["p50"], "fresh_process_p99_ms": ms["p99"]}


# ---- the worker pool ----------------------------------------------------------------------


def deployment(app: str, limits: Limits) -> Deployment:
    return Deployment(app=app, version=1, files={HANDLER_FILE: HANDLER_SRC}, limits=limits)


def invoke_ok(pool: WorkerPool, dep: Deployment) -> None:
    result = pool.invoke(dep, HANDLER, EVENT, capabilities=CAPABILITIES)
    if not result.ok or result.value is not True:
        raise RuntimeError(f"invocation failed: {result.error}")


def spawns_and_reaps(dp: DeploymentPool, count: int) -> tuple[list[int], list[int]]:
    """``count`` worker spawns straight from the template, each reaped at once: the spawn
    and reap durations in ns."""
    spawn_ns: list[int] = []
    reap_ns: list[int] = []
    for _ in range(count):
        t0 = time.perf_counter_ns()
        handle = dp.zygote.spawn()
        t1 = time.perf_counter_ns()
        dp.zygote.reap(handle)
        spawn_ns.append(t1 - t0)
        reap_ns.append(time.perf_counter_ns() - t1)
    return spawn_ns, reap_ns


def idle_worker(dp: DeploymentPool) -> WorkerHandle:
    with dp._cond:
        if not dp._idle:
            raise RuntimeError("no idle worker")
        return dp._idle[-1]


def host_pid(worker: WorkerHandle) -> int:
    """The worker's pid in this process's pid namespace. ``WorkerHandle.pid`` is the pid the
    template sees, which with the pid_namespace layer is a pid inside the deployment's own
    namespace (2, 3, ...); the pidfd's fdinfo gives the one /proc here knows."""
    with open(f"/proc/self/fdinfo/{worker.pidfd}") as f:
        for line in f:
            if line.startswith("Pid:"):
                return int(line.split()[1])
    return worker.pid


def template_pid(dp: DeploymentPool) -> int | None:
    """The template's pid here. With the pid_namespace layer the process the host started
    forks the template (pid 1 of the new namespace) and only waits for it: its one child."""
    proc = dp.zygote._proc
    if proc is None:
        return None
    if not dp.zygote.report.on.get("pid_namespace"):
        return proc.pid
    try:
        with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
            children = f.read().split()
    except OSError:
        return None
    return int(children[0]) if len(children) == 1 else None


def timed(fn: Callable[[], None], count: int, into: list[int], cpu: CpuSample) -> None:
    """Run ``fn`` ``count`` times, appending each duration (ns) and adding up the CPU used."""
    with cpu_accounting() as block:
        for _ in range(count):
            t0 = time.perf_counter_ns()
            fn()
            into.append(time.perf_counter_ns() - t0)
    cpu.wall_s += block.wall_s
    cpu.self_s += block.self_s
    cpu.system_s += block.system_s


def bench_warm(pool: WorkerPool, floor: Floor, it: Iterations) -> dict[str, Any]:
    # No recycling during the run: this measures the warm path only (with the default of
    # 1000 invocations per worker, one invocation in 1000 would also pay for a spawn).
    dep = deployment(APP, Limits(max_invocations=10_000_000))
    dp = pool.prepare(dep, warm=1)
    few = 5
    for _ in range(few):
        invoke_ok(pool, dep)
    worker = idle_worker(dp)
    mem_few = memory_of(host_pid(worker))

    def warm_invoke() -> None:
        invoke_ok(pool, dep)

    kinds: dict[str, tuple[Callable[[], None], int]] = {
        "warm": (warm_invoke, it.warm),
        "floor": (floor.round_trip, it.floor),
        "conversation": (floor.conversation, it.floor),
        "bare": (floor.bare_round_trip, it.floor),
    }
    for fn, _ in kinds.values():
        for _ in range(it.warmup):
            fn()
    spawns_before = len(dp.spawn_ms)
    samples: dict[str, list[int]] = {kind: [] for kind in kinds}
    cpu = {kind: CpuSample() for kind in kinds}
    # Interleaved blocks: a drift in the machine (the VM's neighbours, frequency) hits all
    # four measurements alike instead of whichever happened to run at the time.
    blocks = 10
    for _ in range(blocks):
        for kind, (fn, total) in kinds.items():
            gc.collect()
            timed(fn, total // blocks, samples[kind], cpu[kind])
    if len(dp.spawn_ms) != spawns_before or idle_worker(dp) is not worker:
        raise RuntimeError("the warm worker was replaced during the warm run")
    mem_after = memory_of(host_pid(worker))
    us = summarize(samples["warm"], 1e3)
    rt_us = summarize(samples["floor"], 1e3)
    n_warm, n_floor = len(samples["warm"]), len(samples["floor"])

    spawn_ns, reap_ns = spawns_and_reaps(dp, it.spawn)
    spawn_ms = summarize(spawn_ns, 1e6)
    zygote = dp.zygote._proc
    started = zygote.pid if zygote is not None else None
    template = template_pid(dp)
    zygote_mem: Mapping[str, float | None] = memory_of(template) if template is not None else {}
    # With a pid namespace, the process the host started only waits for the template.
    waiter_mem: Mapping[str, float | None] = (
        memory_of(started) if started is not None and started != template else {}
    )
    return {
        "warm_p50_us": us["p50"],
        "warm_p90_us": us["p90"],
        "warm_p99_us": us["p99"],
        "warm_max_us": us["max"],
        "warm_mean_us": us["mean"],
        "warm_host_cpu_us": cpu["warm"].self_s / n_warm * 1e6,
        "warm_total_cpu_us": cpu["warm"].system_s / n_warm * 1e6,
        "floor_rt_p50_us": rt_us["p50"],
        "floor_rt_p99_us": rt_us["p99"],
        "floor_p50_us": 2 * rt_us["p50"],
        "floor_conversation_p50_us": summarize(samples["conversation"], 1e3)["p50"],
        "floor_bare_rt_p50_us": summarize(samples["bare"], 1e3)["p50"],
        "floor_rt_total_cpu_us": cpu["floor"].system_s / n_floor * 1e6,
        "invoke_frame_bytes": len(floor.request),
        "spawn_p50_ms": spawn_ms["p50"],
        "spawn_p99_ms": spawn_ms["p99"],
        "reap_p50_ms": summarize(reap_ns, 1e6)["p50"],
        "worker_private_mib": mem_few["private_mib"],
        "worker_rss_mib": mem_few["rss_mib"],
        "worker_pss_mib": mem_few["pss_mib"],
        "worker_invocations_at_memory_sample": few,
        "worker_private_after_warm_run_mib": mem_after["private_mib"],
        "worker_invocations_after_warm_run": worker.invocations,
        "zygote_rss_mib": zygote_mem.get("rss_mib"),
        "zygote_private_mib": zygote_mem.get("private_mib"),
        "zygote_waiter_rss_mib": waiter_mem.get("rss_mib"),
        "zygote_waiter_private_mib": waiter_mem.get("private_mib"),
    }


def bench_throughput(pool: WorkerPool, it: Iterations) -> dict[str, Any]:
    # Default limits apart from two workers: recycling after 1000 invocations included.
    dep = deployment(f"{APP}-throughput", Limits(max_workers=2))
    dp = pool.prepare(dep, warm=2)
    threads = it.throughput_threads
    per_thread = it.throughput // threads
    failures: list[str] = []
    latencies: list[list[int]] = [[] for _ in range(threads)]
    barrier = threading.Barrier(threads + 1)

    def run(index: int, count: int, record: bool) -> None:
        mine = latencies[index]
        if record:
            barrier.wait()
        for _ in range(count):
            t0 = time.perf_counter_ns()
            result = pool.invoke(dep, HANDLER, EVENT, capabilities=CAPABILITIES)
            if record:
                mine.append(time.perf_counter_ns() - t0)
            if not result.ok:
                failures.append(str(result.error))

    warmers = [threading.Thread(target=run, args=(i, 50, False)) for i in range(threads)]
    for t in warmers:
        t.start()
    for t in warmers:
        t.join()
    gc.collect()
    spawns_before = len(dp.spawn_ms)
    workers = [threading.Thread(target=run, args=(i, per_thread, True)) for i in range(threads)]
    for t in workers:
        t.start()
    with cpu_accounting() as cpu:
        barrier.wait()
        for t in workers:
            t.join()
    if failures:
        raise RuntimeError(f"{len(failures)} invocations failed under load: {failures[0]}")
    total = per_thread * threads
    us = summarize([v for per in latencies for v in per], 1e3)
    return {
        "throughput_per_s": total / cpu.wall_s,
        "throughput_invocations": total,
        "throughput_wall_s": cpu.wall_s,
        "throughput_latency_p50_us": us["p50"],
        "throughput_latency_p99_us": us["p99"],
        "throughput_host_cpu_util": cpu.self_s / cpu.wall_s,
        "throughput_system_cpu_util": cpu.system_s / cpu.wall_s,
        "throughput_respawns": len(dp.spawn_ms) - spawns_before,
    }


# ---- OS layers: what the isolation layers cost --------------------------------------------


@dataclass(frozen=True)
class LayerIterations:
    """Rounds per configuration, and per round: spawns and timed warm invocations (per
    placement). "all" and "none" get more rounds; each layer alone gets fewer (enough to
    show which, if any, stands out). Every round is a fresh deployment: rounds = boots."""

    rounds: int
    single_rounds: int
    spawns: int
    warm: int

    @classmethod
    def full(cls) -> LayerIterations:
        return cls(15, 5, 3, 150)

    @classmethod
    def quick(cls) -> LayerIterations:
        return cls(4, 1, 2, 50)


# Where the warm worker runs relative to the invoking thread. "free": wherever the scheduler
# puts it (production). On a machine with more than one CPU that is bimodal per worker: low
# when the worker shares the invoking thread's CPU (a message is a direct hand-off), about
# twice that when every message wakes the other CPU, and a worker tends to keep its mode for
# life. Which mode a worker lands in varies from run to run, so a "free" p50 compares
# placements as much as layers; pinning both ("same_cpu", "other_cpu") compares layers.
PLACEMENTS = ("free", "same_cpu", "other_cpu")


@dataclass
class LayerConfig:
    """One ``Policy.layers`` setting: what its templates set up, and its samples (ns)."""

    name: str
    layers: frozenset[str]
    rounds: int
    on: dict[str, bool] | None = None
    why_off: dict[str, str] = field(default_factory=dict)
    reports_differing: int = 0
    boot_ns: list[int] = field(default_factory=list)
    retire_ns: list[int] = field(default_factory=list)
    spawn_ns: list[int] = field(default_factory=list)
    reap_ns: list[int] = field(default_factory=list)
    warm_ns: dict[str, list[int]] = field(default_factory=lambda: {p: [] for p in PLACEMENTS})
    warm_round_p50_us: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        on = self.on or {}
        boot, spawn = summarize(self.boot_ns, 1e6), summarize(self.spawn_ns, 1e6)
        out: dict[str, Any] = {
            "requested": [layer for layer in LAYERS if layer in self.layers],
            "on": [layer for layer in LAYERS if on.get(layer)],
            "on_count": sum(on.values()),
            # Why a requested layer is off (those the policy turned off are not listed).
            "why_off": {k: v for k, v in self.why_off.items() if k in self.layers},
            "boot_p50_ms": boot["p50"],
            "boot_p90_ms": boot["p90"],
            "retire_p50_ms": summarize(self.retire_ns, 1e6)["p50"],
            "spawn_p50_ms": spawn["p50"],
            "spawn_p90_ms": spawn["p90"],
            "reap_p50_ms": summarize(self.reap_ns, 1e6)["p50"],
        }
        for placement, samples in self.warm_ns.items():
            us = summarize(samples, 1e3) if samples else {}
            suffix = "" if placement == "free" else f"_{placement}"
            out[f"warm{suffix}_p50_us"] = us.get("p50")
            out[f"warm{suffix}_p90_us"] = us.get("p90")
        # One "free" p50 per round, i.e. per worker: shows the bimodal placement.
        out["warm_round_p50_us"] = self.warm_round_p50_us
        out["boots"] = len(self.boot_ns)
        out["spawns"] = len(self.spawn_ns)
        out["invocations_per_placement"] = len(self.warm_ns["free"])
        out["reports_differing"] = self.reports_differing
        return out


def layer_configs(it: LayerIterations) -> list[LayerConfig]:
    configs = [
        LayerConfig("all", ALL_LAYERS, it.rounds),
        LayerConfig("none", frozenset(), it.rounds),
    ]
    if it.single_rounds:
        configs += [LayerConfig(layer, frozenset({layer}), it.single_rounds) for layer in LAYERS]
    return configs


@contextmanager
def placed(worker_pid: int, placement: str) -> Iterator[bool]:
    """Pin this thread and the worker for ``placement``; yields False when the machine
    cannot (one CPU for "other_cpu"). This thread's affinity is restored afterwards."""
    cpus = sorted(os.sched_getaffinity(0))
    if placement == "free":
        yield True
        return
    if placement == "other_cpu" and len(cpus) < 2:
        yield False
        return
    host_cpu, worker_cpu = cpus[0], cpus[1] if placement == "other_cpu" else cpus[0]
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {host_cpu})
    try:
        os.sched_setaffinity(worker_pid, {worker_cpu})
        yield True
    finally:
        os.sched_setaffinity(0, before)


def layer_round(pool: WorkerPool, c: LayerConfig, version: int, it: LayerIterations) -> None:
    """One fresh deployment under ``c``'s layers: boot it, spawn, invoke warm, retire."""
    dep = Deployment(
        app=f"{APP}-layers-{c.name}",
        version=version,  # never booted before
        files={HANDLER_FILE: HANDLER_SRC},
        limits=Limits(max_invocations=10_000_000),
        policy=Policy().with_layers(c.layers),
    )
    # Template boot: what prepare(warm=0) costs a deployment (validate, start the template
    # interpreter, its imports and its layers, the cgroup). Retire is timed apart.
    gc.collect()
    t0 = time.perf_counter_ns()
    dp = pool.prepare(dep, warm=0)
    boot_ns = time.perf_counter_ns() - t0
    try:
        report = dp.zygote.report
        if c.on is None:
            c.on, c.why_off = dict(report.on), dict(report.why_off)
        elif report.on != c.on:
            c.reports_differing += 1
        # Spawn: the very call the pool makes for a new worker (DeploymentPool._spawn_counted,
        # whose spawn_ms records the same interval), from the request to the template
        # through its fork and the worker's own layers (Landlock ruleset, rlimits) to the
        # worker's ready frame. Called directly so the figure is that and nothing else:
        # forcing spawns with max_invocations=1 would add the invocation, the kill and reap
        # of the previous worker and a race with the janitor's replacement spawn. The reap
        # is timed apart.
        spawn_ns, reap_ns = spawns_and_reaps(dp, it.spawns)
        # Warm invoke: the same handler and host call as bench_warm, on this round's one
        # worker (the first, untimed invocation spawns it), in each placement. A fresh
        # worker per round, so "free" samples as many placements as there are rounds.
        for _ in range(20):
            invoke_ok(pool, dep)
        worker = idle_worker(dp)
        spawns = len(dp.spawn_ms)
        warm_ns: dict[str, list[int]] = {p: [] for p in PLACEMENTS}

        def warm_invoke() -> None:
            invoke_ok(pool, dep)

        for placement in PLACEMENTS:
            with placed(host_pid(worker), placement) as possible:
                if possible:
                    for _ in range(10):  # let the worker migrate
                        warm_invoke()
                    gc.collect()
                    timed(warm_invoke, it.warm, warm_ns[placement], CpuSample())
        if len(dp.spawn_ms) != spawns or idle_worker(dp) is not worker:
            raise RuntimeError(f"layers {c.name}: the warm worker was replaced")
    finally:
        t0 = time.perf_counter_ns()
        pool.retire(dep.key)
        retire_ns = time.perf_counter_ns() - t0
    if version > 0:
        c.boot_ns.append(boot_ns)
        c.retire_ns.append(retire_ns)
        c.spawn_ns += spawn_ns
        c.reap_ns += reap_ns
        for placement, samples in warm_ns.items():
            c.warm_ns[placement] += samples
        c.warm_round_p50_us.append(summarize(warm_ns["free"], 1e3)["p50"])


def bench_layers(pool: WorkerPool, it: LayerIterations) -> dict[str, Any]:
    """Template boot, worker spawn and warm invoke per layer configuration, in interleaved
    rounds (each configuration once per round, each round a fresh deployment) so a drift
    of the VM hits all configurations alike. Round 0 is a warm-up (page cache, cgroup
    hierarchy) and is not recorded."""
    configs = layer_configs(it)
    for version in range(max(c.rounds for c in configs) + 1):
        for c in configs:
            if version <= c.rounds:
                layer_round(pool, c, version, it)
    out = {c.name: c.summary() for c in configs}
    for c in configs:
        if c.reports_differing:
            log(False, f"layers {c.name}: {c.reports_differing} templates set up other layers")
    all_, none = out["all"], out["none"]
    keys = ["boot_p50_ms", "spawn_p50_ms", "warm_p50_us", "warm_same_cpu_p50_us"]
    keys += ["warm_other_cpu_p50_us"]
    return {
        "layers": out,
        "layers_all_vs_none": {
            key.removesuffix("_ms").removesuffix("_us"): (
                all_[key] / none[key] if all_[key] is not None and none[key] else None
            )
            for key in keys
        },
        "layers_iterations": asdict(it),
    }


# ---- report -------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    return {
        **machine_basics(),
        "euid": os.geteuid(),
    }


def targets(r: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    def check(value: float | None, limit: float, *, at_least: bool = False) -> dict[str, Any]:
        ok = None if value is None else (value >= limit if at_least else value <= limit)
        return {"value": value, "target": limit, "ok": ok}

    return {
        "warm_p50_us": check(r["warm_p50_us"], 200),
        "warm_vs_floor": check(r["warm_vs_floor"], 1.5),
        "warm_p99_us": check(r["warm_p99_us"], 500),
        "spawn_p50_ms": check(r["spawn_p50_ms"], 5),
        "worker_private_mib": check(r["worker_private_mib"], 4),
        "throughput_per_s": check(r["throughput_per_s"], 5000, at_least=True),
    }


def markdown(r: Mapping[str, Any]) -> str:
    t = r["targets"]

    def verdict(key: str) -> str:
        ok = t[key]["ok"]
        return "n/a" if ok is None else ("yes" if ok else "**no**")

    m = r["machine"]
    it = r["iterations"]
    rows = [
        ("warm invoke p50", f"{fmt(r['warm_p50_us'])} us", "<= 200 us", verdict("warm_p50_us")),
        ("warm invoke p99", f"{fmt(r['warm_p99_us'])} us", "<= 500 us", verdict("warm_p99_us")),
        (
            "floor p50 (2 x raw round trip)",
            f"{fmt(r['floor_p50_us'])} us (1 RT {fmt(r['floor_rt_p50_us'])} us)",
            "",
            "",
        ),
        ("warm / floor", f"{fmt(r['warm_vs_floor'], 2)}x", "<= 1.5x", verdict("warm_vs_floor")),
        ("in-process p50 (no isolation)", f"{fmt(r['inprocess_p50_us'])} us", "", ""),
        ("fresh process p50 (naive sandbox)", f"{fmt(r['fresh_process_p50_ms'])} ms", "", ""),
        ("fresh / warm", f"{fmt(r['warm_vs_fresh'], 0)}x faster", "(reported)", ""),
        (
            "spawn p50 (fork to ready)",
            f"{fmt(r['spawn_p50_ms'], 2)} ms",
            "<= 5 ms",
            verdict("spawn_p50_ms"),
        ),
        (
            "worker private memory",
            f"{fmt(r['worker_private_mib'], 2)} MiB",
            "<= 4 MiB",
            verdict("worker_private_mib"),
        ),
        ("zygote RSS", f"{fmt(r['zygote_rss_mib'])} MiB", "", ""),
        (
            "throughput, 2 workers",
            f"{fmt(r['throughput_per_s'], 0)} /s",
            ">= 5,000 /s",
            verdict("throughput_per_s"),
        ),
    ]
    lines = [
        f"Sandbox benchmark: {m['cpu_count']} CPUs ({m['cpu_model']}), "
        f"affinity {m['cpu_affinity']}, Python {m['python']}, kernel {m['kernel']}"
        f"{' (quick)' if r['quick'] else ''}",
        "",
        "| metric | value | target | met |",
        "|---|---|---|---|",
        *(f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows),
        "",
        "| detail | value |",
        "|---|---|",
    ]
    details = [
        (
            "warm p90 / max / mean",
            f"{fmt(r['warm_p90_us'])} / {fmt(r['warm_max_us'])} / {fmt(r['warm_mean_us'])} us",
        ),
        (
            "warm CPU per invoke: host process / whole machine",
            f"{fmt(r['warm_host_cpu_us'])} / {fmt(r['warm_total_cpu_us'])} us",
        ),
        (
            "floor: 4-message conversation p50 (measured)",
            f"{fmt(r['floor_conversation_p50_us'])} us",
        ),
        ("floor: raw round trip p99", f"{fmt(r['floor_rt_p99_us'])} us"),
        (
            "bare socket round trip p50 (no codec, recv_into)",
            f"{fmt(r['floor_bare_rt_p50_us'])} us",
        ),
        ("floor: machine CPU per round trip", f"{fmt(r['floor_rt_total_cpu_us'])} us"),
        ("invoke frame size", f"{r['invoke_frame_bytes']} bytes"),
        ("in-process p99", f"{fmt(r['inprocess_p99_us'])} us"),
        (
            "warm - in-process (isolation overhead)",
            f"{fmt(r['warm_p50_us'] - r['inprocess_p50_us'])} us",
        ),
        ("fresh process p99", f"{fmt(r['fresh_process_p99_ms'])} ms"),
        ("spawn p99 / reap p50", f"{fmt(r['spawn_p99_ms'], 2)} / {fmt(r['reap_p50_ms'], 2)} ms"),
        ("worker RSS / PSS", f"{fmt(r['worker_rss_mib'])} / {fmt(r['worker_pss_mib'])} MiB"),
        (
            f"worker private after {r['worker_invocations_after_warm_run']} invocations",
            f"{fmt(r['worker_private_after_warm_run_mib'], 2)} MiB",
        ),
        ("zygote private", f"{fmt(r['zygote_private_mib'])} MiB"),
        (
            "throughput latency p50 / p99",
            f"{fmt(r['throughput_latency_p50_us'])} / {fmt(r['throughput_latency_p99_us'])} us",
        ),
        (
            "throughput CPU: host process / whole machine (cores)",
            f"{fmt(r['throughput_host_cpu_util'], 2)} / {fmt(r['throughput_system_cpu_util'], 2)}",
        ),
        ("throughput respawns (recycling at 1000 invocations)", fmt(r["throughput_respawns"])),
        ("iterations", ", ".join(f"{k} {v}" for k, v in it.items())),
        ("run time", f"{fmt(r['elapsed_s'])} s"),
    ]
    lines += [f"| {a} | {b} |" for a, b in details]
    return "\n".join([*lines, "", *layers_markdown(r)])


def layers_markdown(r: Mapping[str, Any]) -> list[str]:
    """The OS layers table: p50s per configuration, with the difference from "none" (for a
    single layer, that layer's own cost)."""
    configs: Mapping[str, Mapping[str, Any]] = r["layers"]
    none = configs["none"]
    ratio = r["layers_all_vs_none"]
    it = r["layers_iterations"]
    columns = [
        ("boot_p50_ms", "ms", 1),
        ("spawn_p50_ms", "ms", 2),
        ("warm_p50_us", "us", 1),
        ("warm_same_cpu_p50_us", "us", 1),
        ("warm_other_cpu_p50_us", "us", 1),
    ]

    def cell(c: Mapping[str, Any], key: str, unit: str, digits: int) -> str:
        if c[key] is None:
            return "n/a"
        value = f"{fmt(c[key], digits)} {unit}"
        if c is none or none[key] is None:
            return value
        return f"{value} ({c[key] - none[key]:+,.{digits}f})"

    def row(name: str, label: str) -> str:
        c = configs[name]
        rounds = c["warm_round_p50_us"]
        cells = [cell(c, *column) for column in columns]
        spread = f"{fmt(min(rounds), 0)}-{fmt(max(rounds), 0)} us"
        return f"| {label} ({c['on_count']} on) | {' | '.join(cells)} | {spread} |"

    ratios = " | ".join(
        "n/a" if (v := ratio[key.removesuffix("_ms").removesuffix("_us")]) is None
        else f"{fmt(v, 2)}x"
        for key, _, _ in columns
    )  # fmt: skip
    lines = [
        "OS layers, p50 (in parentheses: difference from none). Per configuration "
        f"{it['rounds']} rounds (each layer alone: {it['single_rounds']}), each a fresh "
        f"deployment: 1 template boot, {it['spawns']} spawns, then {it['warm']} warm "
        "invocations per placement on one fresh worker",
        "",
        "| layers | template boot | worker spawn | warm invoke | warm, same CPU "
        "| warm, other CPU | warm, per-round p50s |",
        "|---|---|---|---|---|---|---|",
        row("all", "all"),
        row("none", "none"),
        f"| all / none | {ratios} | |",
        *(row(layer, f"{layer} alone") for layer in LAYERS if layer in configs),
    ]
    off = [
        f"{name if name in ('all', 'none') else name + ' alone'}: {layer} off ({why})"
        for name, c in configs.items()
        for layer, why in c["why_off"].items()
    ]
    if off:
        lines += ["", "Requested but off: " + "; ".join(off)]
    lines += [
        "",
        "warm invoke: the worker where the scheduler puts it. It is bimodal per worker: low "
        "when the worker shares the invoking thread's CPU, about twice that when every "
        "message wakes the other CPU; the per-round range shows both when both occurred, "
        "and which dominates varies from run to run. Same CPU / other CPU: the invoking "
        "thread and the worker pinned, so that the layers, not the placement, differ.",
    ]
    return lines


def run(it: Iterations, layer_it: LayerIterations, *, quick: bool, quiet: bool) -> dict[str, Any]:
    started = time.perf_counter()
    results: dict[str, Any] = {}
    floor = Floor()  # first: it forks, so no thread may exist yet
    try:
        log(quiet, "in-process: restricted code without isolation")
        results.update(bench_inprocess(it))
        with WorkerPool() as pool:
            log(quiet, "warm invocations interleaved with the floor; worker memory; spawn")
            results.update(bench_warm(pool, floor, it))
            log(quiet, "throughput: 2 workers, concurrent load")
            results.update(bench_throughput(pool, it))
    finally:
        floor.close()
    log(quiet, "fresh process per invocation")
    results.update(bench_fresh(it))
    log(quiet, "OS layers: template boot, spawn and warm invoke, all layers vs none vs each")
    with WorkerPool() as pool:
        results.update(bench_layers(pool, layer_it))
    results["warm_vs_floor"] = results["warm_p50_us"] / results["floor_p50_us"]
    results["warm_vs_fresh"] = results["fresh_process_p50_ms"] * 1000 / results["warm_p50_us"]
    results["isolation_overhead_us"] = results["warm_p50_us"] - results["inprocess_p50_us"]
    results["targets"] = targets(results)
    results["machine"] = machine()
    results["iterations"] = asdict(it)
    results["quick"] = quick
    results["elapsed_s"] = time.perf_counter() - started
    return results


def main(argv: list[str] | None = None) -> int:
    args = parser(__doc__).parse_args(argv)
    it = Iterations.quick() if args.quick else Iterations.full()
    layer_it = LayerIterations.quick() if args.quick else LayerIterations.full()
    results = run(it, layer_it, quick=args.quick, quiet=args.quiet)
    return emit(results, args.json, markdown)


if __name__ == "__main__":
    sys.exit(main())
