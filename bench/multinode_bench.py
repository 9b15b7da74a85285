"""Benchmarks of several ``chatfn serve`` nodes sharing one PostgreSQL (DESIGN section 8).

One run, in a temporary directory: a throwaway PostgreSQL (``tests.postgres.PostgresServer``:
initdb + pg_ctl, as the ``postgres`` user when run as root, fsync off) with one database,
and two ``chatfn serve --no-example --database URL`` processes on it (nodes A and B, each
in its own process group on its own port, with its own ``CHATFN_DATA_DIR`` and the same
``CHATFN_ADMIN_KEY``; A is started first, then B). The server processes, the client
processes and the helpers (``Server``, ``Api``, ``Clients``, the ``--client`` side) are
``bench/server_bench.py``'s; this file adds the second node, PostgreSQL and the change
propagation between nodes. Apps, created through node A's HTTP API: ``guest`` (nothing
deployed, guest users enabled), ``bench`` (``tests/fixtures/password_functions`` packed
with ``runtime.archive.pack_project``, DEMO_PASSWORD set), ``probe`` (a project that knows
its build number, redeployed) and ``gate`` (nothing deployed, its guest_users toggled).

Measured:

- propagation: a change made through node A, and the time from A reporting it until node
  B serves it, B polled every ~5 ms (each poll waits for its answer first) from this
  process, ~10 times each (target: max <= 1 s):

  - deploy:   a new ``probe`` build uploaded to A; "A reported it" is the first
              ``GET deployments/{version}`` on A (every 5 ms) saying ``active``; B serves it
              when a WebSocket ``start_session`` on B with ``auth_params.build`` = the new
              build is accepted (the old build's UserAttemptedStartSession rejects it,
              naming itself). Also from ``activated_at`` (stored by A when it commits),
              and the sandbox template processes B started meanwhile (its direct
              children, sampled every 25 ms: one per deployment pool it booted).
  - deploy under load: the same, as many times as fit in a 12-s window during which the
              client processes run closed-loop pairs on B against ``probe`` itself (50
              sockets, sessions every build accepts); with those pairs' latency and errors.
  - settings: ``PATCH /v1/apps/gate/settings`` guest_users disabled/enabled in turn on A;
              from A's answer until a WebSocket ``start_session`` on B is refused
              (access_denied) or accepted accordingly.
  - secret:   ``PUT /v1/apps/probe/secrets/PROBE`` with a new value on A; from A's answer
              until ``POST /v1/apps/probe/hooks/UserStartedSession`` on B returns the value
              (the handler reads ``context.secrets``).

  A delay can be slightly negative: B can serve a change before A's answer (or A's status
  poll) arrives here, since B hears of it as soon as it is committed.

- pairs: WebSocket ``start_session`` + ``end_session`` pairs/s on persistent sockets (100,
  each in a closed loop, from client processes) against ONE node (every client on A) and
  against TWO nodes (client process i on node i mod 2, so the sockets split evenly), on
  ``guest`` and on ``bench``, in blocks interleaved with each other (B stays up, idle,
  while only A is loaded). Reported: pairs/s (and with the queued work drained after the
  window), latency, the two-node / one-node ratio, and CPU in cores of every process
  group in the window: each server process, the sandbox processes below them, every
  PostgreSQL process (postmaster and backends), the clients (their own count), this
  process, every process that is not this run's (the machine is shared), and the machine
  (``/proc/stat``); and the CPU each pair cost, with its queued work.
  This machine's core count bounds what a second node can add: two nodes only help while
  one node's server process (one Python interpreter) is the limit and cores are idle.

``python bench/multinode_bench.py`` prints Markdown tables; ``--json`` prints one JSON
object and nothing else on stdout (progress goes to stderr, ``--quiet`` drops it);
``--quick`` runs shorter windows and fewer changes, as a smoke test.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import secrets
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import server_bench as sb
from benchlib import emit, fmt, log, parser, percentile
from websockets.asyncio.client import ClientConnection

ROOT = Path(__file__).resolve().parent.parent
GUEST_APP, HANDLER_APP, PROBE_APP, GATE_APP = "guest", "bench", "probe", "gate"
APPS = (GUEST_APP, HANDLER_APP)
NODE_COUNTS = (1, 2)
SECRET = "PROBE"
TARGET_PROPAGATION_MS = 1000.0
SETTLED_CORES = 0.2  # servers + sandboxes + PostgreSQL count as quiet below this (cores)
LOADED_MARGIN_S = 2.0  # a deploy under load starts only this long before the load ends
SATURATED = 0.9  # the machine counts as CPU-bound above this share of its cores
GIL_BOUND = 0.85  # a server process above this (cores) is bound by its one interpreter

ATTEMPTED_HANDLER = '''"""Accept a session when auth_params.build names this build (or "any")."""

BUILD = "{build}"


def handle_event(event, context):
    if event.auth_params.get("build") not in (BUILD, "any"):
        raise SessionRejected("running build " + BUILD)
    return {{"build": BUILD}}
'''

STARTED_HANDLER = '''"""Say which build runs and what the PROBE secret is (the hooks endpoint)."""

BUILD = "{build}"


def handle_event(event, context):
    return {{"build": BUILD, "secret": context.secrets.get("PROBE")}}
'''


@dataclass(frozen=True)
class Iterations:
    blocks: int  # interleaved blocks of every (app, node count)
    window_s: float
    warmup_s: float
    pair_sockets: int
    client_procs: int
    deploys: int
    deploy_warmup: int
    settings_changes: int
    secret_changes: int
    pause_s: float  # between two changes
    loaded_window_s: float  # deploys while node B serves the deployed app under load
    loaded_sockets: int

    @classmethod
    def full(cls) -> Iterations:
        return cls(2, 4.0, 1.0, 100, 2, 10, 2, 10, 10, 0.3, 12.0, 50)

    @classmethod
    def quick(cls) -> Iterations:
        return cls(1, 1.5, 0.75, 100, 2, 3, 1, 3, 3, 0.2, 4.0, 50)


# ---- the processes --------------------------------------------------------------------------


class Node(sb.Server):
    """``chatfn serve`` on the shared PostgreSQL, in its own process group."""

    def __init__(self, name: str, directory: Path, database: str, key: str) -> None:
        directory.mkdir()
        super().__init__(directory, None)
        self.name = name
        self.database = database
        self.key = key  # every node takes the same CHATFN_ADMIN_KEY

    def command(self) -> list[str]:
        chatfn = Path(sys.executable).parent / "chatfn"
        return [str(chatfn), "serve", "--port", str(self.port), "--no-example",
                "--database", self.database]  # fmt: skip


def all_procs() -> dict[int, sb.ProcStat]:
    stats: dict[int, sb.ProcStat] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            found = sb.proc_stat(int(entry))
            if found is not None:
                stats[int(entry)] = found
    return stats


def below(stats: Mapping[int, sb.ProcStat], root: int) -> list[int]:
    """The pids of every live process below ``root``."""
    children: dict[int, list[int]] = {}
    for pid, st in stats.items():
        children.setdefault(st.ppid, []).append(pid)
    found: list[int] = []
    seen = {root}
    frontier = [root]
    while frontier:
        for pid in children.get(frontier.pop(), []):
            if pid not in seen:
                seen.add(pid)
                found.append(pid)
                frontier.append(pid)
    return found


def postmaster_pid(data: Path) -> int:
    """The postmaster's pid, the first line of ``postmaster.pid``."""
    return int((data / "postmaster.pid").read_text().split()[0])


