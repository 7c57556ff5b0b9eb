"""Small helpers shared by the benchmarks: /proc readings, percentiles, JSON lines, the
event stream read in pages.

psutil is not installed, so process figures come straight from ``/proc``.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

if TYPE_CHECKING:
    import redis.asyncio as aioredis

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
BENCH_CODE = (
    "import math\n"
    "def score(xs):\n"
    "    return sum(math.sqrt(x) for x in xs) / max(len(xs), 1)\n"
    "print(score(range(1000)))\n"
)  # a small, typical submission (~120 bytes); the simulated executors never run it


def proc_memory_kb(pid: int) -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` (peak RSS) of ``pid`` in kB; empty when it is gone."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    name, value = line.split(":", 1)
                    out[name] = int(value.split()[0])
    except (FileNotFoundError, ProcessLookupError):
        return {}
    return out


def proc_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds used by ``pid`` so far (``None`` when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name is in parentheses and may contain spaces: split after it.
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / CLOCK_TICKS


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from ``/proc/stat``."""
    with open("/proc/stat", encoding="ascii") as f:
        values = [int(x) for x in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    total = sum(values[:8])  # guest time is already in user
    return (total - idle) / CLOCK_TICKS, total / CLOCK_TICKS


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) by linear interpolation; ``None`` when empty."""
    if not values:
        return None
    ordered = sorted(values)
    if len(ordered) == 1:
        return float(ordered[0])
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (rank - low))


def p50_p99_ms(seconds: Sequence[float]) -> tuple[float | None, float | None]:
    """p50 and p99 of durations given in seconds, in milliseconds."""
    p50, p99 = percentile(seconds, 50), percentile(seconds, 99)
    return (None if p50 is None else p50 * 1000, None if p99 is None else p99 * 1000)


def emit(obj: Any) -> None:
    """Write one JSON line on stdout (the child → ``bench.run`` channel)."""
    sys.stdout.write(msgspec.json.encode(obj).decode() + "\n")
    sys.stdout.flush()


async def stream_pages(redis: aioredis.Redis, key: str, count: int) -> AsyncIterator[Any]:
    """The stream ``key`` from its start in ``XRANGE`` pages of ``count`` entries; the
    last page is the first one shorter than ``count`` (it may be empty)."""
    lower = "-"
    while True:
        raws = await redis.xrange(key, lower, "+", count=count)
        yield raws
        if len(raws) < count:
            return
        lower = "(" + raws[-1][0].decode()


@contextmanager
def log_dir(prefix: str, *, keep: bool) -> Iterator[Path]:
    """A fresh folder for the processes' logs: removed afterwards unless ``keep``."""
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield workdir
    finally:
        if keep:
            print(f"\nlogs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
