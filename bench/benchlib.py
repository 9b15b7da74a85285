"""What every benchmark in bench/ shares: progress lines, percentiles, number formatting,
CPU counters, the machine description, and the command line (``--json``, ``--quick``,
``--quiet``)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any


def log(quiet: bool, message: str) -> None:
    if not quiet:
        print(f"[bench] {message}", file=sys.stderr, flush=True)


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), -(-len(sorted_values) * p // 100)))
    return sorted_values[int(rank) - 1]


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def since_ms(t0: int) -> float:
    return (time.perf_counter_ns() - t0) / 1e6


def self_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def machine_basics() -> dict[str, Any]:
    """CPU, interpreter and kernel; each benchmark adds what else its figures depend on."""
    model = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": sorted(os.sched_getaffinity(0)),
        "cpu_model": model,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "kernel": platform.release(),
    }


def parser(
    doc: str | None, quick_help: str = "about 10x fewer iterations"
) -> argparse.ArgumentParser:
    """The flags every benchmark takes: ``--json``, ``--quick``, ``--quiet``."""
    out = argparse.ArgumentParser(description=doc.splitlines()[0] if doc else None)
    out.add_argument("--json", action="store_true", help="print one JSON object")
    out.add_argument("--quick", action="store_true", help=quick_help)
    out.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return out


def emit(results: dict[str, Any], as_json: bool, markdown: Callable[[dict[str, Any]], str]) -> int:
    """Print the results: one JSON object, or the Markdown table."""
    print(json.dumps(results, indent=2) if as_json else markdown(results))
    return 0
