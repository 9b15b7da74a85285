"""chatfn's sandbox: compile, isolate and run untrusted chat-function handlers.

The worker process, with its OS limits, is the security boundary; RestrictedPython is a
filter in front of it. Host-side entry point: ``WorkerPool``.
"""

from sandbox.compiler import CompiledProject, SourceError, compile_project
from sandbox.errors import ChatfnError
from sandbox.policy import DEFAULT_LIMITS, DEFAULT_POLICY, Limits, Policy, PolicyError
from sandbox.pool import Deployment, DeploymentPool, InvocationResult, WorkerPool, validate

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
