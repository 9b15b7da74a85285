"""The async embedding API: the same runtime, awaited from an event loop."""

from __future__ import annotations

import asyncio
from pathlib import Path

from runtime import open_runtime, open_runtime_sync

EXAMPLE = Path(__file__).resolve().parents[1] / "fixtures" / "password_functions"


def test_async_sessions_end_to_end(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with open_runtime(f"sqlite:///{tmp_path}/a.db") as rt:
            app = await rt.ensure_app("default")
            assert (await app.deploy(EXAMPLE)).status == "active"
            await app.set_secret("DEMO_PASSWORD", "pw")
            assert [s["name"] for s in await app.secret_names()] == ["DEMO_PASSWORD"]
            wrong = await app.start_session("ann", {"password": "no"})
            assert wrong.failed and wrong.error is not None
            assert wrong.error.code == "access_denied"
            results = await asyncio.gather(
                *(app.start_session(f"user{i}", {"password": "pw"}) for i in range(12))
            )
            assert all(r.succeeded for r in results), [r.error for r in results]
            assert await app.users.check_user_exists("user3")
            first = results[0].session
            assert first is not None
            ended = await app.end_session(first["id"])
            assert ended["end_reason"] == "ended"
            assert len(await app.sessions()) == 11
            await rt.drain()
            logs = await app.invocations(event="UserStartedSession", limit=100)
            assert len(logs) == 12 and all(i.succeeded for i in logs)
            inv = await app.invoke("UserStartedSession", {"user": {"name": "x"}, "session_id": "s"})
            assert inv.succeeded and inv.logs == "session s started for x\n"
            assert await app.settings() == {"guest_users": "enabled"}
            await app.update_settings(guest_users="disabled")
            assert (await rt.app("default")).name == "default"
            assert await rt.apps() == ["default"]

    asyncio.run(scenario())


def test_async_connection_and_guest_race(tmp_path: Path) -> None:
    async def scenario() -> None:
        rt = await open_runtime(f"sqlite:///{tmp_path}/b.db")
        try:
            app = await rt.create_app("guests")
            results = await asyncio.gather(*(app.start_session("same") for _ in range(10)))
            assert all(r.succeeded for r in results)
            assert len(await app.users.list_users()) == 1
            connection = app.connect()
            assert (await connection.start_session("conn")).succeeded
            second = await connection.start_session("conn")
            assert second.error is not None and second.error.code == "session_active"
            await connection.close()
            assert connection.session_id is None
        finally:
            await rt.close()

    asyncio.run(scenario())


def test_sync_use_is_the_same_api_without_await(tmp_path: Path) -> None:
    with open_runtime_sync(f"sqlite:///{tmp_path}/c.db") as rt:
        app = rt.ensure_app()
        result = app.start_session("plain")
        assert result.succeeded and result.session is not None
        assert result.session["user"]["is_guest"] is True