@dataclass(frozen=True)
class Snapshot:
    """CPU seconds so far of each process group, and of the machine. A group's total is
    its live processes' own CPU plus what they reaped from children, so a process that
    exits (reaped by its parent in the group) keeps counting."""

    at: float
    machine_s: float
    groups: dict[str, float]


# The servers, their sandbox processes, PostgreSQL: what must be quiet between windows.
SERVING = ("server_a", "server_b", "sandbox", "postgres")
# And this process (the bench's sampling), every process that is not this run's (the
# machine is shared), and /proc/stat's softirq and steal columns (ticks that the kernel,
# without IRQ time accounting, also counts in the interrupted process's time).
GROUPS = (*SERVING, "bench", "foreign", "softirq", "steal")


def cpu_columns() -> dict[str, float]:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return {"softirq": fields[6] / sb.TICK, "steal": fields[7] / sb.TICK}


def snapshot(nodes: Sequence[Node], postmaster: int) -> Snapshot:
    stats = all_procs()
    groups = dict.fromkeys(GROUPS, 0.0)
    for node in nodes:
        own = stats.get(node.pid)
        if own is not None:
            groups[f"server_{node.name}"] += own.cpu_s
            groups["sandbox"] += own.children_cpu_s  # reaped workers and templates
        for pid in below(stats, node.pid):
            node.seen.setdefault(pid, stats[pid].start)
            groups["sandbox"] += stats[pid].cpu_s + stats[pid].children_cpu_s
    for pid in [postmaster, *below(stats, postmaster)]:
        st = stats.get(pid)
        if st is not None:
            groups["postgres"] += st.cpu_s + st.children_cpu_s
    me = os.getpid()
    mine = {me, postmaster, *below(stats, me), *below(stats, postmaster)}
    groups["bench"] = stats[me].cpu_s if me in stats else 0.0
    groups["foreign"] = sum(
        st.cpu_s + st.children_cpu_s for pid, st in stats.items() if pid not in mine
    )
    groups.update(cpu_columns())
    return Snapshot(time.monotonic(), sb.system_busy_s(), groups)


def cores_between(a: Snapshot, b: Snapshot) -> dict[str, float]:
    """Each group's CPU between two snapshots, in cores; and the wall time."""
    wall = b.at - a.at
    out = {f"{g}_cores": (b.groups[g] - a.groups[g]) / wall for g in GROUPS}
    out["machine_cores"] = (b.machine_s - a.machine_s) / wall
    out["wall_s"] = wall
    return out


class ChildWatch:
    """Notes when each direct child of a process first shows up (every ``interval_s``,
    from ``/proc/<pid>/task/*/children``): a server's direct children are its sandbox
    template processes, one per deployment pool it boots."""

    def __init__(self, pid: int, interval_s: float = 0.025) -> None:
        self.pid, self.interval_s = pid, interval_s
        self.first_seen: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="child-watch", daemon=True)

    def __enter__(self) -> ChildWatch:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        tasks = Path(f"/proc/{self.pid}/task")
        while not self._stop.wait(self.interval_s):
            now = time.monotonic()
            try:
                for task in tasks.iterdir():
                    with contextlib.suppress(OSError):
                        for pid in (task / "children").read_text().split():
                            self.first_seen.setdefault(int(pid), now)
            except OSError:
                return

    def started_between(self, t0: float, t1: float) -> int:
        return sum(t0 <= seen <= t1 for seen in list(self.first_seen.values()))


# ---- the benchmark ----------------------------------------------------------------------------


def probe_archive(directory: Path, build: int) -> bytes:
    from runtime.archive import pack_project

    directory.mkdir(exist_ok=True)
    (directory / "user_attempted_start_session.py").write_text(
        ATTEMPTED_HANDLER.format(build=build), encoding="utf-8"
    )
    (directory / "user_started_session.py").write_text(
        STARTED_HANDLER.format(build=build), encoding="utf-8"
    )
    return pack_project(directory)


def ms_since(t0: float) -> float:
    return (time.monotonic() - t0) * 1e3


