"""Small helpers shared by the benchmarks: timing, memory peaks, result rows.

Every benchmark produces ``Row`` objects. A row compares *ours* with a
*baseline* measured in the same process, moments apart, and checks the ratio
``ours / baseline`` (or ``ours / reference size`` for memory rows) against a
target. Rows without a target are informational and never fail the run.
"""

from __future__ import annotations

import gc
import resource
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pyarrow as pa


@dataclass(frozen=True)
class Row:
    """One line of the result table.

    ``ratio`` is the number checked against ``limit`` (``ratio <= limit`` or,
    with ``strict``, ``ratio < limit``); ``limit=None`` marks an
    informational row.
    """

    name: str
    ours: str
    baseline: str
    ratio: float
    limit: float | None = None
    strict: bool = False
    unit: str = "x"

    @property
    def ok(self) -> bool | None:
        if self.limit is None:
            return None
        return self.ratio < self.limit if self.strict else self.ratio <= self.limit

    @property
    def target(self) -> str:
        if self.limit is None:
            return "(info)"
        return f"{'<' if self.strict else '<='} {fmt_ratio(self.limit)}{self.unit}"


def fmt_ratio(r: float) -> str:
    if r == 0:
        return "0"
    if r < 0.001:
        return f"{r:.1e}"
    if r < 0.01:
        return f"{r:.4f}"
    if r < 10:
        return f"{r:.2f}"
    return f"{r:.1f}"


def fmt_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def best_of_interleaved(fns: dict[str, Callable[[], object]], repeat: int, min_time: float = 0.0,
                        max_rounds: int = 200, setup: Callable[[], None] | None = None) -> dict[str, float]:
    """Best wall time of each callable, over at least ``repeat`` rounds.

    The callables run alternately (a, b, a, b, ...) rather than one block after
    the other, so a burst of load from another process on this small machine
    hits ours and the baseline alike; the minimum filters out the rest. Quick
    calls get more rounds: rounds continue until ``min_time`` seconds have been
    spent in the timed calls (at most ``max_rounds``). ``setup`` (untimed) runs
    before every single call, e.g. to clear a target directory. The garbage
    collector is off while a call is timed.
    """
    best = {k: float("inf") for k in fns}
    spent = 0.0
    rounds = 0
    while rounds < repeat or (spent < min_time and rounds < max_rounds):
        rounds += 1
        for key, fn in fns.items():
            if setup is not None:
                setup()
            gc.collect()
            gc.disable()
            keep = []  # the result is freed after the clock stops, not inside the timed region
            try:
                t0 = time.perf_counter()
                keep.append(fn())
                elapsed = time.perf_counter() - t0
            finally:
                gc.enable()
            keep.clear()
            spent += elapsed
            best[key] = min(best[key], elapsed)
    return best


def timed_row(name: str, ours: Callable[[], object], baseline: Callable[[], object], *, repeat: int,
              min_time: float = 0.0, limit: float | None = None, strict: bool = False, retries: int = 2,
              setup: Callable[[], None] | None = None) -> Row:
    """Time ``ours`` against ``baseline`` (interleaved, best of N) and make a ``Row``.

    When the ratio misses ``limit``, up to ``retries`` more batches of rounds
    are run and the best times over all batches are kept: a miss caused by a
    burst of load elsewhere on the machine goes away, a real slowdown stays.
    """
    best = best_of_interleaved({"ours": ours, "base": baseline}, repeat, min_time=min_time, setup=setup)
    row = _timed(name, best, limit, strict)
    for attempt in range(retries):
        if row.ok is not False:
            break
        print(f"    {name}: {fmt_ratio(row.ratio)}x misses {row.target}; measuring again "
              f"({attempt + 2}/{retries + 1})", flush=True)
        more = best_of_interleaved({"ours": ours, "base": baseline}, repeat, min_time=min_time, setup=setup)
        best = {k: min(best[k], more[k]) for k in best}
        row = _timed(name, best, limit, strict)
    return row


def _timed(name: str, best: dict[str, float], limit: float | None, strict: bool) -> Row:
    return Row(name, fmt_time(best["ours"]), fmt_time(best["base"]), best["ours"] / best["base"], limit, strict)


def peak_extra_bytes(fn: Callable[[], object]) -> tuple[int, int]:
    """``(peak, retained)`` bytes allocated by ``fn()`` beyond what existed before.

    Counts what tracemalloc sees (Python objects and numpy array data: numpy
    reports its buffers to tracemalloc) plus what the pyarrow default memory
    pool allocates (Arrow buffers are invisible to tracemalloc). For Arrow only
    the retained amount is known (the pool has no resettable peak), so the
    Arrow part of ``peak`` is the larger of retained and the growth of the
    pool's all-time maximum. ``retained`` is measured while the result is
    still alive (it is what the caller keeps, e.g. a copied array).
    """
    pool = pa.default_memory_pool()
    gc.collect()
    started_here = not tracemalloc.is_tracing()
    if started_here:
        tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        tm_before = tracemalloc.get_traced_memory()[0]
        pa_before, pa_max_before = pa.total_allocated_bytes(), pool.max_memory()
        result = fn()
        tm_now, tm_peak = tracemalloc.get_traced_memory()
        pa_now, pa_max_now = pa.total_allocated_bytes(), pool.max_memory()
        del result
    finally:
        if started_here:
            tracemalloc.stop()
    pa_retained = pa_now - pa_before
    pa_peak = max(pa_retained, (pa_max_now or 0) - (pa_max_before or 0))
    return (tm_peak - tm_before) + pa_peak, (tm_now - tm_before) + pa_retained


def peak_rss_kb() -> int:
    """This process's own peak RSS (KiB).

    ``VmHWM`` belongs to the process's memory map, new at ``exec``; ``ru_maxrss``
    is not reset by ``exec``, so in a subprocess of a big parent (``make bench``
    runs the 1e7-element compare first) it reported the parent's peak instead.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
