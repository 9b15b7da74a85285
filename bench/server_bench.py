"""Benchmarks of ``chatfn serve``: a real server process driven over HTTP and WebSocket.

One run, in a temporary directory: ``chatfn serve --no-example`` is started as a subprocess
(its own process group) on a free port with a throwaway SQLite database,
``CHATFN_ADMIN_KEY`` set to a random key and ``CHATFN_DATA_DIR`` pointing at the directory;
it inherits this process's ``RLIMIT_NOFILE``, raised to the hard limit first. Apps are
created through the HTTP API: ``guest`` (nothing deployed, guest users enabled), ``bench``
(``tests/fixtures/password_functions`` uploaded as a tar.gz made by
``runtime.archive.pack_project``, with its DEMO_PASSWORD secret set: the
UserAttemptedStartSession handler checks the password with hmac and creates the user on
first sign-in, UserStartedSession logs in the background) and ``redeploy``.

The load comes from client processes (this file with ``--client``, each an asyncio loop of
``websockets`` connections that offer permessage-deflate as browsers do), so that the
client's own CPU is spread and counted: each reports its CPU time over the measured
window. The server's CPU is read from ``/proc/<pid>/stat`` (its own threads), the sandbox's
from its descendants (templates and workers, approximate: a worker that exits inside the
window is counted through its parent), the machine's from ``/proc/stat``. Windows are
fixed-length and start at the same moment in every client (the clocks are the machine's
``CLOCK_MONOTONIC``); a pair counts when it completes inside the window. After each window
the bench waits until the server and its sandbox processes are quiet again: work a window
left queued (the handler app's UserStartedSession hooks run on the runtime's background
threads) is reported as its drain time, in a "with its queued work" rate, and in the CPU
per operation, and never lands in the next window.

Measured:

- pairs:       ``start_session`` + ``end_session`` on persistent connections, 100 sockets,
               each looping as fast as its replies come (closed loop), on ``guest`` and
               on ``bench``, in blocks interleaved with each other. Targets: >= 2,000
               pairs/s and pair p99 <= 20 ms. (With N sockets in a closed loop the mean
               latency is N / throughput: p99 <= 20 ms at 100 sockets needs > 5,000/s.)
- paced:       the same 100 sockets, each pacing its pairs so that together they offer
               half the closed-loop rate (with its queued work) of the same app: the
               latency at a load the server can carry;
- connects:    new-connection session starts: 20 concurrent clients each looping connect,
               ``start_session``, close (the server ends the session as disconnected);
- idle:        10,000 open WebSockets each with an active session, spread over client
               processes: the server process's RSS (target <= 600 MiB), its growth per
               session, and the sandbox processes' RSS and PSS apart; then the time the
               server takes to end them all once the clients close;
- redeploy:    a no-dependency project whose handler knows its build number, changed and
               uploaded (a new tar.gz) ~10 times: upload to ``status: active`` polling
               ``GET deployments/{version}`` every 5 ms (target <= 100 ms), and, from the
               same upload, to the first WebSocket ``start_session`` that runs the new code
               (a socket that retries every 5 ms; the old build rejects it, naming itself).

``python bench/server_bench.py`` prints Markdown tables; ``--json`` prints one JSON object
and nothing else on stdout (progress goes to stderr, ``--quiet`` drops it); ``--quick``
runs shorter windows and 1,000 idle sessions, as a smoke test; ``--no-deflate`` makes the
clients offer no permessage-deflate (as some non-browser clients do). ``--profile FILE``
runs the server under cProfile (every thread, CPU time) and writes its pstats to FILE: the
numbers of such a run are distorted by the profiler and only say where the time goes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import os
import random
import resource
import select
import signal
import socket
import sqlite3
import string
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

import httpx
import orjson
from benchlib import emit, fmt, log, machine_basics, parser, percentile, since_ms
from websockets.asyncio.client import ClientConnection, connect

FUNCTIONS = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "password_functions"
PASSWORD = "letmein"
GUEST_APP, HANDLER_APP, REDEPLOY_APP = "guest", "bench", "redeploy"
HANDLER_FILE = "user_attempted_start_session.py"
POLL_S = 0.005
TARGET_PAIRS_PER_S = 2000.0
TARGET_PAIR_P99_MS = 20.0
TARGET_SERVER_RSS_MIB = 600.0
TARGET_REDEPLOY_MS = 100.0
SETTLED_CORES = 0.15  # the server counts as quiet below this (cores)
CLIENT_BOTTLENECK = 0.9  # a client process busier than this (cores) may limit the load
TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

REDEPLOY_HANDLER = '''"""Accept a session only when auth_params.build names this build."""

BUILD = "{build}"


def handle_event(event, context):
    if event.auth_params.get("build") != BUILD:
        raise SessionRejected("running build " + BUILD)
    return {{"build": BUILD}}
'''

# ``--profile``: the server's CLI under cProfile, one profiler per thread (CPU time), merged
# into one pstats file when the server exits after SIGINT.
PROFILE_BOOT = """
import cProfile, pstats, sys, threading, time
out = sys.argv.pop(1)
profiles = []
run = threading.Thread.run
def profiled(self):
    p = cProfile.Profile(time.thread_time)
    profiles.append(p)
    p.enable()
    try:
        run(self)
    finally:
        p.disable()
threading.Thread.run = profiled
main = cProfile.Profile(time.thread_time)
profiles.append(main)
from runtime.cli import main as cli
sys.argv[0] = "chatfn"
main.enable()
try:
    cli()
except SystemExit:
    pass
finally:
    main.disable()
    stats = pstats.Stats(profiles[0])
    for p in profiles[1:]:
        try:
            stats.add(p)
        except (TypeError, ValueError):
            pass
    stats.dump_stats(out)
"""


@dataclass(frozen=True)
class Iterations:
    blocks: int  # interleaved closed-loop blocks per app
    window_s: float
    warmup_s: float
    paced_s: float
    connect_s: float
    pair_sockets: int
    connect_clients: int
    idle_sessions: int
    redeploys: int
    redeploy_warmup: int
    client_procs: int
    idle_procs: int

    @classmethod
    def full(cls) -> Iterations:
        return cls(2, 5.0, 1.5, 4.0, 5.0, 100, 20, 10_000, 12, 2, 2, 4)

    @classmethod
    def quick(cls) -> Iterations:
        return cls(1, 1.5, 1.0, 1.5, 1.5, 100, 20, 1_000, 3, 1, 2, 2)


# ---- measuring ----------------------------------------------------------------------------


def system_busy_s() -> float:
    """CPU seconds all CPUs spent not idle, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    steal_guest = sum(fields[7:]) if len(fields) > 7 else 0
    return (sum(fields) - idle - steal_guest) / TICK


@dataclass(frozen=True)
class ProcStat:
    ppid: int
    start: int  # start time in ticks since boot: with the pid, names one process
    cpu_s: float  # utime + stime
    children_cpu_s: float  # cutime + cstime (children it waited for)
    sys_s: float  # stime alone


def proc_stat(pid: int) -> ProcStat | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # from field 3 (state) on
    return ProcStat(
        ppid=int(fields[1]),
        start=int(fields[19]),
        cpu_s=(int(fields[11]) + int(fields[12])) / TICK,
        children_cpu_s=(int(fields[13]) + int(fields[14])) / TICK,
        sys_s=int(fields[12]) / TICK,
    )


def context_switches(pid: int) -> int:
    """Voluntary and involuntary context switches of every thread of ``pid``."""
    total = 0
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/task/{task}/status").read_text().splitlines():
                    if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                        total += int(line.split()[1])
    return total