class Bench:
    def __init__(
        self, nodes: list[Node], postmaster: int, it: Iterations, tmp: Path, quiet: bool
    ) -> None:
        self.nodes, self.postmaster, self.it, self.tmp, self.quiet = (
            nodes, postmaster, it, tmp, quiet
        )  # fmt: skip
        self.api = sb.Api(nodes[0])
        self.clients: sb.Clients | None = None
        self.build = 0

    def ensure_clients(self) -> sb.Clients:
        if self.clients is None:
            self.clients = sb.Clients(self.it.client_procs)
        return self.clients

    def close(self) -> None:
        if self.clients is not None:
            self.clients.close()
            self.clients = None
        self.api.close()

    def snap(self) -> Snapshot:
        return snapshot(self.nodes, self.postmaster)

    # -- setup ------------------------------------------------------------------------------

    def setup(self) -> dict[str, Any]:
        from runtime.archive import pack_project

        log(self.quiet, "creating apps on node A; deploying the password project to 'bench'")
        for app in (GUEST_APP, HANDLER_APP, PROBE_APP, GATE_APP):
            self.api.call("POST", "/v1/apps", json={"name": app})
        t0 = time.monotonic()
        version = self.api.deploy(HANDLER_APP, pack_project(sb.FUNCTIONS))
        first_deploy_ms = ms_since(t0)
        self.api.call("PUT", f"/v1/apps/{HANDLER_APP}/secrets/DEMO_PASSWORD",
                      json={"value": sb.PASSWORD})  # fmt: skip
        self.api.deploy(PROBE_APP, probe_archive(self.tmp / "probe", self.build))
        self.api.call("PUT", f"/v1/apps/{PROBE_APP}/secrets/{SECRET}", json={"value": "s0"})
        return {"bench_version": version, "bench_first_deploy_ms": first_deploy_ms}

    # -- propagation ------------------------------------------------------------------------

    def propagation(self) -> dict[str, Any]:
        return asyncio.run(self._propagation())

    async def _propagation(self) -> dict[str, Any]:
        it = self.it
        a, b = self.nodes
        headers = {"Authorization": f"Bearer {a.key}"}
        out: dict[str, Any] = {"deploy": [], "settings": [], "secret": []}
        async with (
            httpx.AsyncClient(base_url=a.base, headers=headers, timeout=60) as on_a,
            httpx.AsyncClient(base_url=b.base, headers=headers, timeout=60) as on_b,
            sb.ws_connect(f"{b.ws_base}/v1/apps/{PROBE_APP}/session") as probe_ws,
            sb.ws_connect(f"{b.ws_base}/v1/apps/{GATE_APP}/session") as gate_ws,
        ):
            log(self.quiet, f"propagation: {it.deploy_warmup} + {it.deploys} deploys on A")
            with ChildWatch(b.pid) as watch:
                for n in range(it.deploy_warmup + it.deploys):
                    t0 = time.monotonic()
                    sample = await self._deploy(on_a, probe_ws)
                    await asyncio.sleep(it.pause_s)  # the old version's workers retire
                    sample["b_templates"] = float(watch.started_between(t0, time.monotonic()))
                    if n >= it.deploy_warmup:
                        out["deploy"].append(sample)
                log(self.quiet, f"propagation: deploys on A while B serves '{PROBE_APP}' "
                       f"to {it.loaded_sockets} sockets")  # fmt: skip
                out["deploy_loaded"], out["loaded"] = await self._loaded_deploys(
                    on_a, probe_ws, watch
                )
            log(self.quiet, f"propagation: {it.settings_changes} guest_users changes on A")
            for n in range(it.settings_changes):
                wanted = "disabled" if n % 2 == 0 else "enabled"
                out["settings"].append(await self._setting(on_a, gate_ws, wanted, n))
                await asyncio.sleep(it.pause_s)
            log(self.quiet, f"propagation: {it.secret_changes} secret changes on A")
            for n in range(it.secret_changes):
                out["secret"].append(await self._secret(on_a, on_b, f"s{n + 1}"))
                await asyncio.sleep(it.pause_s)
            await on_a.patch(f"/v1/apps/{GATE_APP}/settings", json={"guest_users": "enabled"})
        return out

    async def _loaded_deploys(
        self, on_a: httpx.AsyncClient, probe_ws: ClientConnection, watch: ChildWatch
    ) -> tuple[list[dict[str, float]], dict[str, Any]]:
        """Deploys on A while the client processes run closed-loop start+end pairs on B
        against the app being deployed (sessions that every build accepts); as many as
        start at least LOADED_MARGIN_S before the load ends."""
        it = self.it
        clients = self.ensure_clients()
        b = self.nodes[1]
        start_at = time.monotonic() + it.warmup_s
        end_at = start_at + it.loaded_window_s
        first = 0
        for proc, count in zip(
            clients.procs, sb.split(it.loaded_sockets, len(clients.procs)), strict=True
        ):
            command = {
                "cmd": "pairs", "url": f"{b.ws_base}/v1/apps/{PROBE_APP}/session",
                "auth": {"build": "any"}, "start_at": start_at, "end_at": end_at,
                "sockets": count, "prefix": "load", "first": first, "interval_s": None,
            }  # fmt: skip
            first += count
            assert proc.stdin is not None
            proc.stdin.write(orjson.dumps(command) + b"\n")
            proc.stdin.flush()
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        samples: list[dict[str, float]] = []
        while not samples or time.monotonic() + LOADED_MARGIN_S < end_at:
            t0 = time.monotonic()
            sample = await self._deploy(on_a, probe_ws)
            sample["under_load"] = float(t0 + sample["b_serves_ms"] / 1e3 <= end_at)
            await asyncio.sleep(it.pause_s)
            sample["b_templates"] = float(watch.started_between(t0, time.monotonic()))
            samples.append(sample)
        deadline = time.monotonic() + 120
        answers = [clients.line(i, deadline) for i in range(len(clients.procs))]
        lat = sorted(v for a in answers for v in a["latencies_ms"])
        load = {
            "per_s": len(lat) / it.loaded_window_s,
            "p50_ms": percentile(lat, 50),
            "p99_ms": percentile(lat, 99),
            "max_ms": lat[-1] if lat else float("nan"),
            "errors": sum(a["errors"] for a in answers),
            "first_errors": [e for a in answers for e in a["first_errors"]][:3],
        }
        self.settle()
        return samples, load

    @staticmethod
    async def _poll(
        check: Callable[[], Awaitable[bool]], interval_s: float = sb.POLL_S
    ) -> tuple[float, int]:
        """Await ``check()`` until it is true, pausing ``interval_s`` after each false;
        when the true answer came (monotonic) and how many polls it took."""
        polls = 0
        while True:
            polls += 1
            if await check():
                return time.monotonic(), polls
            await asyncio.sleep(interval_s)

    async def _change_reaches_b(
        self,
        change: Callable[[], Awaitable[float]],
        b_serves: Callable[[], Awaitable[bool]],
    ) -> dict[str, float]:
        """Make ``change`` on node A while polling B until ``b_serves``: when A answered,
        how long after that B served the change, and how many polls it took."""
        t0 = time.monotonic()
        a_at, (b_at, polls) = await asyncio.wait_for(
            asyncio.gather(change(), self._poll(b_serves)), 60
        )
        return {
            "a_answered_ms": (a_at - t0) * 1e3,
            "delay_ms": (b_at - a_at) * 1e3,
            "from_request_ms": (b_at - t0) * 1e3,
            "b_polls": float(polls),
        }

    async def _deploy(self, on_a: httpx.AsyncClient, ws: ClientConnection) -> dict[str, float]:
        self.build += 1
        build = str(self.build)
        archive = probe_archive(self.tmp / "probe", self.build)
        path = f"/v1/apps/{PROBE_APP}/deployments"
        start = sb.start_message("prober", {"build": build})
        activated: list[datetime.datetime] = []

        async def a_active() -> tuple[float, int]:
            response = await on_a.post(path, content=archive,
                                       headers={"Content-Type": "application/gzip"})  # fmt: skip
            if response.status_code != 202:
                raise RuntimeError(f"upload: {response.status_code} {response.text[:300]}")
            version = int(response.json()["version"])

            async def active() -> bool:
                info = (await on_a.get(f"{path}/{version}")).json()
                if info["status"] == "failed":
                    raise RuntimeError(f"probe v{version} failed: {info['errors']}")
                if info["status"] != "active":
                    return False
                when = datetime.datetime.fromisoformat(info["activated_at"])
                if when.tzinfo is None:
                    when = when.replace(tzinfo=datetime.UTC)
                activated.append(when)
                return True

            return await self._poll(active)

        b_wall: list[float] = []

        async def b_serves() -> bool:
            reply = await sb.ask_ws(ws, start)
            if reply["type"] == "session_started":
                b_wall.append(time.time())
                ended = await sb.ask_ws(ws, sb.END_MESSAGE)
                if ended["type"] != "session_ended":
                    raise RuntimeError(f"end_session on B: {ended}")
                return True
            message = str(reply.get("error", {}).get("message", ""))
            if not message.startswith("running build"):
                raise RuntimeError(f"unexpected reply from B while deploying: {reply}")
            return False

        t0 = time.monotonic()
        (a_at, a_polls), (b_at, b_polls) = await asyncio.wait_for(
            asyncio.gather(a_active(), self._poll(b_serves)), 60
        )
        b_answered_wall = b_wall[0]
        # B's accepting answer came back at b_at; the delay from the commit uses wall clocks.
        return {
            "a_active_ms": (a_at - t0) * 1e3,
            "b_serves_ms": (b_at - t0) * 1e3,
            "delay_ms": (b_at - a_at) * 1e3,
            "from_commit_ms": (b_answered_wall - activated[0].timestamp()) * 1e3,
            "a_polls": float(a_polls),
            "b_polls": float(b_polls),
        }

    async def _setting(
        self, on_a: httpx.AsyncClient, ws: ClientConnection, wanted: str, n: int
    ) -> dict[str, float]:
        attempt = 0

        async def b_serves() -> bool:
            nonlocal attempt
            attempt += 1
            reply = await sb.ask_ws(ws, sb.start_message(f"gate{n}-{attempt}", None))
            if reply["type"] == "session_started":
                ended = await sb.ask_ws(ws, sb.END_MESSAGE)
                if ended["type"] != "session_ended":
                    raise RuntimeError(f"end_session on B: {ended}")
                return wanted == "enabled"
            if reply.get("error", {}).get("code") != "access_denied":
                raise RuntimeError(f"unexpected reply from B while changing settings: {reply}")
            return wanted == "disabled"

        async def change() -> float:
            response = await on_a.patch(f"/v1/apps/{GATE_APP}/settings",
                                        json={"guest_users": wanted})  # fmt: skip
            if response.status_code != 200:
                raise RuntimeError(f"settings: {response.status_code} {response.text[:300]}")
            return time.monotonic()

        return await self._change_reaches_b(change, b_serves)

    async def _secret(
        self, on_a: httpx.AsyncClient, on_b: httpx.AsyncClient, value: str
    ) -> dict[str, float]:
        hook = f"/v1/apps/{PROBE_APP}/hooks/UserStartedSession"
        payload = {"user": {"name": "prober"}, "session_id": "probe"}

        async def b_serves() -> bool:
            response = await on_b.post(hook, json=payload)
            body = response.json()
            if response.status_code != 200 or body.get("status") != "succeeded":
                raise RuntimeError(f"hook on B: {response.status_code} {response.text[:300]}")
            return bool(body["result"]["secret"] == value)

        async def change() -> float:
            response = await on_a.put(f"/v1/apps/{PROBE_APP}/secrets/{SECRET}",
                                      json={"value": value})  # fmt: skip
            if response.status_code != 204:
                raise RuntimeError(f"secret: {response.status_code} {response.text[:300]}")
            return time.monotonic()

        return await self._change_reaches_b(change, b_serves)

    # -- load -------------------------------------------------------------------------------

    def window(self, app: str, nodes: int, duration_s: float) -> dict[str, Any]:
        """One measured window: the same start and end in every client process; client
        process i loads node i mod ``nodes``."""
        assert self.clients is not None
        procs = self.clients.procs
        start_at = time.monotonic() + self.it.warmup_s
        end_at = start_at + duration_s
        auth = {"password": sb.PASSWORD} if app == HANDLER_APP else None
        commands: list[dict[str, Any]] = []
        first = 0
        for i, count in enumerate(sb.split(self.it.pair_sockets, len(procs))):
            node = self.nodes[i % nodes]
            commands.append({
                "cmd": "pairs", "url": f"{node.ws_base}/v1/apps/{app}/session", "auth": auth,
                "start_at": start_at, "end_at": end_at, "sockets": count, "prefix": "u",
                "first": first, "interval_s": None,
            })  # fmt: skip
            first += count
        for proc, command in zip(procs, commands, strict=True):
            assert proc.stdin is not None
            proc.stdin.write(orjson.dumps(command) + b"\n")
            proc.stdin.flush()
        edges: list[Snapshot] = []
        for moment in (start_at, end_at):
            time.sleep(max(0.0, moment - time.monotonic()))
            edges.append(self.snap())
        deadline = time.monotonic() + 120
        answers = [self.clients.line(i, deadline) for i in range(len(commands))]
        # Once every client answered (its last pair done, its sockets closed), what the
        # servers still do is work the window queued (background hooks).
        answered_at = time.monotonic()
        settled, quiet_at = self.settle()
        lat = sorted(v for a in answers for v in a["latencies_ms"])
        per_node = [0] * nodes
        for i, a in enumerate(answers):
            per_node[i % nodes] += len(a["latencies_ms"])
        return {
            "count": len(lat),
            "duration_s": duration_s,
            "per_s": len(lat) / duration_s,
            "per_node_per_s": [c / duration_s for c in per_node],
            "latencies": lat,
            "errors": sum(a["errors"] for a in answers),
            "first_errors": [e for a in answers for e in a["first_errors"]][:3],
            "late_start": any(a["late_start"] for a in answers),
            "client_cores": [a["cpu_s"] / duration_s for a in answers],
            "drain_s": max(0.0, quiet_at - answered_at),
            "cpu": cores_between(edges[0], edges[1]),
            # From the start until every server is quiet again: the window's work with what
            # it left queued when the window ended.
            "through_drain": cores_between(edges[0], settled),
        }

    def settle(self, timeout_s: float = 30.0) -> tuple[Snapshot, float]:
        """Wait until the servers, their sandboxes and PostgreSQL are quiet (below
        SETTLED_CORES for three samples 0.1 s apart); the last snapshot and when the quiet
        began."""
        prev = self.snap()
        streak: list[float] = []
        deadline = prev.at + timeout_s
        while time.monotonic() < deadline:
            time.sleep(0.1)
            now = self.snap()
            busy = cores_between(prev, now)
            if sum(busy[f"{g}_cores"] for g in SERVING) < SETTLED_CORES:
                streak.append(prev.at)
                if len(streak) >= 3:
                    return now, streak[0]
            else:
                streak.clear()
            prev = now
        return prev, prev.at

    def load(self) -> dict[str, list[dict[str, Any]]]:
        it = self.it
        self.ensure_clients()
        out: dict[str, list[dict[str, Any]]] = {}
        log(self.quiet, "warm-up: sockets, users, workers on both nodes")
        for app in APPS:
            for nodes in NODE_COUNTS:
                self.window(app, nodes, 0.5)
                out[f"{app}_{nodes}"] = []
        for block in range(it.blocks):
            for app in APPS:
                for nodes in NODE_COUNTS:
                    log(
                        self.quiet,
                        f"pairs block {block + 1}/{it.blocks}: {app}, {nodes} node(s), "
                        f"{it.pair_sockets} sockets, {it.window_s:g} s",
                    )
                    out[f"{app}_{nodes}"].append(self.window(app, nodes, it.window_s))
        return out


