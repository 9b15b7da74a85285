"""chatfn's sandbox: compile, isolate and run untrusted chat-function handlers.

The worker process, with its OS limits, is the security boundary; RestrictedPython is a
filter in front of it. Host-side entry point: ``WorkerPool``.

The names below load on first use, so the template process (which imports
``sandbox.zygote``) never pulls in the host-side pool and its threading machinery.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sandbox.compiler import CompiledProject, SourceError, compile_project
    from sandbox.errors import ChatfnError
    from sandbox.policy import DEFAULT_LIMITS, DEFAULT_POLICY, Limits, Policy, PolicyError
    from sandbox.pool import Deployment, DeploymentPool, InvocationResult, WorkerPool, validate

_WHERE = {
    "CompiledProject": "sandbox.compiler",
    "SourceError": "sandbox.compiler",
    "compile_project": "sandbox.compiler",
    "ChatfnError": "sandbox.errors",
    "DEFAULT_LIMITS": "sandbox.policy",
    "DEFAULT_POLICY": "sandbox.policy",
    "Limits": "sandbox.policy",
    "Policy": "sandbox.policy",
    "PolicyError": "sandbox.policy",
    "Deployment": "sandbox.pool",
    "DeploymentPool": "sandbox.pool",
    "InvocationResult": "sandbox.pool",
    "WorkerPool": "sandbox.pool",
    "validate": "sandbox.pool",
}

__all__ = [
    "DEFAULT_LIMITS",
    "DEFAULT_POLICY",
    "ChatfnError",
    "CompiledProject",
    "Deployment",
    "DeploymentPool",
    "InvocationResult",
    "Limits",
    "Policy",
    "PolicyError",
    "SourceError",
    "WorkerPool",
    "compile_project",
    "validate",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'sandbox' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