def descendants(root: int) -> dict[int, ProcStat]:
    """Every live process below ``root`` (its children, theirs, ...), by pid."""
    stats: dict[int, ProcStat] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            found = proc_stat(int(entry))
            if found is not None:
                stats[int(entry)] = found
    below: dict[int, ProcStat] = {}
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        for pid, st in stats.items():
            if st.ppid == parent and pid not in below:
                below[pid] = st
                frontier.append(pid)
    return below


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM from /proc/<pid>/status, Pss from smaps_rollup (0 when unreadable)."""
    out = {"rss": 0, "hwm": 0, "pss": 0}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                out["rss"] = int(line.split()[1])
            elif line.startswith("VmHWM:"):
                out["hwm"] = int(line.split()[1])
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                out["pss"] = int(line.split()[1])
    return out


def raise_nofile() -> tuple[int, int]:
    """The soft RLIMIT_NOFILE up to the hard limit (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def die_with_parent(sig: int) -> Any:
    """A ``preexec_fn``: the child gets ``sig`` when this process dies (PR_SET_PDEATHSIG),
    so a bench killed outright leaves no server or client behind."""

    def set_pdeathsig() -> None:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(sig), 0, 0, 0)  # PR_SET_PDEATHSIG

    return set_pdeathsig


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- the server ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CpuSample:
    at: float
    server_s: float
    sandbox: dict[int, float]  # descendant pid -> its CPU and its reaped children's
    machine_s: float
    server_sys_s: float = 0.0
    server_switches: int = 0  # context switches of the server's threads


class Server:
    """``chatfn serve`` in its own process group; ``stop`` ends it and everything below."""

    def __init__(self, directory: Path, profile: Path | None) -> None:
        self.directory = directory
        self.profile = profile
        self.key = "".join(
            random.SystemRandom().choices(string.ascii_letters + string.digits, k=32)
        )
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.ws_base = f"ws://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.seen: dict[int, int] = {}  # every descendant seen: pid -> start time
        self.log_path = directory / "server.log"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def command(self) -> list[str]:
        args = ["serve", "--port", str(self.port), "--no-example"]
        args += ["--database", f"sqlite:///{self.directory / 'db.sqlite'}"]
        if self.profile is not None:
            return [sys.executable, "-c", PROFILE_BOOT, str(self.profile), *args]
        chatfn = Path(sys.executable).parent / "chatfn"
        return [str(chatfn), *args]

    def start(self) -> float:
        """Start it and wait until /healthz answers; the time that took (ms)."""
        env = {
            **os.environ,
            "CHATFN_ADMIN_KEY": self.key,
            "CHATFN_DATA_DIR": str(self.directory),
        }
        env.pop("CHATFN_DATABASE_URL", None)
        t0 = time.perf_counter_ns()
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.directory,
                start_new_session=True,
                preexec_fn=die_with_parent(signal.SIGTERM),
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"chatfn serve exited {self.proc.returncode}: {self.tail()}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.base}/healthz", timeout=1).status_code == 200:
                    return since_ms(t0)
            time.sleep(0.05)
        raise RuntimeError(f"chatfn serve did not answer /healthz within 60 s: {self.tail()}")

    def log_problems(self) -> dict[str, Any]:
        """Tracebacks and error lines in the server's output."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return {"tracebacks": None, "error_lines": None, "first": []}
        bad = [ln for ln in lines if "Traceback" in ln or "ERROR" in ln or "Exception" in ln]
        return {
            "tracebacks": sum("Traceback" in ln for ln in lines),
            "error_lines": len(bad),
            "first": [ln[:300] for ln in bad[:5]],
        }

    def tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def children(self) -> dict[int, ProcStat]:
        found = descendants(self.pid)
        for pid, st in found.items():
            self.seen.setdefault(pid, st.start)
        return found

    def cpu(self) -> CpuSample:
        own = proc_stat(self.pid)
        sandbox = {pid: st.cpu_s + st.children_cpu_s for pid, st in self.children().items()}
        return CpuSample(
            time.monotonic(),
            own.cpu_s if own else float("nan"),
            sandbox,
            system_busy_s(),
            own.sys_s if own else float("nan"),
            context_switches(self.pid),
        )

    def memory(self) -> dict[str, Any]:
        own = memory_kib(self.pid)
        kids = [memory_kib(pid) for pid in self.children()]
        return {
            "server_rss_kib": own["rss"],
            "server_hwm_kib": own["hwm"],
            "server_pss_kib": own["pss"],
            "sandbox_processes": len(kids),
            "sandbox_rss_kib": sum(k["rss"] for k in kids),
            "sandbox_pss_kib": sum(k["pss"] for k in kids),
        }

    def threads(self) -> int:
        try:
            return len(os.listdir(f"/proc/{self.pid}/task"))
        except OSError:
            return 0

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGINT (a graceful stop), SIGKILL to its group after ``timeout_s``, then SIGKILL
        to any descendant seen that is still the same process. Its exit code."""
        if self.proc is None:
            return None
        with contextlib.suppress(OSError):
            self.children()
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        for pid, start in self.seen.items():
            st = proc_stat(pid)
            if st is not None and st.start == start:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        return self.proc.returncode


class Api:
    """The admin HTTP API (blocking)."""

    def __init__(self, server: Server) -> None:
        self.http = httpx.Client(
            base_url=server.base, headers={"Authorization": f"Bearer {server.key}"}, timeout=60
        )

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.http.request(method, path, **kwargs)
        if response.status_code >= 400:
            raise RuntimeError(f"{method} {path}: {response.status_code} {response.text[:500]}")
        return response.json() if response.content else None

    def deploy(self, app: str, archive: bytes, timeout_s: float = 120) -> int:
        """Upload and wait until active; the version."""
        headers = {"Content-Type": "application/gzip"}
        version = int(self.call("POST", f"/v1/apps/{app}/deployments", content=archive,
                                headers=headers)["version"])  # fmt: skip
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            info = self.call("GET", f"/v1/apps/{app}/deployments/{version}")
            if info["status"] == "active":
                return version
            if info["status"] == "failed":
                raise RuntimeError(f"deployment {app} v{version} failed: {info['errors']}")
            time.sleep(0.02)
        raise RuntimeError(f"deployment {app} v{version} did not become active")

    def gauges(self) -> dict[str, float]:
        text = self.http.get("/metrics").text
        out: dict[str, float] = {}
        for line in text.splitlines():
            for name in ("chatfn_active_sessions", "chatfn_websocket_connections"):
                if line.startswith(name + " "):
                    out[name] = float(line.split()[1])
        return out

    def close(self) -> None:
        self.http.close()


# ---- client processes ---------------------------------------------------------------------


