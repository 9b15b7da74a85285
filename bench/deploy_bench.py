"""Benchmarks of deploying a function project that declares a real dependency, ``pyjwt[crypto]``.

One run, in a temporary directory: a throwaway SQLite database and a throwaway environments
directory (``runtime.core.Runtime(url, envs_dir=...)``). At the start, ``requirements.in``
(``pyjwt[crypto]``) is resolved once with ``runtime.dependencies.resolve`` into the project's
``requirements.txt``, so every deploy has a cached lock; the first deploy installs the
environment, every later one finds it installed. The project verifies an RS256 JWT:
``init.py`` parses the public key PEM from the app's ``JWT_PUBLIC_KEY`` secret once per
worker, and the UserAttemptedStartSession handler imports ``jwt`` and verifies the token in
``auth_params`` (signature, audience, expiry, subject). The bench makes the RSA key pair and
signs the token with the ``openssl`` command (its virtualenv has no ``cryptography``, and the
host never imports from a sandbox environment); a forged token is checked to be rejected.

Measured:

- first deploy:   the one that installs the environment (pip from the machine's package
                  configuration), one sample, split with ``App.deploy(progress=...)`` into
                  install (first progress message to "starting") and the rest;
- cached deploy:  ``App.deploy`` of a new version (the handler changes by one comment line)
                  with the lock cached and the environment installed; target <= 1 s;
- plain deploy:   the same for a project with no dependencies (the same init.py-reads-a-secret
                  shape, an hmac check instead of jwt), for comparison;
- first invoke:   ``app.invoke`` right after each cached deploy returned: the worker that ran
                  init.py at deploy time now loads the handler module and verifies its first
                  token (while the previous version's pool is being retired);
- warm invoke:    further invocations on the same worker (the steady state). Both are
                  also reported as the pool's own duration (``Invocation.duration_ms``:
                  the worker's part and its host calls, without app state or the log write);
- spawn:          a worker forked from a template that has jwt (and cryptography) imported:
                  ``DeploymentPool.spawn_ms``, the pool's own fork-to-ready timer (control
                  request to the worker's ready frame), of the spawns forced by an app whose
                  chatfn.toml says ``[runtime] max_invocations = 1`` (every invocation needs
                  a new worker; most are spawned inline, some by the janitor). The same
                  invocations are timed end to end as "cold invoke" (a spawn, init.py, the
                  handler), counted apart when the janitor had spawned the worker already.
                  A no-dependency app with the same manifest gives the spawn without jwt;
- fresh import:   the alternative, a new ``python -I`` that puts the environment on sys.path
                  and imports jwt (with cryptography behind it), timed to its "ready" line;
                  and a bare ``python -I`` to its "ready" line (interpreter start-up alone);
- phases:         a few more cached deploys with the steps of ``App.deploy`` timed by
                  wrappers on this thread (read, compile, lock checks, environment, template
                  boot, first worker, init.py, database writes), after the measured ones so
                  the wrappers never touch them. Means, so that the rows add up.

Kinds that are compared are measured in blocks interleaved with each other, so a drift in
the machine hits them alike. Database transactions per deploy are counted with a listener
on the engine's ``begin`` event.

``python bench/deploy_bench.py`` prints Markdown tables; ``--json`` prints one JSON object
and nothing else on stdout (progress goes to stderr, ``--quiet`` drops it); ``--quick`` runs
about a tenth of the iterations, as a smoke test.
"""

from __future__ import annotations

import base64
import gc
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy
from benchlib import emit, fmt, log, machine_basics, parser, percentile, since_ms
from sqlalchemy import event

import runtime.core
import sandbox.pool
from runtime.core import App, Runtime
from runtime.dependencies import parse_lock, resolve
from runtime.deployments import Deployments
from runtime.invocations import Invocation
from sandbox import DeploymentPool, WorkerPool
from sandbox.process import Zygote

REQUIREMENTS = "pyjwt[crypto]\n"
AUDIENCE = "chatfn-bench"
USERNAME = "alice"
SECRET = "JWT_PUBLIC_KEY"
PASSWORD = "letmein"
EVENT = "UserAttemptedStartSession"
HANDLER_FILE = "user_attempted_start_session.py"
BLOCKS = 10
TARGET_DEPLOY_MS = 1000.0
TARGET_SPAWN_MS = 5.0  # bench/sandbox_bench.py's spawn target (a template without dependencies)
TOKEN_LIFETIME_S = 3600

