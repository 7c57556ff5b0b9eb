"""Summarise a py-spy ``--format raw`` (collapsed stacks) profile of the worker.

``python -m bench.profile FILE [--top N]`` prints the CPU share of the leaf
frames by library, the top functions by self time, and the top
``queue_worker`` functions by inclusive time (a function is counted once per
sample however often it recurs in the stack). Percentages are of the samples
py-spy took, i.e. of the time the worker's thread was running Python (idle
waits in ``epoll`` are not sampled).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from dataclasses import dataclass

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]+)(?::(?P<line>\d+))?\)$")

LIBRARIES = (
    ("queue_worker/", "queue_worker"),
    ("aiohttp/", "aiohttp"),
    ("yarl/", "yarl"),
    ("multidict/", "multidict"),
    ("redis/", "redis-py"),
    ("structlog/", "structlog"),
    ("msgspec/", "msgspec"),
    ("asyncio/", "asyncio"),
    ("json/", "json"),
    ("logging/", "logging"),
)


def short_file(path: str) -> str:
    """A path shortened to its package: ``.../site-packages/aiohttp/x.py`` → ``aiohttp/x.py``."""
    for marker in ("site-packages/", "/lib/python3.", "/work/main/"):
        if marker in path:
            tail = path.split(marker, 1)[1]
            return tail.split("/", 1)[1] if marker == "/lib/python3." else tail
    return path


def label(frame: str) -> str:
    match = _FRAME.match(frame.strip())
    if match is None:
        return frame.strip()
    return f"{short_file(match['file'])}:{match['func']}"


def library(frame_label: str) -> str:
    for prefix, name in LIBRARIES:
        if frame_label.startswith(prefix) or f"/{prefix}" in frame_label:
            return name
    return "other (stdlib, C)"


@dataclass
class Profile:
    samples: int
    self_time: Counter[str]
    inclusive: Counter[str]
    by_library: Counter[str]


def load(path: str) -> Profile:
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    by_library: Counter[str] = Counter()
    samples = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            stack, _, count_text = line.rstrip("\n").rpartition(" ")
            if not stack or not count_text.isdigit():
                continue
            count = int(count_text)
            frames = [label(x) for x in stack.split(";") if x and not x.startswith("process ")]
            frames = [x for x in frames if not x.startswith("thread ")]
            if not frames:
                continue
            samples += count
            leaf = frames[-1]
            self_time[leaf] += count
            by_library[library(leaf)] += count
            for name in set(frames):
                inclusive[name] += count
    return Profile(samples, self_time, inclusive, by_library)


def report(profile: Profile, top: int = 20) -> str:
    n = max(profile.samples, 1)
    lines = [f"{profile.samples} samples (CPU-busy time of the worker's thread)"]
    lines.append("")
    lines.append("self time by library (leaf frame):")
    for name, count in profile.by_library.most_common():
        lines.append(f"  {100 * count / n:5.1f}%  {name}")
    lines.append("")
    lines.append(f"top {top} functions by self time:")
    for name, count in profile.self_time.most_common(top):
        lines.append(f"  {100 * count / n:5.1f}%  {name}")
    lines.append("")
    lines.append(f"top {top} queue_worker functions by inclusive time:")
    ours = [(k, v) for k, v in profile.inclusive.most_common() if k.startswith("queue_worker/")]
    for name, count in ours[:top]:
        lines.append(f"  {100 * count / n:5.1f}%  {name}")
    lines.append("")
    lines.append(f"top {top} library entry points by inclusive time:")
    interesting = ("aiohttp/", "redis/", "structlog/", "msgspec", "asyncio/")
    libs = [
        (k, v)
        for k, v in profile.inclusive.most_common()
        if k.startswith(interesting) and "base_events.py:run" not in k
    ]
    for name, count in libs[:top]:
        lines.append(f"  {100 * count / n:5.1f}%  {name}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("file", help="py-spy record --format raw output")
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args(argv)
    print(report(load(args.file), args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