class Clients:
    """Client processes (this file with ``--client``): one JSON command per line in, one
    JSON result per line out. Each runs in its own process group."""

    def __init__(self, count: int) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.buffers: list[bytes] = []
        command = [sys.executable, str(Path(__file__).resolve()), "--client"]
        if not DEFLATE:
            command.append("--no-deflate")
        for _ in range(count):
            self.procs.append(
                subprocess.Popen(
                    command,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    start_new_session=True,
                    preexec_fn=die_with_parent(signal.SIGKILL),
                )
            )
            self.buffers.append(b"")

    def ask(self, commands: Sequence[Mapping[str, Any]], timeout_s: float) -> list[Any]:
        """Send command i to client i; wait for every answer."""
        for proc, command in zip(self.procs, commands, strict=False):
            assert proc.stdin is not None
            proc.stdin.write(orjson.dumps(command) + b"\n")
            proc.stdin.flush()
        deadline = time.monotonic() + timeout_s
        return [self.line(i, deadline) for i in range(len(commands))]

    def line(self, i: int, deadline: float) -> Any:
        stdout = self.procs[i].stdout
        assert stdout is not None
        fd = stdout.fileno()
        while b"\n" not in self.buffers[i]:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"client {i} did not answer in time")
            ready, _, _ = select.select([fd], [], [], remaining)
            if ready:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    raise RuntimeError(f"client {i} exited ({self.procs[i].poll()})")
                self.buffers[i] += chunk
        line, _, self.buffers[i] = self.buffers[i].partition(b"\n")
        answer = orjson.loads(line)
        if isinstance(answer, dict) and "crash" in answer:
            raise RuntimeError(f"client {i} failed: {answer['crash']}")
        return answer

    def close(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(OSError):
                if proc.stdin is not None:
                    proc.stdin.close()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


def split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


# ---- the client side (``--client``) -------------------------------------------------------


def start_message(username: str, auth: Mapping[str, Any] | None) -> str:
    message: dict[str, Any] = {"type": "start_session", "id": 1, "username": username}
    if auth is not None:
        message["auth_params"] = auth
    return orjson.dumps(message).decode()


END_MESSAGE = orjson.dumps({"type": "end_session", "id": 2}).decode()


DEFLATE = True  # the client processes offer permessage-deflate (``--no-deflate``: not)


def ws_connect(url: str) -> connect:
    # Permessage-deflate is offered unless --no-deflate, as browsers do; no client pings
    # (the server pings every 20 s, and the client answers).
    return connect(
        url,
        ping_interval=None,
        open_timeout=60,
        close_timeout=30,
        max_queue=4,
        compression="deflate" if DEFLATE else None,
    )


async def ask_ws(ws: ClientConnection, message: str) -> dict[str, Any]:
    await ws.send(message)
    reply = orjson.loads(await ws.recv())
    assert isinstance(reply, dict)
    return reply


@dataclass
class Tally:
    latencies_ms: list[float] = field(default_factory=list)
    cycle_ms: list[float] = field(default_factory=list)
    errors: int = 0
    first_errors: list[str] = field(default_factory=list)
    late: int = 0

    def error(self, what: Any) -> None:
        self.errors += 1
        if len(self.first_errors) < 3:
            self.first_errors.append(str(what)[:300])


class Window:
    """This process's CPU time at the start and the end of the shared window."""

    def __init__(self, start_at: float, end_at: float) -> None:
        self.start_at, self.end_at = start_at, end_at
        self.cpu: list[float] = []
        self.late_start = time.monotonic() > start_at
        loop = asyncio.get_running_loop()
        loop.call_at(start_at, lambda: self.cpu.append(time.process_time()))
        loop.call_at(end_at, lambda: self.cpu.append(time.process_time()))

    def inside(self, t: float) -> bool:
        return self.start_at <= t <= self.end_at

    def result(self, tally: Tally) -> dict[str, Any]:
        cpu = self.cpu[1] - self.cpu[0] if len(self.cpu) == 2 else float("nan")
        return {
            "latencies_ms": tally.latencies_ms,
            "cycle_ms": tally.cycle_ms,
            "errors": tally.errors,
            "first_errors": tally.first_errors,
            "late": tally.late,
            "cpu_s": cpu,
            "late_start": self.late_start,
        }


async def open_sockets(url: str, count: int, concurrency: int) -> list[ClientConnection]:
    gate = asyncio.Semaphore(concurrency)

    async def one() -> ClientConnection:
        async with gate:
            return await ws_connect(url)

    return list(await asyncio.gather(*(one() for _ in range(count))))


async def close_all(sockets: Sequence[ClientConnection]) -> None:
    await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)


async def client_pairs(cmd: Mapping[str, Any]) -> dict[str, Any]:
    """Closed loop (or paced, with ``interval_s``) start+end pairs on persistent sockets."""
    sockets = await open_sockets(cmd["url"], cmd["sockets"], 50)
    window = Window(cmd["start_at"], cmd["end_at"])
    tally = Tally()
    interval: float | None = cmd.get("interval_s")

    async def loop(ws: ClientConnection, index: int) -> None:
        start = start_message(f"{cmd['prefix']}-{index}", cmd.get("auth"))
        next_at = time.monotonic() + (random.random() * interval if interval else 0.0)
        while True:
            now = time.monotonic()
            if now >= window.end_at:
                return
            if interval is not None:
                if next_at > now:
                    await asyncio.sleep(next_at - now)
                elif window.inside(now) and now - next_at > interval:
                    tally.late += 1
                next_at += interval
            t0 = time.monotonic()
            if t0 >= window.end_at:
                return
            reply = await ask_ws(ws, start)
            if reply.get("type") != "session_started":
                tally.error(reply)
                await asyncio.sleep(0.01)
                continue
            reply = await ask_ws(ws, END_MESSAGE)
            if reply.get("type") != "session_ended":
                tally.error(reply)
                continue
            t1 = time.monotonic()
            if window.inside(t1):
                tally.latencies_ms.append((t1 - t0) * 1e3)

    try:
        await asyncio.gather(*(loop(ws, cmd["first"] + i) for i, ws in enumerate(sockets)))
    finally:
        await close_all(sockets)
    return window.result(tally)


async def client_connects(cmd: Mapping[str, Any]) -> dict[str, Any]:
    """Each of ``clients`` tasks loops: connect, start_session, close."""
    window = Window(cmd["start_at"], cmd["end_at"])
    tally = Tally()

    async def loop(index: int) -> None:
        start = start_message(f"{cmd['prefix']}-{index}", cmd.get("auth"))
        while time.monotonic() < window.end_at:
            t0 = time.monotonic()
            try:
                async with ws_connect(cmd["url"]) as ws:
                    reply = await ask_ws(ws, start)
                    t_started = time.monotonic()
            except OSError as exc:
                tally.error(exc)
                await asyncio.sleep(0.01)
                continue
            t1 = time.monotonic()
            if reply.get("type") != "session_started":
                tally.error(reply)
            elif window.inside(t1):
                tally.latencies_ms.append((t_started - t0) * 1e3)
                tally.cycle_ms.append((t1 - t0) * 1e3)

    await asyncio.gather(*(loop(cmd["first"] + i) for i in range(cmd["clients"])))
    return window.result(tally)


async def client_idle_open(cmd: Mapping[str, Any], idle: list[ClientConnection]) -> dict[str, Any]:
    """Open ``sockets`` connections, start a session on each, and keep them open."""
    gate = asyncio.Semaphore(cmd["concurrency"])
    tally = Tally()
    t0 = time.monotonic()

    async def one(index: int) -> None:
        async with gate:
            try:
                ws = await ws_connect(cmd["url"])
            except OSError as exc:
                tally.error(exc)
                return
            idle.append(ws)
            reply = await ask_ws(ws, start_message(f"{cmd['prefix']}-{index}", cmd.get("auth")))
            if reply.get("type") != "session_started":
                tally.error(reply)

    await asyncio.gather(*(one(cmd["first"] + i) for i in range(cmd["sockets"])))
    return {
        "opened": len(idle),
        "errors": tally.errors,
        "first_errors": tally.first_errors,
        "elapsed_s": time.monotonic() - t0,
        "rss_kib": memory_kib(os.getpid())["rss"],
    }