JWT_INIT = f'''"""Parse the token-signing public key once per worker."""

from jwt.algorithms import RSAAlgorithm

PUBLIC_KEY = RSAAlgorithm(RSAAlgorithm.SHA256).prepare_key(context.secrets["{SECRET}"])
'''

JWT_HANDLER = f'''"""Accept a session when auth_params.token is an RS256 JWT for this username."""

import jwt


def handle_event(event, context):
    token = event.auth_params.get("token")
    if not isinstance(token, str):
        raise SessionRejected("a token is required")
    try:
        claims = jwt.decode(token, PUBLIC_KEY, algorithms=["RS256"], audience="{AUDIENCE}")
    except jwt.InvalidTokenError as exc:
        raise SessionRejected("invalid token: " + str(exc))
    if claims.get("sub") != event.username:
        raise SessionRejected("the token is for another user")
    return {{"sub": claims["sub"]}}
'''

PLAIN_INIT = '''"""Read the shared password once per worker."""

EXPECTED = context.secrets["DEMO_PASSWORD"]
'''

PLAIN_HANDLER = '''"""Accept a session when auth_params.password is the shared password."""

import hmac


def handle_event(event, context):
    given = event.auth_params.get("password", "")
    if not isinstance(given, str) or not hmac.compare_digest(given, EXPECTED):
        raise SessionRejected("Wrong password")
    return {"welcome": event.username}
'''

# The fresh-interpreter alternative: what a worker started with exec would import first.
FRESH_IMPORT = (
    "import sys; sys.path.append(sys.argv[1]); import jwt, jwt.algorithms; "
    "from cryptography.hazmat.primitives.asymmetric import rsa; "
    "assert jwt.algorithms.has_crypto; sys.stdout.write('ready\\n'); sys.stdout.flush()"
)
BARE = "import sys; sys.stdout.write('ready\\n'); sys.stdout.flush()"


@dataclass(frozen=True)
class Iterations:
    warmup: int
    deploys: int
    plain_deploys: int
    warm_per_deploy: int
    cold: int
    fresh: int
    bare: int
    phases: int

    @classmethod
    def full(cls) -> Iterations:
        return cls(2, 60, 30, 20, 150, 40, 40, 12)

    @classmethod
    def quick(cls) -> Iterations:
        return cls(1, 10, 10, 5, 20, 10, 10, 3)


# ---- measuring ----------------------------------------------------------------------------


def summarize(ms: list[float]) -> dict[str, float]:
    values = sorted(ms)
    return {
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "max": values[-1] if values else float("nan"),
        "mean": sum(values) / len(values) if values else float("nan"),
    }


# ---- keys and tokens (openssl) ------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def openssl(*args: str, data: bytes | None = None) -> bytes:
    done = subprocess.run(["openssl", *args], input=data, capture_output=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {done.stderr.decode(errors='replace')}")
    return done.stdout


@dataclass(frozen=True)
class Signer:
    """An RSA key pair made with openssl, and RS256 tokens signed with it."""

    key_file: Path
    public_pem: str

    @classmethod
    def create(cls, directory: Path) -> Signer:
        if shutil.which("openssl") is None:
            raise RuntimeError("the openssl command is needed to make the bench's RSA key")
        key_file = directory / "signing-key.pem"
        openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-quiet",
                "-out", str(key_file))  # fmt: skip
        public_pem = openssl("pkey", "-in", str(key_file), "-pubout").decode("ascii")
        return cls(key_file, public_pem)

    def token(self, subject: str, lifetime_s: int) -> str:
        header = b64url(json.dumps({"alg": "RS256", "typ": "JWT"}).encode())
        now = int(time.time())
        claims = {"sub": subject, "aud": AUDIENCE, "iat": now, "exp": now + lifetime_s}
        signing_input = f"{header}.{b64url(json.dumps(claims).encode())}"
        signature = openssl("dgst", "-sha256", "-sign", str(self.key_file),
                            data=signing_input.encode())  # fmt: skip
        return f"{signing_input}.{b64url(signature)}"


