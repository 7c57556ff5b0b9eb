"""The report of ``bench.run``: the table, the ratios, the targets, ``-v`` details, JSON."""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict
from pathlib import Path

import msgspec

from bench.profile import load as load_profile
from bench.profile import report as profile_report
from bench.results import Outcome, ReplayResult, Results, RunResult, TrickleCell, TrickleResult
from bench.scenarios import ROUTERS, SCENARIOS

COLUMNS = (
    "scenario",
    "N",
    "ours/s",
    "base/s",
    "ceil/s",
    "ours/base",
    "ours/ceil",
    "limit/s",
    "util",
    "ovh p50/p99 ms",
    "lag p50/p99 ms",
    "RSS MB",
    "RT/task",
    "cmds/task",
    "CPU ms/task",
)


def _f(value: float | None, digits: int = 0, suffix: str = "") -> str:
    if value is None:
        return "—"
    return f"{value:,.{digits}f}{suffix}"


def _rate(value: float | None) -> str:
    if value is None:
        return "—"
    return _f(value, 0 if value >= 100 else 1)


def _pair(a: float | None, b: float | None, digits: int = 1) -> str:
    if a is None and b is None:
        return "—"
    return f"{_f(a, digits)} / {_f(b, digits)}"


# --- the table ------------------------------------------------------------------


def _ours_columns(name: str, ours: RunResult | None) -> list[str]:
    """util … CPU ms/task: figures of our worker only."""
    if ours is None:
        return ["—"] * 7
    rss = "—"
    if ours.rss_peak_kb:
        rss = _f(ours.rss_peak_kb / 1024, 0)
        if name == "soak" and ours.rss_drift_pct is not None:
            rss += f" ({ours.rss_drift_pct:+.0f}%)"
    return [
        _f(100 * ours.utilisation, 0, "%") if ours.utilisation is not None else "—",
        _pair(ours.overhead_ms.get("p50"), ours.overhead_ms.get("p99")),
        _pair(*ours.lag_ms),
        rss,
        _f(ours.rt_per_task, 2),
        _f(ours.cmds_per_task, 1),
        _f(ours.cpu_ms_per_task, 2),
    ]


def _scenario_row(name: str, runs: dict[str, RunResult]) -> list[str]:
    ours, base, ceil = runs.get("ours"), runs.get("baseline"), runs.get("ceiling")
    o = ours.tasks_per_s if ours else None
    b = base.tasks_per_s if base else None
    c = ceil.tasks_per_s if ceil else None
    mark = "*" if ours and (ours.timed_out or ours.error) else ""
    return [
        name,
        str(ours.done if ours else (base.done if base else 0)),
        _rate(o) + mark,
        _rate(b),
        _rate(c),
        _f(o / b, 1, "x") if o and b else "—",
        _f(o / c, 2) if o and c else "—",
        _rate(SCENARIOS[name].limit()),
        *_ours_columns(name, ours),
    ]


def _replay_row(replay: ReplayResult) -> list[str]:
    rss = _f(replay.startup_rss_kb / 1024, 0) if replay.startup_rss_kb else "—"
    row = ["replay", f"{replay.events} ev", _f(replay.startup_events_per_s, 0) + " ev"]
    return row + ["—"] * 8 + [rss] + ["—"] * 3


def table_rows(results: Results, replay: ReplayResult | None) -> list[list[str]]:
    rows = [_scenario_row(name, runs) for name, runs in results.items()]
    if replay is not None:
        rows.append(_replay_row(replay))
    return rows