async def client_main() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    idle: list[ClientConnection] = []
    while line := await reader.readline():
        cmd = orjson.loads(line)
        result: Any
        try:
            if cmd["cmd"] == "pairs":
                result = await client_pairs(cmd)
            elif cmd["cmd"] == "connects":
                result = await client_connects(cmd)
            elif cmd["cmd"] == "idle_open":
                result = await client_idle_open(cmd, idle)
            elif cmd["cmd"] == "idle_close":
                t0 = time.monotonic()
                await close_all(idle)
                result = {"closed": len(idle), "elapsed_s": time.monotonic() - t0}
                idle.clear()
            else:
                result = {"crash": f"unknown command {cmd['cmd']!r}"}
        except Exception as exc:
            result = {"crash": f"{type(exc).__name__}: {exc}"[:500]}
        sys.stdout.buffer.write(orjson.dumps(result) + b"\n")
        sys.stdout.buffer.flush()
    await close_all(idle)


# ---- the benchmark ------------------------------------------------------------------------


def cpu_between(a: CpuSample, b: CpuSample) -> dict[str, float]:
    """CPU of the server, its sandbox processes and the machine between two samples, in
    cores (seconds of CPU per second)."""
    wall = b.at - a.at
    sandbox = sum(v - a.sandbox.get(pid, 0.0) for pid, v in b.sandbox.items())
    return {
        "wall_s": wall,
        "server_cores": (b.server_s - a.server_s) / wall,
        "sandbox_cores": sandbox / wall,
        "machine_cores": (b.machine_s - a.machine_s) / wall,
        "server_sys_cores": (b.server_sys_s - a.server_sys_s) / wall,
        "server_switches_per_s": (b.server_switches - a.server_switches) / wall,
    }


def project_archive(directory: Path, build: int) -> bytes:
    from runtime.archive import pack_project

    (directory / HANDLER_FILE).write_text(REDEPLOY_HANDLER.format(build=build), encoding="utf-8")
    return pack_project(directory)