# ---- results --------------------------------------------------------------------------------


def spread(values: Sequence[float], prefix: str) -> dict[str, float]:
    ordered = sorted(values)
    nan = float("nan")
    return {
        f"{prefix}_p50_ms": percentile(ordered, 50),
        f"{prefix}_p90_ms": percentile(ordered, 90),
        f"{prefix}_max_ms": ordered[-1] if ordered else nan,
        f"{prefix}_min_ms": ordered[0] if ordered else nan,
    }


CHANGES = ("deploy", "deploy_loaded", "settings", "secret")


def propagation_results(samples: Mapping[str, Any]) -> dict[str, Any]:
    r: dict[str, Any] = {}
    for kind in CHANGES:
        rows: list[dict[str, float]] = samples[kind]
        r[f"{kind}_count"] = len(rows)
        r.update(spread([s["delay_ms"] for s in rows], f"{kind}_delay"))
        r[f"{kind}_delays_ms"] = [round(s["delay_ms"], 1) for s in rows]
        r[f"{kind}_b_polls_mean"] = sum(s["b_polls"] for s in rows) / max(1, len(rows))
        if kind.startswith("deploy"):
            r.update(spread([s["a_active_ms"] for s in rows], f"{kind}_a_active"))
            r.update(spread([s["b_serves_ms"] for s in rows], f"{kind}_b_serves"))
            r.update(spread([s["from_commit_ms"] for s in rows], f"{kind}_from_commit"))
            templates = sorted(s["b_templates"] for s in rows)
            r[f"{kind}_b_templates"] = [int(v) for v in templates]
            r[f"{kind}_b_templates_p50"] = percentile(templates, 50)
            r[f"{kind}_b_templates_max"] = templates[-1] if templates else float("nan")
        else:
            r.update(spread([s["a_answered_ms"] for s in rows], f"{kind}_a_answered"))
            r.update(spread([s["from_request_ms"] for s in rows], f"{kind}_from_request"))
    r["deploy_loaded_served_under_load"] = int(
        sum(s["under_load"] for s in samples["deploy_loaded"])
    )
    for key, value in samples["loaded"].items():
        r[f"deploy_loaded_pairs_{key}"] = value
    return r


