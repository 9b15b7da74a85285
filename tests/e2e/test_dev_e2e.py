"""End to end: ``chatfn dev`` starts ``chatfn serve``, deploys a project, redeploys it on
every save (a broken save leaves the last good version live), and Ctrl-C stops both."""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from runtime.client import AdminClient, connect_sync

HANDLER = """\
def handle_event(event, context):
    return VERSION
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


class Output:
    """The lines a child prints, read on a thread, awaited with a timeout."""

    def __init__(self, stream: Iterator[str]) -> None:
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: Iterator[str]) -> None:
        for line in stream:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, prefix: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no line starting {prefix!r} in:\n" + "\n".join(self.lines)
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            assert line is not None, f"exited before {prefix!r}:\n" + "\n".join(self.lines)
            self.lines.append(line)
            if line.startswith(prefix):
                return line

    def rest(self) -> list[str]:
        self._thread.join(10)
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                return self.lines
            if line is not None:
                self.lines.append(line)


def test_dev_deploys_redeploys_on_save_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    root = tmp_path / "project"
    root.mkdir()
    (root / "user_attempted_start_session.py").write_text(HANDLER, encoding="utf-8")
    init = root / "init.py"
    init.write_text("VERSION = 1\n", encoding="utf-8")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATFN_")}
    env.update(CHATFN_DATA_DIR=str(tmp_path / "data"), PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "runtime.cli", "dev", str(root), "--port", str(port)]
    # Its own process group, so that a group SIGINT is what a terminal's Ctrl-C is.
    child = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    assert child.stdout is not None
    out = Output(child.stdout)
    try:
        line = out.wait_for("admin key for this server: export CHATFN_ADMIN_KEY=")
        key = line.rpartition("=")[2]
        out.wait_for("version 1 is live")
        url = f"http://127.0.0.1:{port}"
        with AdminClient(url, key) as admin:
            payload = {"username": "ada"}
            assert admin.invoke_hook("UserAttemptedStartSession", payload)["result"] == 1

            init.write_text("VERSION = (\n", encoding="utf-8")
            out.wait_for("changed: init.py; deploying")
            assert out.wait_for("init.py:1: ").startswith("init.py:1: SyntaxError")
            out.wait_for("version 2 failed; version 1 is live")

            init.write_text("VERSION = 3\n", encoding="utf-8")
            out.wait_for("version 3 is live")
            assert admin.invoke_hook("UserAttemptedStartSession", payload)["result"] == 3
            with connect_sync(url) as client:
                assert client.start_session("ada").succeeded

        os.killpg(child.pid, signal.SIGINT)
        assert child.wait(timeout=30) == 0, "\n".join(out.rest())
        assert "stopping" in out.rest()
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port)) != 0  # the server is gone too
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
        child.stdout.close()
    assert not any("Traceback" in line for line in out.rest())


def test_dev_reports_a_server_that_cannot_start(tmp_path: Path) -> None:
    (tmp_path / "user_started_session.py").write_text(HANDLER, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATFN_")}
    env.update(CHATFN_DATA_DIR=str(tmp_path / "data"), CHATFN_ADMIN_KEY="short")
    done = subprocess.run(
        [sys.executable, "-m", "runtime.cli", "dev", str(tmp_path), "--port", str(free_port())],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.splitlines()[-1] == "error: chatfn serve exited with code 2"
    assert "CHATFN_ADMIN_KEY must be at least 16 characters" in done.stderr