class Bench:
    def __init__(self, server: Server, api: Api, it: Iterations, tmp: Path, quiet: bool) -> None:
        self.server, self.api, self.it, self.tmp, self.quiet = server, api, it, tmp, quiet
        self.clients: Clients | None = None
        self.idle_clients: Clients | None = None
        self.names = 0

    def url(self, app: str) -> str:
        return f"{self.server.ws_base}/v1/apps/{app}/session"

    def prefix(self, kind: str) -> str:
        self.names += 1
        return f"{kind}{self.names}"

    # -- setup ------------------------------------------------------------------------------

    def setup(self) -> dict[str, Any]:
        from runtime.archive import pack_project

        log(self.quiet, "creating apps; deploying the password project to 'bench'")
        for app in (GUEST_APP, HANDLER_APP, REDEPLOY_APP):
            self.api.call("POST", "/v1/apps", json={"name": app})
        t0 = time.perf_counter_ns()
        version = self.api.deploy(HANDLER_APP, pack_project(FUNCTIONS))
        first_deploy_ms = since_ms(t0)
        self.api.call("PUT", f"/v1/apps/{HANDLER_APP}/secrets/DEMO_PASSWORD",
                      json={"value": PASSWORD})  # fmt: skip
        return {"bench_version": version, "bench_first_deploy_ms": first_deploy_ms}

    # -- redeploy ---------------------------------------------------------------------------

    def redeploy(self) -> dict[str, Any]:
        it = self.it
        project = self.tmp / "redeploy-project"
        project.mkdir()
        self.api.deploy(REDEPLOY_APP, project_archive(project, 0))
        log(self.quiet, f"redeploy: {it.redeploy_warmup} + {it.redeploys} code-only redeploys")
        return asyncio.run(self._redeploys(project))

    async def _redeploys(self, project: Path) -> dict[str, Any]:
        it = self.it
        samples: dict[str, list[float]] = {
            "upload_ms": [], "active_ms": [], "live_ms": [], "built_ms": [], "polls": [],
            "ws_attempts": [], "archive_bytes": [],
        }  # fmt: skip
        headers = {"Authorization": f"Bearer {self.server.key}"}
        async with (
            httpx.AsyncClient(base_url=self.server.base, headers=headers, timeout=60) as http,
            ws_connect(self.url(REDEPLOY_APP)) as ws,
        ):
            for build in range(1, it.redeploy_warmup + it.redeploys + 1):
                archive = project_archive(project, build)
                sample = await self._one_redeploy(http, ws, archive, build)
                if build > it.redeploy_warmup:
                    for key, value in sample.items():
                        samples[key].append(value)
                    samples["archive_bytes"].append(len(archive))
                await asyncio.sleep(0.3)  # the previous version's workers retire meanwhile
        return samples

    async def _one_redeploy(
        self, http: httpx.AsyncClient, ws: ClientConnection, archive: bytes, build: int
    ) -> dict[str, float]:
        path = f"/v1/apps/{REDEPLOY_APP}/deployments"
        start = start_message("redeployer", {"build": str(build)})
        t0 = time.perf_counter_ns()
        response = await http.post(path, content=archive,
                                   headers={"Content-Type": "application/gzip"})  # fmt: skip
        upload_ms = since_ms(t0)
        if response.status_code != 202:
            raise RuntimeError(f"upload: {response.status_code} {response.text[:300]}")
        version = int(response.json()["version"])
        polls = attempts = 0

        built_ms = float("nan")

        async def active() -> float:
            nonlocal polls, built_ms
            while True:
                polls += 1
                info = (await http.get(f"{path}/{version}")).json()
                if info["status"] == "active":
                    took = since_ms(t0)
                    created = datetime.datetime.fromisoformat(info["created_at"])
                    activated = datetime.datetime.fromisoformat(info["activated_at"])
                    built_ms = (activated - created).total_seconds() * 1e3
                    return took
                if info["status"] == "failed":
                    raise RuntimeError(f"redeploy v{version} failed: {info['errors']}")
                await asyncio.sleep(POLL_S)

        async def live() -> float:
            nonlocal attempts
            while True:
                attempts += 1
                reply = await ask_ws(ws, start)
                if reply["type"] == "session_started":
                    took = since_ms(t0)
                    ended = await ask_ws(ws, END_MESSAGE)
                    if ended["type"] != "session_ended":
                        raise RuntimeError(f"end_session: {ended}")
                    return took
                message = str(reply.get("error", {}).get("message", ""))
                if not message.startswith("running build"):
                    raise RuntimeError(f"unexpected reply while redeploying: {reply}")
                await asyncio.sleep(POLL_S)

        active_ms, live_ms = await asyncio.wait_for(asyncio.gather(active(), live()), 60)
        return {
            "upload_ms": upload_ms,
            "active_ms": active_ms,
            "live_ms": live_ms,
            "built_ms": built_ms,
            "polls": float(polls),
            "ws_attempts": float(attempts),
        }

    # -- load -------------------------------------------------------------------------------

    def window(self, kind: str, app: str, duration_s: float, per_client: list[dict[str, Any]]
               ) -> dict[str, Any]:  # fmt: skip
        """One measured window: the same start and end in every client process."""
        assert self.clients is not None
        start_at = time.monotonic() + self.it.warmup_s
        end_at = start_at + duration_s
        auth = {"password": PASSWORD} if app == HANDLER_APP else None
        commands = [
            {"cmd": kind, "url": self.url(app), "auth": auth, "start_at": start_at,
             "end_at": end_at, **extra}
            for extra in per_client
        ]  # fmt: skip
        answers: list[Any] = []
        cpu: list[CpuSample] = []

        def sample_at(moment: float) -> None:
            time.sleep(max(0.0, moment - time.monotonic()))
            cpu.append(self.server.cpu())

        # Send, sample the server at the window's edges, then collect the answers.
        for proc, command in zip(self.clients.procs, commands, strict=False):
            assert proc.stdin is not None
            proc.stdin.write(orjson.dumps(command) + b"\n")
            proc.stdin.flush()
        sample_at(start_at)
        sample_at(end_at)
        deadline = time.monotonic() + 120
        answers = [self.clients.line(i, deadline) for i in range(len(commands))]
        # The clients answer once their last pair (which straddles the end, as some pair
        # straddles the start) is done and their sockets are closed: from then on, what
        # the server still does is work the window queued.
        answered_at = time.monotonic()
        settled, quiet_at = self.settle()
        drain_s = max(0.0, quiet_at - answered_at)
        lat = sorted(v for a in answers for v in a["latencies_ms"])
        cycle = sorted(v for a in answers for v in a["cycle_ms"])
        client_cpu = [a["cpu_s"] / duration_s for a in answers]
        return {
            "count": len(lat),
            "duration_s": duration_s,
            "per_s": len(lat) / duration_s,
            "latencies": lat,
            "cycle": cycle,
            "errors": sum(a["errors"] for a in answers),
            "first_errors": [e for a in answers for e in a["first_errors"]][:3],
            "late": sum(a["late"] for a in answers),
            "late_start": any(a["late_start"] for a in answers),
            "client_cores": client_cpu,
            "drain_s": drain_s,
            **cpu_between(cpu[0], cpu[1]),
            # From the start until the server is quiet again: the window's work, including
            # what it left queued (background hooks) when the window ended.
            "through_drain": cpu_between(cpu[0], settled),
        }

    def settle(self, timeout_s: float = 60.0) -> tuple[CpuSample, float]:
        """Wait until the server and its sandbox processes are quiet (below
        SETTLED_CORES for three samples 0.1 s apart); the last sample, and when the quiet
        began."""
        prev = self.server.cpu()
        streak: list[float] = []
        deadline = prev.at + timeout_s
        while time.monotonic() < deadline:
            time.sleep(0.1)
            now = self.server.cpu()
            busy = cpu_between(prev, now)
            if busy["server_cores"] + busy["sandbox_cores"] < SETTLED_CORES:
                streak.append(prev.at)
                if len(streak) >= 3:
                    return now, streak[0]
            else:
                streak.clear()
            prev = now
        return prev, prev.at

    def pairs_window(self, app: str, duration_s: float, interval_s: float | None = None
                     ) -> dict[str, Any]:  # fmt: skip
        assert self.clients is not None
        n = len(self.clients.procs)
        prefix = self.prefix("p")
        first = 0
        extras: list[dict[str, Any]] = []
        for count in split(self.it.pair_sockets, n):
            extras.append({"sockets": count, "prefix": prefix, "first": first,
                           "interval_s": interval_s})  # fmt: skip
            first += count
        return self.window("pairs", app, duration_s, extras)

    def connects_window(self, app: str, duration_s: float) -> dict[str, Any]:
        assert self.clients is not None
        prefix = self.prefix("c")
        first = 0
        extras: list[dict[str, Any]] = []
        for count in split(self.it.connect_clients, len(self.clients.procs)):
            extras.append({"clients": count, "prefix": prefix, "first": first})
            first += count
        return self.window("connects", app, duration_s, extras)

    def load(self) -> dict[str, Any]:
        it = self.it
        self.clients = Clients(it.client_procs)
        apps = (GUEST_APP, HANDLER_APP)
        closed: dict[str, list[dict[str, Any]]] = {app: [] for app in apps}
        log(self.quiet, "warm-up: sockets, users, workers")
        for app in apps:
            self.pairs_window(app, 0.5)
        for block in range(it.blocks):
            for app in apps:
                log(self.quiet, f"pairs block {block + 1}/{it.blocks}: {app}, "
                    f"{it.pair_sockets} sockets, {it.window_s:g} s")  # fmt: skip
                closed[app].append(self.pairs_window(app, it.window_s))
        paced: dict[str, dict[str, Any]] = {}
        for app in apps:
            drained = sum(w["duration_s"] + w["drain_s"] for w in closed[app])
            rate = 0.5 * sum(w["count"] for w in closed[app]) / drained
            log(self.quiet, f"paced: {app} at {rate:,.0f} pairs/s offered")
            paced[app] = self.pairs_window(app, it.paced_s, it.pair_sockets / max(rate, 1.0))
            paced[app]["offered_per_s"] = rate
        connects: dict[str, dict[str, Any]] = {}
        for app in apps:
            log(self.quiet, f"new connections: {app}, {it.connect_clients} clients")
            connects[app] = self.connects_window(app, it.connect_s)
        return {"closed": closed, "paced": paced, "connects": connects}

    # -- idle sessions ----------------------------------------------------------------------

    def idle(self) -> dict[str, Any]:
        it = self.it
        if self.clients is not None:
            self.clients.close()
            self.clients = None
        time.sleep(1.0)  # the last windows' disconnects settle
        before = self.server.memory()
        gauges_before = self.api.gauges()
        self.idle_clients = Clients(it.idle_procs)
        prefix = self.prefix("i")
        first = 0
        commands: list[dict[str, Any]] = []
        for count in split(it.idle_sessions, it.idle_procs):
            commands.append({"cmd": "idle_open", "url": self.url(GUEST_APP), "sockets": count,
                             "concurrency": 32, "prefix": prefix, "first": first})  # fmt: skip
            first += count
        log(self.quiet, f"idle: opening {it.idle_sessions:,} sockets with a session each")
        t0 = time.perf_counter_ns()
        opened = self.idle_clients.ask(commands, 300)
        open_s = since_ms(t0) / 1e3
        time.sleep(1.0)
        during = self.server.memory()
        gauges = self.api.gauges()
        threads = self.server.threads()
        log(self.quiet, f"idle: server RSS {during['server_rss_kib'] / 1024:,.0f} MiB; closing")
        t0 = time.perf_counter_ns()
        self.idle_clients.ask([{"cmd": "idle_close"}] * it.idle_procs, 120)
        closed_s = since_ms(t0) / 1e3
        drained: float | None = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            now = self.api.gauges()
            if not now.get("chatfn_websocket_connections") and not now.get(
                "chatfn_active_sessions"
            ):
                drained = since_ms(t0) / 1e3
                break
            time.sleep(0.1)
        after = self.server.memory()
        n = sum(a["opened"] for a in opened)
        return {
            "idle_sessions": it.idle_sessions,
            "idle_opened": n,
            "idle_errors": sum(a["errors"] for a in opened),
            "idle_first_errors": [e for a in opened for e in a["first_errors"]][:3],
            "idle_open_s": open_s,
            "idle_open_per_s": n / open_s,
            "idle_active_sessions_gauge": gauges.get("chatfn_active_sessions"),
            "idle_connections_gauge": gauges.get("chatfn_websocket_connections"),
            "idle_before_active_sessions_gauge": gauges_before.get("chatfn_active_sessions"),
            "idle_server_threads": threads,
            "idle_client_rss_kib": [a["rss_kib"] for a in opened],
            "idle_close_s": closed_s,
            "idle_drain_s": drained,
            "memory_before": before,
            "memory_idle": during,
            "memory_after": after,
        }

    def close(self) -> None:
        for clients in (self.clients, self.idle_clients):
            if clients is not None:
                clients.close()
        self.clients = self.idle_clients = None


# ---- results ------------------------------------------------------------------------------