def load_stats(windows: Sequence[Mapping[str, Any]], prefix: str) -> dict[str, Any]:
    """Windows of one (app, node count) merged: rate, latency, CPU by process group."""
    lat = sorted(v for w in windows for v in w["latencies"])
    count = len(lat)
    duration = sum(w["duration_s"] for w in windows)
    drain = sum(w["drain_s"] for w in windows)
    wall = sum(w["cpu"]["wall_s"] for w in windows)

    def cores(key: str, source: str = "cpu") -> float:
        return float(sum(w[source][key] * w[source]["wall_s"] for w in windows))

    clients = sum(sum(w["client_cores"]) * w["cpu"]["wall_s"] for w in windows)
    r: dict[str, Any] = {
        f"{prefix}_per_s": count / duration,
        f"{prefix}_sustained_per_s": count / (duration + drain),
        f"{prefix}_count": count,
        f"{prefix}_p50_ms": percentile(lat, 50),
        f"{prefix}_p99_ms": percentile(lat, 99),
        f"{prefix}_max_ms": lat[-1] if lat else float("nan"),
        f"{prefix}_per_s_blocks": [w["per_s"] for w in windows],
        f"{prefix}_per_node_per_s": [
            sum(w["per_node_per_s"][i] * w["duration_s"] for w in windows) / duration
            for i in range(len(windows[0]["per_node_per_s"]))
        ],
        f"{prefix}_drain_s": drain / len(windows),
        f"{prefix}_client_cores": clients / wall,
        f"{prefix}_client_cores_max": max(c for w in windows for c in w["client_cores"]),
        f"{prefix}_errors": sum(w["errors"] for w in windows),
        f"{prefix}_first_errors": [e for w in windows for e in w["first_errors"]][:3],
        f"{prefix}_late_start": any(w["late_start"] for w in windows),
    }
    known = clients
    for group in (*GROUPS, "machine"):
        r[f"{prefix}_{group}_cores"] = cores(f"{group}_cores") / wall
        # CPU per pair including the queued work drained after the window (the clients
        # are idle by then, so theirs is the window's).
        per_pair = cores(f"{group}_cores", "through_drain") / max(count, 1) * 1e3
        r[f"{prefix}_{group}_cpu_ms"] = per_pair
        if group not in ("machine", "softirq", "steal"):
            known += cores(f"{group}_cores")
    # What /proc/stat counts as busy that no process accounts for (rounding, processes
    # that came and went unreaped).
    r[f"{prefix}_other_cores"] = (cores("machine_cores") - known) / wall
    r[f"{prefix}_client_cpu_ms"] = clients / max(count, 1) * 1e3
    r[f"{prefix}_servers_cores"] = r[f"{prefix}_server_a_cores"] + r[f"{prefix}_server_b_cores"]
    r[f"{prefix}_servers_cpu_ms"] = r[f"{prefix}_server_a_cpu_ms"] + r[f"{prefix}_server_b_cpu_ms"]
    # This run's processes: what one pair costs the machine, wherever it runs.
    r[f"{prefix}_run_cores"] = sum(
        r[f"{prefix}_{g}_cores"] for g in ("servers", "sandbox", "postgres", "client")
    )
    r[f"{prefix}_run_cpu_ms"] = sum(
        r[f"{prefix}_{g}_cpu_ms"] for g in ("servers", "sandbox", "postgres", "client")
    )
    return r


