"""The plumbing of the benchmark's trickle scenario (``bench.trickle``): arrivals are
announced and enqueued, every task's latency is split into the executor's own time and
the rest, and ``WAKE_CHANNEL`` empty reaches the worker. No latency target is asserted
here (``python -m bench.run --scenario trickle`` measures those)."""

from __future__ import annotations

import itertools
from pathlib import Path

from bench import trickle
from bench.processes import Harness
from bench.report import trickle_rows, trickle_targets
from bench.results import TrickleResult
from bench.scenarios import SCENARIOS


def test_arrivals_are_evenly_spaced_or_poisson_from_a_seed() -> None:
    even = trickle.arrival_offsets(20.0, 2.0, "even", 1)
    assert len(even) == 40 and even[1] - even[0] == 0.05
    poisson = trickle.arrival_offsets(20.0, 30.0, "poisson", 1)
    assert poisson == trickle.arrival_offsets(20.0, 30.0, "poisson", 1)
    assert all(0 <= a < b < 30.0 for a, b in itertools.pairwise(poisson))
    assert 450 <= len(poisson) <= 750  # 600 expected; the gaps are not all equal
    assert len({round(b - a, 6) for a, b in itertools.pairwise(poisson)}) > 100


async def test_a_trickle_cell_splits_each_tasks_latency(tmp_path: Path) -> None:
    scn = SCENARIOS["trickle"]
    result = TrickleResult(slow_executor=f"executor-{scn.slow_index + 1}")
    async with Harness(tmp_path) as h:
        for wake in (True, False):
            cell = await trickle.run_cell(
                h, scn, "round_robin", wake, 10.0, 1.2, "even", result, settle_s=0.3
            )
            result.cells.append(cell)
            assert cell.error is None and cell.completed == cell.sent == 12, cell
            assert sum(cell.per_executor.values()) == 12
            assert set(cell.per_executor) <= {f"executor-{i}" for i in range(1, 5)}
            e2e, own = cell.e2e_ms["p50"], cell.executor_ms["p50"]
            added, e2e_max = cell.added_ms["max"], cell.e2e_ms["max"]
            assert e2e is not None and own is not None and added is not None and e2e_max
            assert own >= 50 and e2e > own  # the executors take 50 ms at least
            assert 0 < added <= e2e_max
            assert cell.polls > 0
            assert (cell.wakeups or 0) > 0 if wake else cell.wakeups == 0
    rows = trickle_rows(result)
    assert [r[2] for r in rows] == ["on", "off"]
    lines = trickle_targets(result)
    assert any("wake-up on: added p95" in x for x in lines)
    assert any("wake-up off: e2e - executor time p95" in x for x in lines)
    assert not any("least_loaded e2e p95" in x for x in lines)  # no least_loaded cell here