def window_stats(windows: Sequence[Mapping[str, Any]], prefix: str) -> dict[str, Any]:
    """Windows of one kind merged: rate, latency percentiles, CPU per pair, errors."""
    lat = sorted(v for w in windows for v in w["latencies"])
    cycle = sorted(v for w in windows for v in w["cycle"])
    wall = sum(w["wall_s"] for w in windows)
    count = len(lat)
    per_s = count / sum(w["duration_s"] for w in windows)
    server = sum(w["server_cores"] * w["wall_s"] for w in windows)
    sandbox = sum(w["sandbox_cores"] * w["wall_s"] for w in windows)
    drained = [w["through_drain"] for w in windows]
    server_all = sum(d["server_cores"] * d["wall_s"] for d in drained)
    sandbox_all = sum(d["sandbox_cores"] * d["wall_s"] for d in drained)
    machine_all = sum(d["machine_cores"] * d["wall_s"] for d in drained)
    drain_s = sum(w["drain_s"] for w in windows)
    machine_cpu = sum(w["machine_cores"] * w["wall_s"] for w in windows)
    clients = [c for w in windows for c in w["client_cores"]]
    client_cpu = sum(sum(w["client_cores"]) * w["wall_s"] for w in windows)
    r: dict[str, Any] = {
        f"{prefix}_per_s": per_s,
        f"{prefix}_count": count,
        f"{prefix}_p50_ms": percentile(lat, 50),
        f"{prefix}_p90_ms": percentile(lat, 90),
        f"{prefix}_p99_ms": percentile(lat, 99),
        f"{prefix}_max_ms": lat[-1] if lat else float("nan"),
        f"{prefix}_per_s_blocks": [w["per_s"] for w in windows],
        f"{prefix}_server_cores": server / wall,
        f"{prefix}_server_sys_share": sum(w["server_sys_cores"] * w["wall_s"] for w in windows)
        / max(server, 1e-9),
        f"{prefix}_server_switches_per_op": sum(
            w["server_switches_per_s"] * w["wall_s"] for w in windows
        )
        / max(count, 1),
        f"{prefix}_sandbox_cores": sandbox / wall,
        f"{prefix}_machine_cores": machine_cpu / wall,
        f"{prefix}_client_cores": client_cpu / wall,
        # Everything else on the machine meanwhile (other processes, interrupts).
        f"{prefix}_other_cores": (machine_cpu - server - sandbox - client_cpu) / wall,
        f"{prefix}_client_cores_max": max(clients),
        # Including the work the window left queued (drained after it).
        f"{prefix}_sustained_per_s": count / (sum(w["duration_s"] for w in windows) + drain_s),
        f"{prefix}_drain_s": drain_s / len(windows),
        f"{prefix}_server_cpu_ms": server_all / max(count, 1) * 1e3,
        f"{prefix}_sandbox_cpu_ms": sandbox_all / max(count, 1) * 1e3,
        f"{prefix}_machine_cpu_ms": machine_all / max(count, 1) * 1e3,
        f"{prefix}_errors": sum(w["errors"] for w in windows),
        f"{prefix}_first_errors": [e for w in windows for e in w["first_errors"]][:3],
        f"{prefix}_late_start": any(w["late_start"] for w in windows),
    }
    if cycle:
        r[f"{prefix}_cycle_p50_ms"] = percentile(cycle, 50)
        r[f"{prefix}_cycle_p99_ms"] = percentile(cycle, 99)
    return r


def results_of(load: Mapping[str, Any], it: Iterations) -> dict[str, Any]:
    r: dict[str, Any] = {}
    for app in (GUEST_APP, HANDLER_APP):
        r.update(window_stats(load["closed"][app], f"pairs_{app}"))
        r.update(window_stats([load["paced"][app]], f"paced_{app}"))
        r[f"paced_{app}_offered_per_s"] = load["paced"][app]["offered_per_s"]
        r[f"paced_{app}_late"] = load["paced"][app]["late"]
        r.update(window_stats([load["connects"][app]], f"connects_{app}"))
        # Little's law: in a closed loop the mean latency is sockets / throughput.
        r[f"pairs_{app}_littles_mean_ms"] = it.pair_sockets / r[f"pairs_{app}_per_s"] * 1e3
    r["handler_vs_guest_pairs"] = r["pairs_bench_per_s"] / r["pairs_guest_per_s"]
    r["connects_vs_pairs_guest"] = r["connects_guest_per_s"] / r["pairs_guest_per_s"]
    r["paced_vs_closed_p99_guest"] = r["paced_guest_p99_ms"] / r["pairs_guest_p99_ms"]
    r["paced_vs_closed_p99_bench"] = r["paced_bench_p99_ms"] / r["pairs_bench_p99_ms"]
    r["client_bound"] = any(
        r[f"{kind}_{app}_client_cores_max"] > CLIENT_BOTTLENECK
        for kind in ("pairs", "connects")
        for app in (GUEST_APP, HANDLER_APP)
    )
    return r


def redeploy_results(samples: Mapping[str, list[float]]) -> dict[str, Any]:
    r: dict[str, Any] = {}
    for key in ("upload_ms", "active_ms", "live_ms", "built_ms"):
        values = sorted(samples[key])
        name = key.removesuffix("_ms")
        r[f"redeploy_{name}_p50_ms"] = percentile(values, 50)
        r[f"redeploy_{name}_p90_ms"] = percentile(values, 90)
        r[f"redeploy_{name}_max_ms"] = values[-1] if values else float("nan")
        r[f"redeploy_{name}_min_ms"] = values[0] if values else float("nan")
    r["redeploy_count"] = len(samples["active_ms"])
    r["redeploy_polls_mean"] = sum(samples["polls"]) / max(1, len(samples["polls"]))
    r["redeploy_ws_attempts_mean"] = sum(samples["ws_attempts"]) / max(
        1, len(samples["ws_attempts"])
    )
    r["redeploy_archive_bytes"] = (
        int(samples["archive_bytes"][0]) if samples["archive_bytes"] else 0
    )
    r["redeploy_live_minus_active_ms"] = r["redeploy_live_p50_ms"] - r["redeploy_active_p50_ms"]
    return r


def idle_results(idle: Mapping[str, Any]) -> dict[str, Any]:
    r = {k: v for k, v in idle.items() if not k.startswith("memory_")}
    before, during, after = idle["memory_before"], idle["memory_idle"], idle["memory_after"]
    for label, m in (("before", before), ("idle", during), ("after", after)):
        for key, value in m.items():
            r[f"{label}_{key}"] = value
    n = max(1, idle["idle_opened"])
    r["server_rss_mib"] = during["server_rss_kib"] / 1024
    r["server_bytes_per_session"] = (during["server_rss_kib"] - before["server_rss_kib"]) * 1024 / n
    r["sandbox_rss_mib"] = during["sandbox_rss_kib"] / 1024
    r["sandbox_pss_mib"] = during["sandbox_pss_kib"] / 1024
    r["client_bytes_per_socket"] = sum(idle["idle_client_rss_kib"]) * 1024 / n
    return r


