"""The worker pool: host calls, deadlines, crashes, saturation, recycling, concurrency."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from sandbox import Deployment, Limits, Policy, WorkerPool
from sandbox.errors import UserExists
from sandbox.policy import LAYERS

OK = "def handle_event(event, context):\n    return 'ok'\n"

HOST_CALL = """
def handle_event(event, context):
    exists = context.users.check_user_exists(event.username)
    if not exists:
        try:
            context.users.create_user(event.username, display_name="New")
        except UserExistsError:
            return "raced"
        return "created"
    return "existed"
"""

COUNTER = """
calls = []

def handle_event(event, context):
    calls.append(1)
    return len(calls)
"""

SLEEPY = """
import time

def handle_event(event, context):
    time.sleep(event.seconds)
    return "slept"
"""

_versions = iter(range(1, 10_000))


def deploy(files: dict[str, str], **limits: Any) -> Deployment:
    return Deployment("test", next(_versions), {"ok.py": OK, **files}, Limits(**limits))


def test_host_call_is_answered_while_the_invocation_is_in_flight(pool: WorkerPool) -> None:
    users: dict[str, dict[str, Any]] = {}

    def create_user(name: str, display_name: str | None = None, **_: Any) -> dict[str, Any]:
        users[name] = {"name": name, "display_name": display_name}
        return users[name]

    caps: dict[str, Callable[..., Any]] = {
        "users.check_user_exists": lambda n: n in users,
        "users.create_user": create_user,
    }
    d = deploy({"h.py": HOST_CALL})
    first = pool.invoke(d, "h", {"username": "ann"}, capabilities=caps)
    second = pool.invoke(d, "h", {"username": "ann"}, capabilities=caps)
    assert (first.value, second.value) == ("created", "existed")
    assert users["ann"]["display_name"] == "New"


def test_host_call_errors_reach_the_handler_as_its_exception(pool: WorkerPool) -> None:
    def create_user(name: str, **_: Any) -> None:
        raise UserExists(f"user {name!r} already exists")

    caps: dict[str, Callable[..., Any]] = {
        "users.check_user_exists": lambda n: False,
        "users.create_user": create_user,
    }
    result = pool.invoke(deploy({"h.py": HOST_CALL}), "h", {"username": "x"}, capabilities=caps)
    assert result.value == "raced"


def test_unknown_host_call_fails_the_invocation_not_the_worker(pool: WorkerPool) -> None:
    d = deploy({"h.py": HOST_CALL})
    result = pool.invoke(d, "h", {"username": "x"}, capabilities={})
    assert result.error is not None and result.error.code == "function_error"
    assert "unknown host call" in result.error.message
    assert pool.invoke(d, "ok", {}).value == "ok"


def test_secrets_and_context_attributes(pool: WorkerPool) -> None:
    src = """
def handle_event(event, context):
    return [context.app, context.invocation_id, context.secrets["API_KEY"],
            sorted(context.secrets), 0 < context.remaining_time_ms() <= 2000]