# ---- projects -----------------------------------------------------------------------------


def write_project(
    directory: Path,
    init: str,
    handler: str,
    *,
    requirements: str | None = None,
    lock: str | None = None,
    manifest: str | None = None,
) -> Path:
    directory.mkdir(parents=True)
    (directory / "init.py").write_text(init, encoding="utf-8")
    (directory / HANDLER_FILE).write_text(handler, encoding="utf-8")
    for name, text in (
        ("requirements.in", requirements),
        ("requirements.txt", lock),
        ("chatfn.toml", manifest),
    ):
        if text is not None:
            (directory / name).write_text(text, encoding="utf-8")
    return directory


class Project:
    """A project directory that gets a new build of its handler before each deploy."""

    def __init__(self, directory: Path, handler: str) -> None:
        self.directory = directory
        self.handler = handler
        self.builds = 0

    def next_build(self) -> Path:
        self.builds += 1
        text = f"{self.handler}\n# build {self.builds}\n"
        (self.directory / HANDLER_FILE).write_text(text, encoding="utf-8")
        return self.directory


# ---- processes ----------------------------------------------------------------------------


def ready_ms(code: str, *args: str) -> float:
    """Start ``python -I -c code`` and time it to its "ready" line (its exit is untimed)."""
    t0 = time.perf_counter_ns()
    proc = subprocess.Popen(
        [sys.executable, "-I", "-c", code, *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={"LANG": "C.UTF-8"},
        cwd="/",
    )
    assert proc.stdout is not None and proc.stderr is not None
    line = proc.stdout.readline()
    took = since_ms(t0)
    stderr = proc.stderr.read()
    proc.stdout.close()
    proc.stderr.close()
    if proc.wait() != 0 or line != b"ready\n":
        raise RuntimeError(f"python -I failed: {stderr.decode(errors='replace')[-2000:]}")
    return took


# ---- phases of App.deploy -----------------------------------------------------------------


class Phases:
    """Wrappers that time named steps of ``App.deploy`` on the calling thread only (the
    janitor and the retiring threads run the same code and are not counted)."""

    def __init__(self) -> None:
        self.thread = threading.current_thread()
        self.current: dict[str, float] = {}
        self.deploys: list[dict[str, float]] = []

    @contextmanager
    def installed(self) -> Iterator[None]:
        patches: list[tuple[object, str, Any]] = []

        def wrap(owner: object, attr: str, label: str) -> None:
            original = getattr(owner, attr)

            def timed(*args: Any, **kwargs: Any) -> Any:
                if threading.current_thread() is not self.thread:
                    return original(*args, **kwargs)
                t0 = time.perf_counter_ns()
                try:
                    return original(*args, **kwargs)
                finally:
                    self.current[label] = self.current.get(label, 0.0) + since_ms(t0)

            patches.append((owner, attr, original))
            setattr(owner, attr, timed)

        wrap(runtime.core, "read_project", "read project")
        wrap(Deployments, "create", "db: create version")
        wrap(runtime.core, "validate", "compile (App.deploy)")
        wrap(Runtime, "policy_for", "policy_for")
        wrap(runtime.core, "ensure_environment", "ensure_environment")
        wrap(Deployments, "set_progress", "db: progress")
        wrap(WorkerPool, "prepare", "prepare")
        wrap(sandbox.pool, "validate", "compile (WorkerPool.prepare)")
        wrap(Zygote, "start", "template boot")
        wrap(Zygote, "spawn", "first worker spawn")
        wrap(DeploymentPool, "run_init", "init.py")
        wrap(App, "activate", "activate")
        wrap(Deployments, "get", "db: activate")
        wrap(Deployments, "activate", "db: activate")
        wrap(Runtime, "went_live", "retire previous version")
        try:
            yield
        finally:
            for owner, attr, original in reversed(patches):
                setattr(owner, attr, original)

    def deploy(self, app: App, directory: Path) -> None:
        self.current = {}
        t0 = time.perf_counter_ns()
        app.deploy(directory)
        total = since_ms(t0)
        c = self.current
        # Leaves only, so that they add up: nested steps are subtracted from their parent.
        c["lock checks (policy_for)"] = c.pop("policy_for", 0.0) - c.get("ensure_environment", 0)
        booting = ("compile (WorkerPool.prepare)", "template boot", "first worker spawn", "init.py")
        c["rest of prepare"] = c.pop("prepare", 0.0) - sum(c.get(k, 0.0) for k in booting)
        going_live = ("db: activate", "retire previous version")
        c["rest of activate"] = c.pop("activate", 0.0) - sum(c.get(k, 0.0) for k in going_live)
        c["other"] = total - sum(c.values())
        c["total"] = total
        self.deploys.append(c)

    def summary(self) -> dict[str, dict[str, float]]:
        labels = [k for k in self.deploys[0] if k != "total"] if self.deploys else []
        totals = [d["total"] for d in self.deploys]
        mean_total = sum(totals) / len(totals) if totals else float("nan")
        out: dict[str, dict[str, float]] = {}
        for label in sorted(labels, key=lambda k: -sum(d.get(k, 0.0) for d in self.deploys)):
            s = summarize([d.get(label, 0.0) for d in self.deploys])
            out[label] = {"p50_ms": s["p50"], "mean_ms": s["mean"], "share": s["mean"] / mean_total}
        s = summarize(totals)
        out["total"] = {"p50_ms": s["p50"], "mean_ms": s["mean"], "share": 1.0}
        return out


# ---- the benchmark ------------------------------------------------------------------------


@dataclass
class Samples:
    deploy: list[float] = field(default_factory=list)
    deploy_before_start: list[float] = field(default_factory=list)
    deploy_transactions: list[int] = field(default_factory=list)
    first_invoke: list[float] = field(default_factory=list)
    first_invoke_pool: list[float] = field(default_factory=list)
    warm_invoke: list[float] = field(default_factory=list)
    warm_invoke_pool: list[float] = field(default_factory=list)
    plain_deploy: list[float] = field(default_factory=list)
    plain_transactions: list[int] = field(default_factory=list)
    spawn: list[float] = field(default_factory=list)
    spawn_plain: list[float] = field(default_factory=list)
    cold_invoke: list[float] = field(default_factory=list)
    cold_prespawned: list[float] = field(default_factory=list)
    fresh: list[float] = field(default_factory=list)
    bare: list[float] = field(default_factory=list)


class Bench:
    def __init__(self, rt: Runtime, tmp: Path, signer: Signer, lock: str, quiet: bool) -> None:
        self.rt = rt
        self.quiet = quiet
        self.token = signer.token(USERNAME, TOKEN_LIFETIME_S)
        self.jwt = Project(
            write_project(tmp / "jwt", JWT_INIT, JWT_HANDLER, requirements=REQUIREMENTS,
                          lock=lock),
            JWT_HANDLER,
        )  # fmt: skip
        self.plain = Project(write_project(tmp / "plain", PLAIN_INIT, PLAIN_HANDLER), PLAIN_HANDLER)
        one = "[runtime]\nmax_invocations = 1\n"
        self.cold = write_project(
            tmp / "cold", JWT_INIT, JWT_HANDLER, requirements=REQUIREMENTS, lock=lock,
            manifest=one,
        )  # fmt: skip
        self.cold_plain = write_project(tmp / "cold-plain", PLAIN_INIT, PLAIN_HANDLER, manifest=one)
        self.jwt_app = rt.create_app("jwt")
        self.plain_app = rt.create_app("plain")
        self.cold_app = rt.create_app("cold")
        self.cold_plain_app = rt.create_app("cold-plain")
        for app in (self.jwt_app, self.cold_app):
            app.secrets.set(SECRET, signer.public_pem)
        for app in (self.plain_app, self.cold_plain_app):
            app.secrets.set("DEMO_PASSWORD", PASSWORD)
        self.samples = Samples()
        self.transactions = 0
        lock_ = threading.Lock()

        def on_begin(_connection: Any) -> None:
            with lock_:
                self.transactions += 1

        event.listen(rt.db.engine, "begin", on_begin)

    # -- one operation each -----------------------------------------------------------------

    def invoke(self, app: App, token: str | None = None) -> Invocation:
        if app in (self.plain_app, self.cold_plain_app):
            auth = {"password": PASSWORD}
        else:
            auth = {"token": token or self.token}
        return app.invoke(EVENT, {"username": USERNAME, "auth_params": auth})

    def invoke_ok(self, app: App, pool_ms: list[float] | None = None) -> float:
        """Time one invocation that must succeed; ``pool_ms`` gets the pool's own duration
        (acquire, the worker's part and its host calls: no app state, no invocation log)."""
        t0 = time.perf_counter_ns()
        invocation = self.invoke(app)
        took = since_ms(t0)
        if not invocation.succeeded or invocation.result not in (
            {"sub": USERNAME},
            {"welcome": USERNAME},
        ):
            raise RuntimeError(f"invocation failed: {invocation.error} {invocation.logs}")
        if pool_ms is not None:
            pool_ms.append(invocation.duration_ms)
        return took

    def first_deploy(self) -> dict[str, Any]:
        """The deploy that installs the environment, with its progress messages."""
        events: list[tuple[float, str]] = []
        t0 = time.perf_counter_ns()

        def progress(message: str, done: int | None, total: int | None) -> None:
            events.append((since_ms(t0), message))
            log(self.quiet, f"  first deploy: {message}" + (f" {done}/{total}" if total else ""))

        info = self.jwt_app.deploy(self.jwt.next_build(), progress=progress)
        took = since_ms(t0)
        first_invoke = self.invoke_ok(self.jwt_app)
        starting = next((t for t, m in events if m == "starting"), took)
        install_start = events[0][0] if events else 0.0
        return {
            "first_deploy_ms": took,
            "first_deploy_install_ms": starting - install_start,
            "first_deploy_after_install_ms": took - starting,
            "first_deploy_progress": [{"at_ms": t, "message": m} for t, m in events],
            "first_deploy_version": info.version,
            "first_deploy_first_invoke_ms": first_invoke,
        }

    def check_handler(self) -> None:
        """The handler really verifies: a token with a changed signature is rejected."""
        head, claims, signature = self.token.split(".")
        flipped = ("A" if signature[0] != "A" else "B") + signature[1:]
        bad = self.invoke(self.jwt_app, f"{head}.{claims}.{flipped}")
        if bad.error is None or bad.error.code != "access_denied":
            raise RuntimeError(f"a forged token was not rejected: {bad.status} {bad.error}")
        self.invoke_ok(self.jwt_app)

    def deploy_jwt(self, warm: int) -> None:
        s = self.samples
        marks: list[float] = []
        tx0 = self.transactions
        t0 = time.perf_counter_ns()

        def progress(message: str, _done: int | None, _total: int | None) -> None:
            if message == "starting":
                marks.append(since_ms(t0))

        self.jwt_app.deploy(self.jwt.next_build(), progress=progress)
        took = since_ms(t0)
        s.deploy_transactions.append(self.transactions - tx0)
        s.deploy.append(took)
        s.deploy_before_start.append(marks[0] if marks else float("nan"))
        s.first_invoke.append(self.invoke_ok(self.jwt_app, s.first_invoke_pool))
        for _ in range(warm):
            s.warm_invoke.append(self.invoke_ok(self.jwt_app, s.warm_invoke_pool))

    def deploy_plain(self) -> None:
        tx0 = self.transactions
        t0 = time.perf_counter_ns()
        self.plain_app.deploy(self.plain.next_build())
        self.samples.plain_deploy.append(since_ms(t0))
        self.samples.plain_transactions.append(self.transactions - tx0)

    def pool_of(self, app: App) -> DeploymentPool:
        version = app.state(fresh=True).version
        pool = self.rt.pool.pools().get((app.name, version or 0))
        if pool is None:
            raise RuntimeError(f"the pool of {app.name} is not running")
        return pool

    def cold_block(self, count: int) -> None:
        """Invocations that each need a new worker (max_invocations = 1), back to back."""
        s = self.samples
        pool = self.pool_of(self.cold_app)
        pool.spawn_ms.clear()  # from here on: this block's spawns only
        for _ in range(count):
            prespawned = pool.stats()["idle"] > 0
            took = self.invoke_ok(self.cold_app)
            (s.cold_prespawned if prespawned else s.cold_invoke).append(took)
        s.spawn.extend(pool.spawn_ms)

    def cold_plain_block(self, count: int) -> None:
        """The same without dependencies: the template has no jwt to carry into the fork."""
        pool = self.pool_of(self.cold_plain_app)
        pool.spawn_ms.clear()
        for _ in range(count):
            self.invoke_ok(self.cold_plain_app)
        self.samples.spawn_plain.extend(pool.spawn_ms)

    # -- the run ----------------------------------------------------------------------------

    def setup(self, it: Iterations) -> tuple[dict[str, Any], str]:
        log(self.quiet, "first deploy: installs the environment")
        first = self.first_deploy()
        self.check_handler()
        self.plain_app.deploy(self.plain.next_build())
        self.cold_app.deploy(self.cold)
        self.cold_plain_app.deploy(self.cold_plain)
        environment = self.rt.deployment(self.jwt_app, first["first_deploy_version"])
        env_path = environment.policy.module_paths[0]
        log(self.quiet, "warm-up")
        for _ in range(it.warmup):
            self.deploy_jwt(1)
            self.deploy_plain()
            self.invoke_ok(self.cold_app)
            self.invoke_ok(self.cold_plain_app)
            ready_ms(FRESH_IMPORT, env_path)
            ready_ms(BARE)
        self.samples = Samples()
        return first, env_path

    def interleaved(self, it: Iterations, env_path: str) -> None:
        kinds: dict[str, tuple[Callable[[], Any], int]] = {
            "deploy": (lambda: self.deploy_jwt(it.warm_per_deploy), it.deploys),
            "plain": (self.deploy_plain, it.plain_deploys),
            "fresh": (lambda: self.samples.fresh.append(ready_ms(FRESH_IMPORT, env_path)),
                      it.fresh),
            "bare": (lambda: self.samples.bare.append(ready_ms(BARE)), it.bare),
        }  # fmt: skip
        for block in range(BLOCKS):
            log(self.quiet, f"block {block + 1}/{BLOCKS}")
            for fn, total in kinds.values():
                gc.collect()
                for _ in range(max(1, total // BLOCKS)):
                    fn()
            gc.collect()
            self.cold_block(max(1, it.cold // BLOCKS))
            gc.collect()
            self.cold_plain_block(max(1, it.cold // BLOCKS))

    def phases(self, it: Iterations) -> dict[str, dict[str, float]]:
        log(self.quiet, f"phases: {it.phases} instrumented deploys")
        phases = Phases()
        with phases.installed():
            for _ in range(it.phases):
                gc.collect()
                phases.deploy(self.jwt_app, self.jwt.next_build())
                self.invoke_ok(self.jwt_app)
        return phases.summary()


def results_of(s: Samples, first: Mapping[str, Any]) -> dict[str, Any]:
    r: dict[str, Any] = dict(first)
    for kind in ("deploy", "plain_deploy", "first_invoke", "warm_invoke", "spawn",
                 "cold_invoke", "fresh", "bare", "deploy_before_start", "first_invoke_pool",
                 "warm_invoke_pool", "spawn_plain"):  # fmt: skip
        values: list[float] = getattr(s, kind)
        for stat, value in summarize(values).items():
            r[f"{kind}_{stat}_ms"] = value
        r[f"{kind}_count"] = len(values)
    r["cold_prespawned_p50_ms"] = summarize(s.cold_prespawned)["p50"]
    r["cold_prespawned_count"] = len(s.cold_prespawned)
    r["deploy_transactions"] = sum(s.deploy_transactions) / max(1, len(s.deploy_transactions))
    r["plain_deploy_transactions"] = sum(s.plain_transactions) / max(1, len(s.plain_transactions))
    r["deploy_vs_plain"] = r["deploy_p50_ms"] / r["plain_deploy_p50_ms"]
    r["deploy_minus_plain_ms"] = r["deploy_p50_ms"] - r["plain_deploy_p50_ms"]
    r["first_deploy_vs_cached"] = r["first_deploy_ms"] / r["deploy_p50_ms"]
    r["first_vs_warm_invoke"] = r["first_invoke_p50_ms"] / r["warm_invoke_p50_ms"]
    r["fresh_vs_spawn"] = r["fresh_p50_ms"] / r["spawn_p50_ms"]
    r["spawn_vs_plain"] = r["spawn_p50_ms"] / r["spawn_plain_p50_ms"]
    r["cold_vs_warm_invoke"] = r["cold_invoke_p50_ms"] / r["warm_invoke_p50_ms"]
    return r


def targets(r: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    def check(value: float, limit: float) -> dict[str, Any]:
        return {"value": value, "target": limit, "ok": value <= limit}

    return {
        "deploy_p50_ms": check(r["deploy_p50_ms"], TARGET_DEPLOY_MS),
        "deploy_max_ms": check(r["deploy_max_ms"], TARGET_DEPLOY_MS),
        "spawn_p50_ms": check(r["spawn_p50_ms"], TARGET_SPAWN_MS),
    }


def machine(load_before: float, lock: str) -> dict[str, Any]:
    return {
        **machine_basics(),
        "euid": os.geteuid(),
        "sqlite": sqlite3.sqlite_version,
        "sqlalchemy": sqlalchemy.__version__,
        "openssl": openssl("version").decode().strip(),
        "locked": {p.name: p.version for p in parse_lock(lock)},
        "loadavg_1m_before": load_before,
        "loadavg_1m_after": os.getloadavg()[0],
    }


def run(it: Iterations, *, quick: bool, quiet: bool) -> dict[str, Any]:
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="chatfn-deploy-bench-") as name:
        tmp = Path(name)
        log(quiet, f"resolving {REQUIREMENTS.strip()} (once; every deploy then has the lock)")
        t0 = time.perf_counter_ns()
        lock = resolve(REQUIREMENTS)
        resolve_ms = since_ms(t0)
        signer = Signer.create(tmp)
        with Runtime(f"sqlite:///{tmp}/bench.db", envs_dir=tmp / "envs") as rt:
            bench = Bench(rt, tmp, signer, lock, quiet)
            first, env_path = bench.setup(it)
            bench.interleaved(it, env_path)
            phases = bench.phases(it)
    results = results_of(bench.samples, first)
    results["resolve_ms"] = resolve_ms
    results["phases"] = phases
    results["targets"] = targets(results)
    results["machine"] = machine(load_before, lock)
    results["iterations"] = asdict(it)
    results["quick"] = quick
    results["elapsed_s"] = time.perf_counter() - started
    return results


# ---- report -------------------------------------------------------------------------------


def markdown(r: Mapping[str, Any]) -> str:
    m, t = r["machine"], r["targets"]

    def verdict(key: str) -> str:
        return "yes" if t[key]["ok"] else "**no**"

    def dist(kind: str, digits: int = 1) -> str:
        return (
            f"{fmt(r[f'{kind}_p50_ms'], digits)} / {fmt(r[f'{kind}_p90_ms'], digits)} / "
            f"{fmt(r[f'{kind}_max_ms'], digits)} ms"
        )

    locked = ", ".join(f"{k} {v}" for k, v in m["locked"].items())
    lines = [
        f"Deploy benchmark: {m['cpu_count']} CPUs ({m['cpu_model']}), Python {m['python']}, "
        f"kernel {m['kernel']}, euid {m['euid']}, SQLite {m['sqlite']}; locked: {locked}; "
        f"load average {fmt(m['loadavg_1m_before'], 2)} -> {fmt(m['loadavg_1m_after'], 2)}"
        f"{' (quick)' if r['quick'] else ''}",
        "",
        "| metric | p50 / p90 / max | target | met | n |",
        "|---|---|---|---|---|",
        f"| deploy, cached lock, environment installed | {dist('deploy')} "
        f"| p50 and max <= {fmt(TARGET_DEPLOY_MS, 0)} ms "
        f"| {verdict('deploy_p50_ms')} / {verdict('deploy_max_ms')} | {r['deploy_count']} |",
        f"| deploy, no dependencies | {dist('plain_deploy')} | | | {r['plain_deploy_count']} |",
        f"| first deploy (installs the environment) | {fmt(r['first_deploy_ms'])} ms | | | 1 |",
        f"| first invoke after a deploy (jwt verify) | {dist('first_invoke')} | | "
        f"| {r['first_invoke_count']} |",
        f"| warm invoke (same worker) | {dist('warm_invoke')} | | | {r['warm_invoke_count']} |",
        f"| worker spawn, jwt preloaded (fork to ready) | {dist('spawn', 2)} "
        f"| p50 <= {fmt(TARGET_SPAWN_MS, 0)} ms | {verdict('spawn_p50_ms')} "
        f"| {r['spawn_count']} |",
        f"| fresh `python -I` importing jwt + cryptography, to ready | {dist('fresh')} | | "
        f"| {r['fresh_count']} |",
        f"| cold invoke: new worker (spawn + init.py + handler) | {dist('cold_invoke')} | | "
        f"| {r['cold_invoke_count']} |",
        "",
        "| comparison (p50, same run) | value |",
        "|---|---|",
    ]
    rows = [
        (
            "cached deploy / no-dependency deploy",
            f"{fmt(r['deploy_vs_plain'], 2)}x (+{fmt(r['deploy_minus_plain_ms'])} ms)",
        ),
        (
            "first deploy: install / rest (compile, boot, init, activate)",
            f"{fmt(r['first_deploy_install_ms'])} / {fmt(r['first_deploy_after_install_ms'])} ms",
        ),
        ("first deploy / cached deploy", f"{fmt(r['first_deploy_vs_cached'], 1)}x"),
        ("resolving requirements.in (once, before the run)", f"{fmt(r['resolve_ms'])} ms"),
        (
            "cached deploy: before 'starting' (compile, lock, environment) p50",
            f"{fmt(r['deploy_before_start_p50_ms'])} ms",
        ),
        (
            "database transactions per deploy: jwt / no dependencies",
            f"{fmt(r['deploy_transactions'])} / {fmt(r['plain_deploy_transactions'])}",
        ),
        ("first invoke / warm invoke", f"{fmt(r['first_vs_warm_invoke'], 2)}x"),
        (
            "first / warm invoke, pool part only (worker + host calls)",
            f"{fmt(r['first_invoke_pool_p50_ms'], 2)} / {fmt(r['warm_invoke_pool_p50_ms'], 2)} ms",
        ),
        ("fresh interpreter / zygote spawn", f"{fmt(r['fresh_vs_spawn'], 1)}x"),
        (
            "zygote spawn without dependencies (same method) p50",
            f"{fmt(r['spawn_plain_p50_ms'], 2)} ms (jwt / none {fmt(r['spawn_vs_plain'], 2)}x, "
            f"n {r['spawn_plain_count']})",
        ),
        ("bare `python -I` to ready", f"{fmt(r['bare_p50_ms'])} ms"),
        ("cold invoke / warm invoke", f"{fmt(r['cold_vs_warm_invoke'], 1)}x"),
        (
            "new worker the janitor had spawned already (init.py + handler)",
            f"{fmt(r['cold_prespawned_p50_ms'])} ms (n {r['cold_prespawned_count']})",
        ),
        ("first deploy's first invoke", f"{fmt(r['first_deploy_first_invoke_ms'])} ms"),
        ("iterations", ", ".join(f"{k} {v}" for k, v in r["iterations"].items())),
        ("run time", f"{fmt(r['elapsed_s'])} s"),
    ]
    lines += [f"| {a} | {b} |" for a, b in rows]
    lines += [
        "",
        f"Where a cached deploy's time goes ({r['iterations']['phases']} instrumented deploys; "
        "means add up to the total):",
        "",
        "| step | p50 | mean | share |",
        "|---|---|---|---|",
    ]
    for label, p in r["phases"].items():
        lines.append(
            f"| {label} | {fmt(p['p50_ms'], 2)} ms | {fmt(p['mean_ms'], 2)} ms "
            f"| {fmt(p['share'] * 100, 0)}% |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parser(__doc__).parse_args(argv)
    it = Iterations.quick() if args.quick else Iterations.full()
    results = run(it, quick=args.quick, quiet=args.quiet)
    return emit(results, args.json, markdown)


if __name__ == "__main__":
    sys.exit(main())