def targets(r: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    def at_least(value: float, limit: float) -> dict[str, Any]:
        return {"value": value, "target": limit, "ok": value >= limit, "kind": ">="}

    def at_most(value: float, limit: float) -> dict[str, Any]:
        return {"value": value, "target": limit, "ok": value <= limit, "kind": "<="}

    out: dict[str, dict[str, Any]] = {}
    for app in (GUEST_APP, HANDLER_APP):
        out[f"pairs_{app}_per_s"] = at_least(r[f"pairs_{app}_per_s"], TARGET_PAIRS_PER_S)
        out[f"pairs_{app}_p99_ms"] = at_most(r[f"pairs_{app}_p99_ms"], TARGET_PAIR_P99_MS)
    out["server_rss_mib"] = at_most(r["server_rss_mib"], TARGET_SERVER_RSS_MIB)
    out["redeploy_active_p50_ms"] = at_most(r["redeploy_active_p50_ms"], TARGET_REDEPLOY_MS)
    out["redeploy_live_p50_ms"] = at_most(r["redeploy_live_p50_ms"], TARGET_REDEPLOY_MS)
    return out


def machine(load_before: float, nofile: tuple[int, int]) -> dict[str, Any]:
    versions: dict[str, str | None] = {}
    for name in ("uvicorn", "websockets", "fastapi", "starlette", "httpx", "SQLAlchemy"):
        try:
            versions[name] = package_version(name)
        except Exception:
            versions[name] = None
    return {
        **machine_basics(),
        "memory_mib": os.sysconf("SC_PHYS_PAGES") * PAGE // 2**20,
        "sqlite": sqlite3.sqlite_version,
        "packages": versions,
        "rlimit_nofile": list(nofile),
        "loadavg_1m_before": load_before,
        "loadavg_1m_after": os.getloadavg()[0],
    }


def busy_cores(seconds: float = 1.0) -> float:
    """How busy the machine is (cores), over ``seconds``."""
    b0 = system_busy_s()
    time.sleep(seconds)
    return (system_busy_s() - b0) / seconds


def run(it: Iterations, *, quick: bool, quiet: bool, profile: Path | None) -> dict[str, Any]:
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    busy_before = busy_cores()
    nofile = raise_nofile()
    if nofile[0] < it.idle_sessions + 1000:
        raise RuntimeError(f"RLIMIT_NOFILE {nofile} is too low for {it.idle_sessions} sockets")
    with tempfile.TemporaryDirectory(prefix="chatfn-server-bench-") as name:
        tmp = Path(name)
        server = Server(tmp, profile)
        api: Api | None = None
        bench: Bench | None = None
        try:
            log(quiet, f"starting chatfn serve on port {server.port}")
            startup_ms = server.start()
            api = Api(server)
            bench = Bench(server, api, it, tmp, quiet)
            setup = bench.setup()
            redeploys = bench.redeploy()
            load = bench.load()
            idle = bench.idle()
            server_memory_end = server.memory()
        finally:
            if bench is not None:
                bench.close()
            if api is not None:
                api.close()
            log(quiet, "stopping the server")
            exit_code = server.stop()
            problems = server.log_problems()
    results: dict[str, Any] = {"server_startup_ms": startup_ms, **setup}
    results.update(redeploy_results(redeploys))
    results.update(results_of(load, it))
    results.update(idle_results(idle))
    results["server_rss_end_kib"] = server_memory_end["server_rss_kib"]
    results["server_exit_code"] = exit_code
    results["server_log_tracebacks"] = problems["tracebacks"]
    results["server_log_error_lines"] = problems["error_lines"]
    results["server_log_first_errors"] = problems["first"]
    results["targets"] = targets(results)
    results["machine"] = machine(load_before, nofile)
    results["machine"]["busy_cores_before"] = busy_before
    results["iterations"] = asdict(it)
    results["quick"] = quick
    results["profiled"] = profile is not None
    results["client_deflate"] = DEFLATE
    results["elapsed_s"] = time.perf_counter() - started
    return results


# ---- report -------------------------------------------------------------------------------


LOAD_KINDS = [f"{kind}_{app}" for kind in ("pairs", "paced", "connects")
              for app in (GUEST_APP, HANDLER_APP)]  # fmt: skip


def markdown(r: Mapping[str, Any]) -> str:
    m, t = r["machine"], r["targets"]
    it = r["iterations"]

    def met(key: str) -> str:
        return "yes" if t[key]["ok"] else "**no**"

    def target(key: str, unit: str, digits: int = 0) -> str:
        return f"{t[key]['kind']} {fmt(float(t[key]['target']), digits)}{unit}"

    def lat(prefix: str) -> str:
        return (
            f"{fmt(r[f'{prefix}_p50_ms'])} / {fmt(r[f'{prefix}_p99_ms'])} / "
            f"{fmt(r[f'{prefix}_max_ms'])} ms"
        )

    pk = m["packages"]
    lines = [
        f"Server benchmark: {m['cpu_count']} CPUs ({m['cpu_model']}), Python {m['python']}, "
        f"kernel {m['kernel']}, SQLite {m['sqlite']}, uvicorn {pk['uvicorn']}, websockets "
        f"{pk['websockets']}, RLIMIT_NOFILE {m['rlimit_nofile'][0]:,}; load average "
        f"{fmt(m['loadavg_1m_before'], 2)} -> {fmt(m['loadavg_1m_after'], 2)}, "
        f"{fmt(m['busy_cores_before'], 2)} cores busy before the run"
        f"{' (quick)' if r['quick'] else ''}{' (PROFILED: distorted)' if r['profiled'] else ''}"
        f"; clients {'offer' if r['client_deflate'] else 'do not offer'} permessage-deflate",
        "",
        "| metric | value | p50 / p99 / max | target | met | n |",
        "|---|---|---|---|---|---|",
    ]
    for app, label in ((GUEST_APP, "guest app, nothing deployed"),
                       (HANDLER_APP, "password handler deployed")):  # fmt: skip
        p = f"pairs_{app}"
        lines.append(
            f"| WS start+end pairs/s, {it['pair_sockets']} persistent sockets, {label} "
            f"| {fmt(r[f'{p}_per_s'], 0)} /s ({fmt(r[f'{p}_sustained_per_s'], 0)} /s with "
            f"its queued work) | {lat(p)} "
            f"| {target(f'{p}_per_s', ' /s')}; p99 {target(f'{p}_p99_ms', ' ms')} "
            f"| {met(f'{p}_per_s')} / {met(f'{p}_p99_ms')} | {r[f'{p}_count']:,} |"
        )
    for app in (GUEST_APP, HANDLER_APP):
        p = f"paced_{app}"
        lines.append(
            f"| paced pairs, {app}: {fmt(r[f'{p}_offered_per_s'], 0)} /s offered (half the "
            f"closed loop's rate with its queued work) | {fmt(r[f'{p}_per_s'], 0)} /s | {lat(p)} "
            f"| | | {r[f'{p}_count']:,} |"
        )
    for app in (GUEST_APP, HANDLER_APP):
        p = f"connects_{app}"
        lines.append(
            f"| new-connection session starts/s (connect, start, close), {app}, "
            f"{it['connect_clients']} clients | {fmt(r[f'{p}_per_s'], 0)} /s "
            f"({fmt(r[f'{p}_sustained_per_s'], 0)} /s with its queued work) | {lat(p)} "
            f"(connect to started) | | | {r[f'{p}_count']:,} |"
        )
    lines += [
        f"| server RSS with {r['idle_opened']:,} idle sessions (open WebSockets) "
        f"| {fmt(r['server_rss_mib'])} MiB | | {target('server_rss_mib', ' MiB')} "
        f"| {met('server_rss_mib')} | {r['idle_opened']:,} |",
        f"| code-only redeploy: upload to status active (polled every 5 ms) "
        f"| {fmt(r['redeploy_active_p50_ms'])} ms p50 "
        f"| {fmt(r['redeploy_active_p50_ms'])} / {fmt(r['redeploy_active_p90_ms'])} (p90) / "
        f"{fmt(r['redeploy_active_max_ms'])} ms | {target('redeploy_active_p50_ms', ' ms')} "
        f"| {met('redeploy_active_p50_ms')} | {r['redeploy_count']} |",
        f"| code-only redeploy: upload to first WS session on the new code "
        f"| {fmt(r['redeploy_live_p50_ms'])} ms p50 "
        f"| {fmt(r['redeploy_live_p50_ms'])} / {fmt(r['redeploy_live_p90_ms'])} (p90) / "
        f"{fmt(r['redeploy_live_max_ms'])} ms | {target('redeploy_live_p50_ms', ' ms')} "
        f"| {met('redeploy_live_p50_ms')} | {r['redeploy_count']} |",
        "",
        "| CPU in the window (cores) | server process | sandbox processes "
        "| clients (sum, busiest process) | other | machine | queued work drained after "
        "| CPU per pair or start, with that work: server (+ sandbox) "
        "| server: kernel share, thread switches per op |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for kind, app in (("pairs", GUEST_APP), ("pairs", HANDLER_APP), ("paced", GUEST_APP),
                      ("paced", HANDLER_APP), ("connects", GUEST_APP),
                      ("connects", HANDLER_APP)):  # fmt: skip
        p = f"{kind}_{app}"
        lines.append(
            f"| {kind}, {app} | {fmt(r[f'{p}_server_cores'], 2)} "
            f"| {fmt(r[f'{p}_sandbox_cores'], 2)} | {fmt(r[f'{p}_client_cores'], 2)}, "
            f"{fmt(r[f'{p}_client_cores_max'], 2)} | {fmt(r[f'{p}_other_cores'], 2)} "
            f"| {fmt(r[f'{p}_machine_cores'], 2)} | {fmt(r[f'{p}_drain_s'], 2)} s "
            f"| {fmt(r[f'{p}_server_cpu_ms'], 2)} ms "
            f"(+{fmt(r[f'{p}_sandbox_cpu_ms'], 2)} sandbox) "
            f"| {fmt(r[f'{p}_server_sys_share'] * 100, 0)}%, "
            f"{fmt(r[f'{p}_server_switches_per_op'], 1)} |"
        )
    errors = sum(
        r[f"{kind}_{app}_errors"]
        for kind in ("pairs", "paced", "connects")
        for app in (GUEST_APP, HANDLER_APP)
    )
    rows = [
        ("handler / guest pairs per second", f"{fmt(r['handler_vs_guest_pairs'], 2)}x"),
        (
            "closed-loop mean latency implied by Little's law (sockets / rate): guest, bench",
            f"{fmt(r['pairs_guest_littles_mean_ms'])} ms, "
            f"{fmt(r['pairs_bench_littles_mean_ms'])} ms",
        ),
        (
            "pairs per second, each block: guest; bench",
            f"{', '.join(fmt(v, 0) for v in r['pairs_guest_per_s_blocks'])}; "
            f"{', '.join(fmt(v, 0) for v in r['pairs_bench_per_s_blocks'])}",
        ),
        (
            "paced p99 / closed-loop p99: guest, bench",
            f"{fmt(r['paced_vs_closed_p99_guest'], 2)}x, {fmt(r['paced_vs_closed_p99_bench'], 2)}x",
        ),
        (
            "new-connection starts / persistent pairs (guest)",
            f"{fmt(r['connects_vs_pairs_guest'], 2)}x",
        ),
        (
            "new connection, full cycle incl. close p50 / p99 (guest)",
            f"{fmt(r['connects_guest_cycle_p50_ms'])} / {fmt(r['connects_guest_cycle_p99_ms'])} ms",
        ),
        ("client-bound (a client process above 0.9 cores)", "yes" if r["client_bound"] else "no"),
        (
            "errors in the load windows; a client that started a window late",
            f"{fmt(errors)}; "
            + ("yes" if any(r[f"{k}_late_start"] for k in LOAD_KINDS) else "none"),
        ),
        (
            "server: exit code after SIGINT; tracebacks / error lines in its log",
            f"{r['server_exit_code']}; {r['server_log_tracebacks']} / "
            f"{r['server_log_error_lines']}",
        ),
        (
            "server RSS: before the idle sessions / with them / after they ended (MiB)",
            f"{fmt(r['before_server_rss_kib'] / 1024)} / {fmt(r['idle_server_rss_kib'] / 1024)} / "
            f"{fmt(r['after_server_rss_kib'] / 1024)} "
            f"(peak {fmt(r['idle_server_hwm_kib'] / 1024)})",
        ),
        ("server RSS growth per idle session", f"{fmt(r['server_bytes_per_session'], 0)} bytes"),
        (
            "sandbox processes while idle: count, RSS sum, PSS sum",
            f"{r['idle_sandbox_processes']}, {fmt(r['sandbox_rss_mib'])} MiB, "
            f"{fmt(r['sandbox_pss_mib'])} MiB",
        ),
        (
            "idle sessions: opened at, server threads, sessions gauge",
            f"{fmt(r['idle_open_per_s'], 0)} /s ({fmt(r['idle_open_s'])} s), "
            f"{r['idle_server_threads']}, {fmt(r['idle_active_sessions_gauge'], 0)}",
        ),
        (
            "idle sessions: clients closed in, server ended them all in",
            f"{fmt(r['idle_close_s'])} s, {fmt(r['idle_drain_s'])} s",
        ),
        ("client memory per idle socket", f"{fmt(r['client_bytes_per_socket'], 0)} bytes"),
        (
            "redeploy: upload answered (202) p50; first session on new code minus active",
            f"{fmt(r['redeploy_upload_p50_ms'])} ms; {fmt(r['redeploy_live_minus_active_ms'])} ms",
        ),
        (
            "redeploy: server-side build, created_at to activated_at p50 / max",
            f"{fmt(r['redeploy_built_p50_ms'])} / {fmt(r['redeploy_built_max_ms'])} ms",
        ),
        (
            "redeploy: status polls, WS attempts per redeploy (mean)",
            f"{fmt(r['redeploy_polls_mean'])}, {fmt(r['redeploy_ws_attempts_mean'])}",
        ),
        (
            "server start to /healthz; first deploy of the password project",
            f"{fmt(r['server_startup_ms'], 0)} ms; {fmt(r['bench_first_deploy_ms'], 0)} ms",
        ),
        ("iterations", ", ".join(f"{k} {v}" for k, v in it.items())),
        ("run time", f"{fmt(r['elapsed_s'])} s"),
    ]
    lines += ["", "| comparison (same run) | value |", "|---|---|"]
    lines += [f"| {a} | {b} |" for a, b in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    flags = parser(__doc__, "short windows, 1,000 idle sessions")
    flags.add_argument("--profile", type=Path, help="run the server under cProfile; pstats here")
    flags.add_argument(
        "--no-deflate", action="store_true", help="clients do not offer permessage-deflate"
    )
    flags.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    args = flags.parse_args(argv)
    global DEFLATE
    DEFLATE = not args.no_deflate
    if args.client:
        asyncio.run(client_main())
        return 0
    # SIGTERM unwinds like Ctrl-C, so the finally blocks stop the server and the clients.
    signal.signal(signal.SIGTERM, lambda _sig, _frame: sys.exit(128 + signal.SIGTERM))
    it = Iterations.quick() if args.quick else Iterations.full()
    profile = args.profile.resolve() if args.profile else None
    results = run(it, quick=args.quick, quiet=args.quiet, profile=profile)
    return emit(results, args.json, markdown)


if __name__ == "__main__":
    sys.exit(main())
