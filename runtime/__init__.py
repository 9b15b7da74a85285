"""chatfn's host side: users, sessions, apps, deployments, and the interfaces to them.

The embedding API: ``open_runtime`` (async) and ``open_runtime_sync`` (blocking).
"""

from runtime.embed import AsyncApp, AsyncRuntime, open_runtime, open_runtime_sync

__all__ = ["AsyncApp", "AsyncRuntime", "open_runtime", "open_runtime_sync"]