def bound(r: Mapping[str, Any], prefix: str, cpus: int) -> str:
    """What limits a configuration, from its CPU numbers."""
    machine = r[f"{prefix}_machine_cores"]
    busiest = max(r[f"{prefix}_server_a_cores"], r[f"{prefix}_server_b_cores"])
    found: list[str] = []
    if busiest >= GIL_BOUND:
        found.append(f"a server process's one interpreter ({busiest:.2f} cores)")
    if machine >= SATURATED * cpus:
        found.append(
            f"the machine's CPU ({machine:.2f} of {cpus} cores busy, "
            f"{r[f'{prefix}_foreign_cores']:.2f} of them other tenants')"
        )
    if not found:
        found.append(f"neither one interpreter nor the CPU ({machine:.2f} of {cpus} cores busy)")
    return "; ".join(found)


def load_results(load: Mapping[str, list[dict[str, Any]]], cpus: int) -> dict[str, Any]:
    r: dict[str, Any] = {}
    for app in APPS:
        for nodes in NODE_COUNTS:
            r.update(load_stats(load[f"{app}_{nodes}"], f"pairs_{app}_{nodes}n"))
    for app in APPS:
        one, two = f"pairs_{app}_1n", f"pairs_{app}_2n"
        r[f"two_vs_one_{app}"] = r[f"{two}_per_s"] / r[f"{one}_per_s"]
        r[f"two_vs_one_{app}_sustained"] = r[f"{two}_sustained_per_s"] / r[f"{one}_sustained_per_s"]
        for prefix in (one, two):
            # Every core busy with this run's processes only, at the CPU a pair costs them;
            # and one node's interpreter busy all the time (one core).
            r[f"{prefix}_ceiling_per_s"] = cpus / max(r[f"{prefix}_run_cpu_ms"], 1e-9) * 1e3
            r[f"{prefix}_one_interpreter_per_s"] = (
                1e3 / max(r[f"{prefix}_servers_cpu_ms"], 1e-9) * len(r[f"{prefix}_per_node_per_s"])
            )
            r[f"{prefix}_bound"] = bound(r, prefix, cpus)
    r["client_bound"] = any(
        r[f"pairs_{app}_{n}n_client_cores_max"] > sb.CLIENT_BOTTLENECK
        for app in APPS
        for n in NODE_COUNTS
    )
    return r