def format_table(rows: list[list[str]], columns: tuple[str, ...] = COLUMNS) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(columns)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(columns, widths, strict=True)) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = [
        "| "
        + " | ".join(
            c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        + " |"
        for r in rows
    ]
    return "\n".join([line, rule, *body])


# --- the targets ------------------------------------------------------------------


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("MET" if ok else "NOT MET")


def _ratio_targets(results: Results) -> list[str]:
    inst = results.get("instant", {})
    o, b, c = (inst.get(k) for k in ROUTERS)
    if not (o and c and b and c.tasks_per_s and b.tasks_per_s):
        return []
    rc, rb = o.tasks_per_s / c.tasks_per_s, o.tasks_per_s / b.tasks_per_s
    return [
        f"instant: ours/ceiling {rc:.2f} (>= 0.8) {_verdict(rc >= 0.8)}; "
        f"ours/baseline {rb:.1f}x (>= 5x) {_verdict(rb >= 5)}"
    ]


def _limit_targets(results: Results) -> list[str]:
    eb = results.get("executor-bound", {}).get("ours")
    limit = SCENARIOS["executor-bound"].limit()
    if not (eb and limit):
        return []
    share = eb.tasks_per_s / limit
    return [
        f"executor-bound: {eb.tasks_per_s:.1f}/s = {share:.2f} of {limit:.0f}/s "
        f"(>= 0.95) {_verdict(share >= 0.95)}"
    ]


def _lag_targets(results: Results) -> list[str]:
    out = []
    for name in ("instant", "soak"):
        r = results.get(name, {}).get("ours")
        if r and r.lag_ms[1] is not None:
            fast = r.tasks_per_s >= 500
            ok = (r.lag_ms[1] <= 50) if fast else None
            note = (
                ""
                if fast
                else f" (only {r.tasks_per_s:.0f} tasks/s: the >= 500/s condition is not reached)"
            )
            out.append(
                f"projector lag p99 {name}: {r.lag_ms[1]:.1f} ms at {r.tasks_per_s:.0f} tasks/s "
                f"(<= 50 ms at >= 500/s) {_verdict(ok)}{note}"
            )
    return out


def targets(results: Results, replay: ReplayResult | None) -> list[str]:
    out = _ratio_targets(results) + _limit_targets(results) + _lag_targets(results)
    if replay is not None and replay.startup_events_per_s is not None:
        ok = replay.startup_events_per_s >= 50_000
        out.append(
            f"replay at start-up: {replay.startup_events_per_s:,.0f} events/s "
            f"(>= 50,000) {_verdict(ok)}"
        )
    if replay is not None and replay.checkpoint_startup_seconds is not None:
        ok = replay.checkpoint_startup_seconds <= 1.0
        out.append(
            f"start-up from a checkpoint, {replay.events:,} entries: "
            f"{replay.checkpoint_startup_seconds:.3f} s (<= 1 s) {_verdict(ok)}"
        )
    soak = results.get("soak", {}).get("ours")
    if soak and soak.rss_drift_pct is not None:
        out.append(
            f"soak RSS from 20 % to 100 % of the tasks: {soak.rss_drift_pct:+.1f} % "
            f"(within +-10 %) {_verdict(abs(soak.rss_drift_pct) <= 10)}"
        )
    return out


# --- the trickle scenario ----------------------------------------------------------

TRICKLE_COLUMNS = (
    "rate",
    "strategy",
    "wake",
    "done/sent",
    "e2e p50/p95/p99 ms",
    "added p50/p95/p99 ms",
    "slot free: n, added p95",
    "exec p50/p95 ms",
    "on slow",
    "polls/s",
    "machine busy",
)
ADDED_P95_MAX_MS = 20.0  # with the wake-up
LEAST_LOADED_SHARE = 0.5  # least_loaded's e2e p95 at most this share of round_robin's


def _triple(q: dict[str, float | None], names: tuple[str, ...] = ("p50", "p95", "p99")) -> str:
    return " / ".join(_f(q.get(n), 1) for n in names)


def trickle_rows(t: TrickleResult) -> list[list[str]]:
    rows = []
    for c in t.cells:
        rows.append(
            [
                f"{c.rate:g}/s",
                c.strategy,
                "on" if c.wake else "off",
                f"{c.completed}/{c.sent}",
                _triple(c.e2e_ms),
                _triple(c.added_ms),
                f"{c.completed - c.announced_all_busy}, {_f(c.added_free_ms.get('p95'), 1)}",
                _triple(c.executor_ms, ("p50", "p95")),
                _f(100 * c.slow_share, 1, "%") if c.slow_share is not None else "—",
                _f(c.polls / c.seconds, 1) if c.seconds else "—",
                _f(c.machine_busy_pct, 0, "%"),
            ]
        )
    return rows


def _cell(t: TrickleResult, rate: float, wake: bool, strategy: str) -> TrickleCell | None:
    return next(
        (c for c in t.cells if (c.rate, c.wake, c.strategy) == (rate, wake, strategy)), None
    )


def trickle_targets(t: TrickleResult) -> list[str]:
    """Each target of the trickle scenario, next to the figure it is judged on."""
    out = []
    half_poll_ms = 1000 * t.poll_interval_s / 2
    for c in t.cells:
        name = f"{c.rate:g}/s {c.strategy}"
        e2e95, added95, exec95 = (
            c.e2e_ms.get("p95"),
            c.added_ms.get("p95"),
            c.executor_ms.get("p95"),
        )
        if c.wake:
            ok = None if added95 is None else added95 <= ADDED_P95_MAX_MS and not c.error
            out.append(
                f"{name}, wake-up on: added p95 {_f(added95, 1)} ms "
                f"(<= {ADDED_P95_MAX_MS:g} ms) {_verdict(ok)}"
            )
        else:  # each task's e2e <= its executor's time + POLL_INTERVAL_S/2, at p95
            ok = None if added95 is None else added95 <= half_poll_ms and not c.error
            out.append(
                f"{name}, wake-up off: e2e - executor time p95 {_f(added95, 1)} ms "
                f"(<= POLL_INTERVAL_S/2 = {half_poll_ms:g} ms; e2e p95 {_f(e2e95, 1)}, "
                f"executor p95 {_f(exec95, 1)}) {_verdict(ok)}"
            )
    for rate in sorted({c.rate for c in t.cells}, reverse=True):
        for wake in (True, False):
            ll, rr = _cell(t, rate, wake, "least_loaded"), _cell(t, rate, wake, "round_robin")
            if not (ll and rr):
                continue
            a, b = ll.e2e_ms.get("p95"), rr.e2e_ms.get("p95")
            ok = None if a is None or b is None else a <= LEAST_LOADED_SHARE * b
            share = f" = {a / b:.2f}x" if a is not None and b else ""
            out.append(
                f"{rate:g}/s, wake-up {'on' if wake else 'off'}: least_loaded e2e p95 "
                f"{_f(a, 1)} ms vs round_robin {_f(b, 1)} ms{share} "
                f"(<= {LEAST_LOADED_SHARE:g}x) {_verdict(ok)}"
            )
    if t.idle is not None:
        i = t.idle
        per = i.queue_polls / (i.seconds / i.poll_interval_s)
        out.append(
            f"idle: {i.queue_polls} polls in {i.seconds:g} s = {per:.2f} per POLL_INTERVAL_S "
            f"({i.poll_interval_s:g} s; worker live.polls {i.worker_polls}, long polls "
            f"{i.long_polls}) (<= 1) {_verdict(per <= 1)}"
        )
    return out


def _split(c: TrickleCell) -> str:
    names = {
        "to_pull": "announce→handed out",
        "pull_to_exec": "handed out→executor",
        "answer_to_msg": "answer→message",
    }
    return ", ".join(f"{names[k]} {_triple(v)}" for k, v in c.split_ms.items() if k in names)


def trickle_details(t: TrickleResult) -> list[str]:
    return [
        f"trickle {c.rate:g}/s {c.strategy} wake={'on' if c.wake else 'off'}: "
        f"added split p50/p95/p99 ms: {_split(c)}; "
        f"e2e max {_f(c.e2e_ms.get('max'), 1)} ms; added max {_f(c.added_ms.get('max'), 1)}"
        f" ms; e2e - task.completed duration_ms p50/p95/p99 "
        f"{_triple(c.added_vs_execute_rt_ms)} ms; POST /tasks p50/p99 "
        f"{_triple(c.post_ms, ('p50', 'p99'))} ms; per executor {c.per_executor}; "
        f"polls {c.polls}, long polls {c.long_polls}, wake-ups {c.wakeups}; worker CPU "
        f"{_f(c.worker_cpu_ms_per_task, 2)} ms/task" + (f"; {c.error}" if c.error else "")
        for c in t.cells
    ]


def print_trickle(t: TrickleResult, verbose: bool) -> None:
    print(
        f"\ntrickle: {t.arrivals} arrivals, 3 x 50 ms + 1 x 250 ms executors "
        f"({t.slow_executor}), capacity 1; e2e = PUBLISH evaluation:queued → "
        "evaluation:completed received; added = e2e - the executor's own time\n"
    )
    print(format_table(trickle_rows(t), TRICKLE_COLUMNS))
    print("\ntrickle targets:")
    for line in trickle_targets(t):
        print("  " + line)
    if verbose:
        print("\ntrickle details:")
        for line in trickle_details(t):
            print("  " + line)


# --- -v details -----------------------------------------------------------------


def _run_details(name: str, router: str, r: RunResult) -> str:
    o = r.overhead_ms
    bits = [
        f"{name}/{router}: {r.done}/{r.tasks} in {r.seconds:.2f}s",
        f"steady {_rate(r.steady_tasks_per_s)}/s",
        f"outcomes {r.outcomes}",
        f"overhead pre {_pair(o.get('pre_p50'), o.get('pre_p99'), 2)}"
        f" post {_pair(o.get('post_p50'), o.get('post_p99'), 2)} ms",
        "executor idle between tasks "
        f"{_pair(r.idle_gap_ms.get('p50'), r.idle_gap_ms.get('p99'), 2)} ms",
        f"cpu ms/task: router {_f(r.cpu_ms_per_task, 2)}, "
        + ", ".join(f"{k} {v:.2f}" for k, v in r.others_cpu_ms_per_task.items())
        + f"; machine busy {_f(r.machine_busy_pct, 0)}%",
        f"peak RSS {_f((r.rss_peak_kb or 0) / 1024, 0)} MB",
        *_redis_details(r),
    ]
    rejected = sum(x.get("rejected_busy", 0) for x in r.stack.get("executor_stats", []))
    duplicates = r.stack.get("duplicate_reports")
    if rejected or duplicates:
        bits.append(f"executor 503s {rejected}, duplicate reports {duplicates}")
    if r.child:
        bits.append(f"child {r.child}")
    if r.timed_out:
        bits.append("TIMED OUT")
    if r.error:
        bits.append(r.error)
    return "; ".join(bits)


def _redis_details(r: RunResult) -> list[str]:
    """The stream-side overhead split, Redis calls and appends per task."""
    bits = []
    if r.stream_overhead_ms:
        s = r.stream_overhead_ms
        bits.append(
            "stream pulled→dispatched "
            f"{_pair(s['pulled_to_dispatched_p50'], s['pulled_to_dispatched_p99'])} ms, "
            "answer→completed "
            f"{_pair(s['answer_to_completed_p50'], s['answer_to_completed_p99'])} ms"
        )
    if r.redis_calls:
        top = ", ".join(
            f"{k} {v / max(r.done, 1):.2f}"
            for k, v in sorted(r.redis_calls.items(), key=lambda kv: -kv[1])[:8]
        )
        bits.append(f"redis calls/task: {top}")
    if r.append_round_trips is not None and r.events_appended:
        bits.append(
            f"{r.events_appended / max(r.done, 1):.2f} events/task in "
            f"{r.append_round_trips / max(r.done, 1):.2f} append RT/task"
        )
    return bits


def _replay_details(replay: ReplayResult) -> str:
    b = replay.breakdown_s
    return (
        f"replay ({replay.source}, {replay.events} events): start-up "
        f"{_f(replay.startup_seconds, 2)} s = {_f(replay.startup_events_per_s)} ev/s; "
        f"from a checkpoint {_f(replay.checkpoint_startup_seconds, 3)} s "
        f"({replay.checkpoint_folded} entries folded after it); "
        "in the bench process "
        + ", ".join(f"{k} {v:.2f} s" for k, v in b.items())
        + f" = {_f(replay.breakdown_events_per_s)} ev/s; stream in Redis "
        + f"{_f((replay.stream_bytes or 0) / 2**20, 1)} MB "
        + f"({_f((replay.stream_bytes or 0) / max(replay.events, 1), 0)} B/event)"
    )


def details(results: Results, replay: ReplayResult | None) -> list[str]:
    lines = [
        _run_details(name, router, r)
        for name, runs in results.items()
        for router, r in runs.items()
    ]
    if replay is not None:
        lines.append(_replay_details(replay))
    return lines


def replay_summary(replay: ReplayResult) -> str:
    return f"replay: {replay.events} events, {_f(replay.startup_events_per_s)} ev/s"


# --- the whole report -------------------------------------------------------------


def print_report(args: argparse.Namespace, outcome: Outcome) -> None:
    results, replay = outcome.results, outcome.replay
    mode = "quick" if args.quick else "full"
    print(
        f"\nqueue-worker benchmark ({mode}, {outcome.seconds:.0f} s, "
        f"{os.cpu_count()} CPUs, worker LOG_LEVEL={args.log_level})\n"
    )
    rows = table_rows(results, replay)
    if rows:
        print(format_table(rows))
        print("\n* = did not finish within its time budget (partial rate)")
        print("\ntargets:")
        for line in targets(results, replay):
            print("  " + line)
    if outcome.trickle is not None:
        print_trickle(outcome.trickle, args.verbose)
    if args.verbose and rows:
        print("\ndetails:")
        for line in details(results, replay):
            print("  " + line)
    if args.profile:
        summary = profile_report(load_profile(args.profile_out), 20)
        Path(args.profile_out + ".summary.txt").write_text(summary + "\n")
        print(f"\nprofile of ours on {args.profile_scenario} ({args.profile_out}):\n{summary}")
    if args.json:
        write_json(Path(args.json), mode, outcome)


def write_json(path: Path, mode: str, outcome: Outcome) -> None:
    """Every figure: the mode, the run's seconds, each run's result, the replay, loadavg."""
    doc = {
        "mode": mode,
        "seconds": outcome.seconds,
        "results": {k: {r: asdict(x) for r, x in v.items()} for k, v in outcome.results.items()},
        "replay": asdict(outcome.replay) if outcome.replay else None,
        "trickle": asdict(outcome.trickle) if outcome.trickle else None,
        "loadavg": os.getloadavg(),
    }
    path.write_bytes(msgspec.json.format(msgspec.json.encode(doc)))