"""
    result = pool.invoke(
        deploy({"h.py": src}, timeout_ms=2000),
        "h",
        {},
        capabilities={"secrets.all": lambda: {"API_KEY": "k1", "OTHER": "k2"}},
        invocation_id="inv-1",
    )
    assert result.value == ["test", "inv-1", "k1", ["API_KEY", "OTHER"], True]


def test_init_globals_are_visible_to_handlers(pool: WorkerPool) -> None:
    d = deploy(
        {"init.py": "GREETING = 'hi'\n", "h.py": "def handle_event(e, c):\n    return GREETING\n"}
    )
    assert pool.invoke(d, "h", {}).value == "hi"


def test_event_is_read_only(pool: WorkerPool) -> None:
    src = "def handle_event(event, context):\n    event.username = 'mallory'\n"
    result = pool.invoke(deploy({"h.py": src}), "h", {"username": "bob"})
    assert result.error is not None and result.error.code == "function_error"
    assert "read-only" in result.error.message


def test_session_rejected_message_and_user_traceback(pool: WorkerPool) -> None:
    src = (
        "def handle_event(event, context):\n    x = 1\n    raise SessionRejected('bad password')\n"
    )
    bad = (
        "def helper():\n    return {}['missing']\n\n"
        "def handle_event(event, context):\n    return helper()\n"
    )
    d = deploy({"h.py": src, "bad.py": bad})
    rejected = pool.invoke(d, "h", {})
    assert rejected.error is not None
    assert (rejected.error.code, rejected.error.message) == ("access_denied", "bad password")
    failed = pool.invoke(d, "bad", {})
    assert failed.error is not None and failed.error.code == "function_error"
    detail = failed.error.detail or ""
    assert 'File "bad.py", line 5, in handle_event' in detail
    assert 'File "bad.py", line 2, in helper' in detail
    assert "sandbox" not in detail and "/work" not in detail
    assert "KeyError" in failed.logs


def test_logs_are_kept_even_when_the_invocation_times_out(pool: WorkerPool) -> None:
    src = (
        "def handle_event(event, context):\n"
        "    print('before the loop')\n    while True:\n        pass\n"
    )
    result = pool.invoke(deploy({"h.py": src}, timeout_ms=300), "h", {})
    assert result.error is not None and result.error.code == "timeout"
    assert result.logs == "before the loop\n"


def test_timeout_kills_the_worker_and_the_next_invocation_succeeds(pool: WorkerPool) -> None:
    src = "def handle_event(event, context):\n    while True:\n        pass\n"
    d = deploy({"h.py": src}, timeout_ms=500)
    started = time.monotonic()
    result = pool.invoke(d, "h", {})
    elapsed_ms = (time.monotonic() - started) * 1000
    assert result.error is not None and result.error.code == "timeout"
    assert 500 <= elapsed_ms <= 500 + 250
    assert pool.invoke(d, "ok", {}).value == "ok"


@pytest.mark.parametrize(
    ("call", "expected"),
    [("crashy.exit_now(3)", "exited unexpectedly (status 3)"), ("crashy.segfault()", "SIGSEGV")],
)
def test_crashed_worker_fails_one_invocation_and_is_replaced(
    pool: WorkerPool, dependency_dir: Path, call: str, expected: str
) -> None:
    policy = Policy().with_modules(["crashy"], paths=[str(dependency_dir)])
    src = f"import crashy\n\ndef handle_event(event, context):\n    {call}\n"
    d = Deployment("test", next(_versions), {"h.py": src, "ok.py": OK}, Limits(), policy)
    result = pool.invoke(d, "h", {})
    assert result.error is not None and result.error.code == "worker_crashed"
    assert expected in result.error.message
    assert pool.invoke(d, "ok", {}).value == "ok"


def test_full_pool_and_queue_answer_overloaded_fast(pool: WorkerPool) -> None:
    d = deploy({"h.py": SLEEPY}, max_workers=1, max_queue=0)
    pool.prepare(d)
    with ThreadPoolExecutor(1) as executor:
        busy = executor.submit(pool.invoke, d, "h", {"seconds": 0.6})
        time.sleep(0.15)
        started = time.monotonic()
        result = pool.invoke(d, "h", {"seconds": 0})
        assert (time.monotonic() - started) < 0.1
        assert result.error is not None and result.error.code == "overloaded"
        assert busy.result().value == "slept"


def test_queued_invocations_wait_for_a_free_worker(pool: WorkerPool) -> None:
    d = deploy({"h.py": SLEEPY}, max_workers=1, max_queue=4)
    with ThreadPoolExecutor(3) as executor:
        futures = [executor.submit(pool.invoke, d, "h", {"seconds": 0.1}) for _ in range(3)]
        assert [f.result().value for f in futures] == ["slept"] * 3


def test_workers_are_recycled_after_max_invocations(pool: WorkerPool) -> None:
    d = deploy({"h.py": COUNTER}, max_invocations=3)
    values = [pool.invoke(d, "h", {}).value for _ in range(7)]
    assert values == [1, 2, 3, 1, 2, 3, 1]


def test_idle_workers_are_reaped(pool: WorkerPool) -> None:
    d = deploy({"h.py": COUNTER}, idle_timeout_s=0.2)
    assert pool.invoke(d, "h", {}).value == 1
    dp = pool.pools()[d.key]
    deadline = time.monotonic() + 5
    while dp.stats()["workers"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert dp.stats()["workers"] == 0
    assert pool.invoke(d, "h", {}).value == 1  # a fresh worker: module state starts over


def test_concurrent_invocations_with_host_calls(pool: WorkerPool) -> None:
    src = "def handle_event(event, context):\n    return context.users.get_user(event.username)\n"
    d = deploy({"h.py": src}, max_workers=3, max_queue=100)
    caps = {"users.get_user": lambda name: {"name": name}}
    seen_threads: set[int] = set()

    def one(i: int) -> Any:
        seen_threads.add(threading.get_ident())
        return pool.invoke(d, "h", {"username": f"u{i}"}, capabilities=caps).value

    with ThreadPoolExecutor(8) as executor:
        values = list(executor.map(one, range(200)))
    assert values == [{"name": f"u{i}"} for i in range(200)]
    assert pool.pools()[d.key].stats()["workers"] <= 3


def test_isolation_of_the_worker_process(pool: WorkerPool, dependency_dir: Path) -> None:
    """OS-level facts, observed from inside by a dependency (unrestricted Python)."""
    policy = Policy().with_modules(["probe"], paths=[str(dependency_dir)])
    src = (
        "import probe\n\n"
        "def handle_event(event, context):\n    return getattr(probe, event.what)(*event.args)\n"
    )
    d = Deployment("test", next(_versions), {"h.py": src}, Limits(file_size_mb=1), policy)

    def probe(what: str, *args: Any) -> Any:
        result = pool.invoke(d, "h", {"what": what, "args": list(args)})
        assert result.ok, result.error
        return result.value

    assert probe("environment") == {}
    identity = probe("identity")
    assert identity["cwd_entries"] == []
    assert identity["cwd"].startswith(pool.tmp_root)
    assert probe("try_fork").startswith("refused")
    assert probe("limits")["RLIMIT_NPROC"] == [0, 0]
    assert probe("limits")["RLIMIT_CORE"] == [0, 0]
    secret_file = Path(pool.tmp_root).parent / f"chatfn-test-db-{os.getpid()}"
    secret_file.write_text("host database")
    secret_file.chmod(0o600)
    try:
        if os.geteuid() == 0:
            assert identity["uid"] == 65534 and identity["groups"] == []
            assert probe("try_read", str(secret_file)).startswith("refused")
            assert probe("try_read", "/proc/1/environ").startswith("refused")
            assert probe("try_connect", 22).startswith("refused")
            isolation = pool.pools()[d.key].stats()["isolation"]
            assert set(isolation) == set(LAYERS)
            assert isolation["network_namespace"] and isolation["uid"]
    finally:
        secret_file.unlink()
    too_big = pool.invoke(d, "h", {"what": "write_bytes", "args": [2 * 1024 * 1024]})
    assert too_big.error is not None and too_big.error.code == "resource_limit"


def test_memory_limit_is_per_worker(pool: WorkerPool) -> None:
    src = "def handle_event(event, context):\n    return len(bytearray(event.mb * 1024 * 1024))\n"
    d = deploy({"h.py": src}, memory_mb=64)
    assert pool.invoke(d, "h", {"mb": 16}).value == 16 * 1024 * 1024
    result = pool.invoke(d, "h", {"mb": 128})
    assert result.error is not None and result.error.code == "resource_limit"
    assert pool.invoke(d, "h", {"mb": 16}).ok


def test_oversized_event_is_an_invalid_request(pool: WorkerPool) -> None:
    d = deploy({}, max_frame_bytes=4096)
    result = pool.invoke(d, "ok", {"blob": "x" * 10_000})
    assert result.error is not None and result.error.code == "invalid_request"


def test_unknown_handler_is_not_deployed(pool: WorkerPool) -> None:
    result = pool.invoke(deploy({}), "user_ended_session", {})
    assert result.error is not None and result.error.code == "not_deployed"


def test_a_deployment_that_does_not_compile_is_rejected_with_file_and_line(
    pool: WorkerPool,
) -> None:
    d = deploy({"h.py": "def handle_event(event, context):\n    return event._secret\n"})
    result = pool.invoke(d, "h", {})
    assert result.error is not None and result.error.code == "deploy_rejected"
    assert "h.py:2" in result.error.message


def test_the_host_only_trusts_worker_handles_of_the_templates_own_children(
    pool: WorkerPool,
) -> None:
    """The template runs dependency code, so a pidfd it sends is checked before the host
    (as root) would ever signal through it."""
    zygote = pool.prepare(deploy({})).zygote
    worker = zygote.spawn()
    try:
        assert zygote._is_own_child(worker.pidfd, worker.pid)
        assert not zygote._is_own_child(worker.pidfd, os.getpid())
        own = os.pidfd_open(os.getpid())
        try:
            assert not zygote._is_own_child(own, os.getpid())
        finally:
            os.close(own)
    finally:
        zygote.reap(worker)


def test_concurrent_prepares_of_one_deployment_boot_it_once(pool: WorkerPool) -> None:
    deployment = deploy({})
    barrier = threading.Barrier(8)

    def prepare() -> object:
        barrier.wait()
        return pool.prepare(deployment)

    with ThreadPoolExecutor(8) as executor:
        pools = list(executor.map(lambda _: prepare(), range(8)))
    assert len({id(p) for p in pools}) == 1
    assert pool.pools()[deployment.key] is pools[0]