def targets(r: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for kind in CHANGES:
        value = r[f"{kind}_delay_max_ms"]
        out[f"{kind}_delay_max_ms"] = {
            "value": value, "target": TARGET_PROPAGATION_MS,
            "ok": value <= TARGET_PROPAGATION_MS, "kind": "<=",
        }  # fmt: skip
    return out


def postgres_info(url: str) -> dict[str, Any]:
    import psycopg

    with psycopg.connect(url) as conn:
        row = conn.execute("SHOW server_version").fetchone()
        backends = conn.execute("SELECT count(*) FROM pg_stat_activity").fetchone()
    return {
        "postgres_version": row[0] if row else None,
        "postgres_backends_end": backends[0] if backends else None,
    }


def run(it: Iterations, *, quick: bool, quiet: bool) -> dict[str, Any]:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from tests.postgres import PostgresServer

    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    busy_before = sb.busy_cores()
    nofile = sb.raise_nofile()
    cpus = len(os.sched_getaffinity(0))
    key = secrets.token_hex(16)  # CHATFN_ADMIN_KEY: 32 characters
    with tempfile.TemporaryDirectory(prefix="chatfn-multinode-bench-") as name:
        tmp = Path(name)
        postgres: PostgresServer | None = None
        nodes: list[Node] = []
        bench: Bench | None = None
        exit_codes: list[int | None] = []
        problems: list[dict[str, Any]] = []
        try:
            t0 = time.monotonic()
            log(quiet, "starting PostgreSQL")
            postgres = PostgresServer()
            database = postgres.new_database("multinode")
            postgres_ms = ms_since(t0)
            startup_ms: list[float] = []
            for label in ("a", "b"):
                node = Node(label, tmp / f"node-{label}", database, key)
                nodes.append(node)
                log(quiet, f"starting node {label.upper()} on port {node.port}")
                startup_ms.append(node.start())
            bench = Bench(nodes, postmaster_pid(postgres.data), it, tmp, quiet)
            setup = bench.setup()
            propagation = bench.propagation()
            load = bench.load()
            pg = postgres_info(database)
        finally:
            if bench is not None:
                bench.close()
            for node in nodes:
                log(quiet, f"stopping node {node.name.upper()}")
                exit_codes.append(node.stop())
                problems.append(node.log_problems())
            if postgres is not None:
                postgres.close()
    results: dict[str, Any] = {
        "postgres_start_ms": postgres_ms,
        "node_startup_ms": startup_ms,
        **setup,
        **pg,
    }
    results.update(propagation_results(propagation))
    results.update(load_results(load, cpus))
    results["node_exit_codes"] = exit_codes
    results["node_log_tracebacks"] = [p["tracebacks"] for p in problems]
    results["node_log_error_lines"] = [p["error_lines"] for p in problems]
    results["node_log_first_errors"] = [p["first"] for p in problems]
    results["targets"] = targets(results)
    results["machine"] = sb.machine(load_before, nofile)
    results["machine"]["busy_cores_before"] = busy_before
    results["machine"]["cpus_usable"] = cpus
    results["iterations"] = asdict(it)
    results["quick"] = quick
    results["elapsed_s"] = time.perf_counter() - started
    return results


# ---- report ---------------------------------------------------------------------------------


def markdown(r: Mapping[str, Any]) -> str:
    m, t, it = r["machine"], r["targets"], r["iterations"]
    cpus = m["cpus_usable"]
    pk = m["packages"]
    lines = [
        f"Multi-node benchmark: {m['cpu_count']} CPUs ({m['cpu_model']}), Python "
        f"{m['python']}, kernel {m['kernel']}, PostgreSQL {r['postgres_version']} (fsync off), "
        f"uvicorn {pk['uvicorn']}, websockets {pk['websockets']}, SQLAlchemy "
        f"{pk['SQLAlchemy']}; load average {fmt(m['loadavg_1m_before'], 2)} -> "
        f"{fmt(m['loadavg_1m_after'], 2)}, {fmt(m['busy_cores_before'], 2)} cores busy before "
        f"the run{' (quick)' if r['quick'] else ''}",
        "",
        "| change made on node A | A reported it -> node B serves it: p50 / p90 / max "
        "| min | target (max) | met | n |",
        "|---|---|---|---|---|---|",
    ]
    labels = {
        "deploy": "code deploy (upload; A's status poll says active -> a WS start_session on "
        "B runs the new build)",
        "deploy_loaded": f"the same while B serves that app to {it['loaded_sockets']} sockets in "
        f"a closed loop ({r['deploy_loaded_pairs_per_s']:,.0f} pairs/s)",
        "settings": "guest_users disabled/enabled (PATCH answered -> a WS start_session on B "
        "refused/accepted)",
        "secret": "secret value (PUT answered -> the hooks endpoint on B returns the handler's "
        "new context.secrets value)",
    }
    for kind, label in labels.items():
        p = f"{kind}_delay"
        ok = "yes" if t[f"{p}_max_ms"]["ok"] else "**no**"
        lines.append(
            f"| {label} | {fmt(r[f'{p}_p50_ms'])} / {fmt(r[f'{p}_p90_ms'])} / "
            f"{fmt(r[f'{p}_max_ms'])} ms | {fmt(r[f'{p}_min_ms'])} ms "
            f"| <= {fmt(TARGET_PROPAGATION_MS, 0)} ms | {ok} | {r[f'{kind}_count']} |"
        )
    lines += [
        "",
        f"| WS start+end pairs/s, {it['pair_sockets']} persistent sockets in a closed loop "
        "| one node | two nodes | two / one | p50 / p99 / max, one node | p50 / p99 / max, "
        "two nodes | per node (two) |",
        "|---|---|---|---|---|---|---|",
    ]

    def lat(prefix: str) -> str:
        return (
            f"{fmt(r[f'{prefix}_p50_ms'])} / {fmt(r[f'{prefix}_p99_ms'])} / "
            f"{fmt(r[f'{prefix}_max_ms'])} ms"
        )

    for app, label in ((GUEST_APP, "guest app, nothing deployed"),
                       (HANDLER_APP, "password handler deployed")):  # fmt: skip
        one, two = f"pairs_{app}_1n", f"pairs_{app}_2n"
        lines.append(
            f"| {label} | {fmt(r[f'{one}_per_s'], 0)} /s ({fmt(r[f'{one}_sustained_per_s'], 0)} "
            f"with its queued work) | {fmt(r[f'{two}_per_s'], 0)} /s "
            f"({fmt(r[f'{two}_sustained_per_s'], 0)} with its queued work) "
            f"| {fmt(r[f'two_vs_one_{app}'], 2)}x ({fmt(r[f'two_vs_one_{app}_sustained'], 2)}x) "
            f"| {lat(one)} | {lat(two)} "
            f"| {', '.join(fmt(v, 0) for v in r[f'{two}_per_node_per_s'])} /s |"
        )
    lines += [
        "",
        "| CPU in the window (cores) | server A | server B | sandbox | PostgreSQL "
        "| clients (sum, busiest) | this bench | other tenants | unaccounted | machine "
        "| CPU per pair with its queued work: servers + sandbox + PostgreSQL + clients "
        "| pairs/s if every core ran this; if the interpreters were always busy | bound by |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for app in APPS:
        for nodes in NODE_COUNTS:
            p = f"pairs_{app}_{nodes}n"
            lines.append(
                f"| {app}, {nodes} node{'s' if nodes > 1 else ''} "
                f"| {fmt(r[f'{p}_server_a_cores'], 2)} | {fmt(r[f'{p}_server_b_cores'], 2)} "
                f"| {fmt(r[f'{p}_sandbox_cores'], 2)} | {fmt(r[f'{p}_postgres_cores'], 2)} "
                f"| {fmt(r[f'{p}_client_cores'], 2)}, {fmt(r[f'{p}_client_cores_max'], 2)} "
                f"| {fmt(r[f'{p}_bench_cores'], 2)} | {fmt(r[f'{p}_foreign_cores'], 2)} "
                f"| {fmt(r[f'{p}_other_cores'], 2)} | {fmt(r[f'{p}_machine_cores'], 2)} "
                f"| {fmt(r[f'{p}_servers_cpu_ms'], 2)} + {fmt(r[f'{p}_sandbox_cpu_ms'], 2)} + "
                f"{fmt(r[f'{p}_postgres_cpu_ms'], 2)} + {fmt(r[f'{p}_client_cpu_ms'], 2)} = "
                f"{fmt(r[f'{p}_run_cpu_ms'], 2)} ms "
                f"| {fmt(r[f'{p}_ceiling_per_s'], 0)} /s; "
                f"{fmt(r[f'{p}_one_interpreter_per_s'], 0)} /s | {r[f'{p}_bound']} |"
            )
    errors = sum(r[f"pairs_{app}_{n}n_errors"] for app in APPS for n in NODE_COUNTS)
    late = any(r[f"pairs_{app}_{n}n_late_start"] for app in APPS for n in NODE_COUNTS)
    rows = [
        (
            "pairs/s, each block: guest 1 node; 2 nodes; bench 1 node; 2 nodes",
            "; ".join(
                ", ".join(fmt(v, 0) for v in r[f"pairs_{app}_{n}n_per_s_blocks"])
                for app in APPS
                for n in NODE_COUNTS
            ),
        ),
        (
            "queued work drained after a window (mean): guest 1 / 2 nodes; bench 1 / 2 nodes",
            ", ".join(
                f"{fmt(r[f'pairs_{app}_{n}n_drain_s'], 2)} s" for app in APPS for n in NODE_COUNTS
            ),
        ),
        (
            "deploy: upload to A active p50 / max; B serving after A's commit (activated_at, "
            "wall clock) p50 / max",
            f"{fmt(r['deploy_a_active_p50_ms'])} / {fmt(r['deploy_a_active_max_ms'])} ms; "
            f"{fmt(r['deploy_from_commit_p50_ms'])} / {fmt(r['deploy_from_commit_max_ms'])} ms",
        ),
        (
            "deploy: template processes B started per deploy, idle; under load (each)",
            f"{', '.join(fmt(v) for v in r['deploy_b_templates'])}; "
            f"{', '.join(fmt(v) for v in r['deploy_loaded_b_templates'])}",
        ),
        (
            "deploys under load: B served the new build before the load ended; B's pairs "
            "p50 / p99 / max; their errors",
            f"{r['deploy_loaded_served_under_load']} of {r['deploy_loaded_count']}; "
            f"{fmt(r['deploy_loaded_pairs_p50_ms'])} / {fmt(r['deploy_loaded_pairs_p99_ms'])} / "
            f"{fmt(r['deploy_loaded_pairs_max_ms'])} ms; {r['deploy_loaded_pairs_errors']} "
            f"{r['deploy_loaded_pairs_first_errors'][:1]}",
        ),
        (
            "settings / secret: request sent on A -> B serves it, p50 / max",
            f"{fmt(r['settings_from_request_p50_ms'])} / {fmt(r['settings_from_request_max_ms'])}"
            f" ms; {fmt(r['secret_from_request_p50_ms'])} / "
            f"{fmt(r['secret_from_request_max_ms'])} ms",
        ),
        (
            "polls of B per change (mean): deploy, deploy under load, settings, secret",
            ", ".join(fmt(r[f"{k}_b_polls_mean"]) for k in CHANGES),
        ),
        (
            "each delay (ms): deploy; deploy under load; settings; secret",
            "; ".join(", ".join(fmt(v) for v in r[f"{k}_delays_ms"]) for k in CHANGES),
        ),
        ("client-bound (a client process above 0.9 cores)", "yes" if r["client_bound"] else "no"),
        (
            "softirq / steal cores in the windows (softirq is also inside the processes' "
            "times): guest 1 / 2 nodes; bench 1 / 2 nodes",
            ", ".join(
                f"{fmt(r[f'pairs_{app}_{n}n_softirq_cores'], 2)} / "
                f"{fmt(r[f'pairs_{app}_{n}n_steal_cores'], 2)}"
                for app in APPS
                for n in NODE_COUNTS
            ),
        ),
        (
            "errors in the load windows; a client that started a window late",
            f"{fmt(errors)}; {'yes' if late else 'none'}",
        ),
        (
            "nodes: exit codes after SIGINT; tracebacks / error lines in their logs",
            f"{r['node_exit_codes']}; {r['node_log_tracebacks']} / {r['node_log_error_lines']}",
        ),
        (
            "PostgreSQL start + database; nodes start to /healthz (A, B); first deploy of "
            "the password project",
            f"{fmt(r['postgres_start_ms'], 0)} ms; "
            f"{', '.join(fmt(v, 0) for v in r['node_startup_ms'])} ms; "
            f"{fmt(r['bench_first_deploy_ms'], 0)} ms",
        ),
        ("PostgreSQL backends at the end", fmt(r["postgres_backends_end"])),
        ("usable CPUs", fmt(cpus)),
        ("iterations", ", ".join(f"{k} {v}" for k, v in it.items())),
        ("run time", f"{fmt(r['elapsed_s'])} s"),
    ]
    lines += ["", "| comparison (same run) | value |", "|---|---|"]
    lines += [f"| {a} | {b} |" for a, b in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parser(__doc__, "short windows, fewer changes").parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the finally blocks stop the nodes, the clients and
    # PostgreSQL.
    signal.signal(signal.SIGTERM, lambda _sig, _frame: sys.exit(128 + signal.SIGTERM))
    it = Iterations.quick() if args.quick else Iterations.full()
    results = run(it, quick=args.quick, quiet=args.quiet)
    return emit(results, args.json, markdown)


if __name__ == "__main__":
    sys.exit(main())
