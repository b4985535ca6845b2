"""The load generator and its report: N coroutines on one asyncio loop issue
calls (closed loop, or open loop at a fixed rate), latencies go into an HDR
histogram, status codes and error messages are counted.

Two engines with the same figures: ``run_load`` (N coroutines on one
asyncio loop) and ``run_load_threads`` (N threads making blocking calls).
Knows nothing of gradserve's messages: a call is any function of (caller
index, call index) that returns on success and raises ``grpc.RpcError`` (or
anything else) on failure. ``client.loadtest``
builds the calls; ``benchmarks/service.py`` reuses this module directly.
"""
from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Sequence

import grpc
from hdrh.histogram import HdrHistogram

PERCENTILES = (10, 25, 50, 75, 90, 95, 99, 99.9)
_HIST_LOWEST_US = 1
_HIST_HIGHEST_US = 3_600_000_000  # one hour, in microseconds
_HIST_DIGITS = 3
CLIENT_ERROR = "CLIENT_ERROR"  # a failure raised by the tool's side, not a gRPC status


@dataclass(frozen=True)
class CallKind:
    """One kind of call in the mix: its name, its weight in the mix, the
    number of samples (rows) it carries, and the function that performs it
    for (caller, n) — the caller's index and its n-th call: it returns an
    awaitable for ``run_load`` and blocks until done for ``run_load_threads``."""

    name: str
    invoke: Callable[[int, int], Awaitable[object]]
    weight: int = 1
    rows: int = 0


def new_histogram() -> HdrHistogram:
    """A latency histogram in microseconds, 3 significant digits."""
    return HdrHistogram(_HIST_LOWEST_US, _HIST_HIGHEST_US, _HIST_DIGITS)


def mix_pattern(weights: Sequence[int]) -> list[int]:
    """Indices of the kinds in one cycle of the mix, spread evenly (smooth
    weighted round robin), e.g. weights (8, 2) -> 0 0 0 0 1 0 0 0 0 1."""
    if not weights or any(w < 0 for w in weights) or sum(weights) == 0:
        raise ValueError(f"mix weights must be non-negative with a positive sum, got {list(weights)}")
    g = 0
    for w in weights:
        g = math.gcd(g, w)
    weights = [w // g for w in weights]
    total = sum(weights)
    current = [0] * len(weights)
    pattern = []
    for _ in range(total):
        for i, w in enumerate(weights):
            current[i] += w
        best = max(range(len(weights)), key=lambda i: current[i])
        current[best] -= total
        pattern.append(best)
    return pattern


@dataclass
class KindStats:
    """Figures for one kind of call (or for all calls together)."""

    histogram: HdrHistogram = field(default_factory=new_histogram)
    count: int = 0
    ok: int = 0
    rows: int = 0  # samples carried by the OK calls

    def record(self, ok: bool, latency_us: int, rows: int) -> None:
        self.count += 1
        if ok:
            self.ok += 1
            self.rows += rows
            self.histogram.record_value(max(latency_us, _HIST_LOWEST_US))


@dataclass
class LoadResult:
    """What one run measured (warm-up calls excluded). Latencies are of the
    calls that returned OK; errors are counted by status code and message."""

    concurrency: int
    rps_limit: float | None
    total_s: float
    overall: KindStats
    per_kind: dict[str, KindStats]
    status_codes: Counter
    errors: Counter  # (code name, message) -> count
    warmup_calls: int
    interrupted: bool
    open_loop: bool
    tool_cpu_us_per_call: float = 0.0  # the load tool's own CPU time per call (all threads, warm-up included)

    @property
    def count(self) -> int:
        return self.overall.count

    @property
    def rps(self) -> float:
        return self.count / self.total_s if self.total_s > 0 else 0.0


def _status_name(code) -> str:
    return code.name if isinstance(code, grpc.StatusCode) else str(code)


class _RunState:
    """Tickets, deadlines and figures of one run; shared by the callers of
    either engine (asyncio: no await inside, so no lock needed; threads:
    under ``lock``)."""

    def __init__(self, kinds, *, rps, warmup_calls, warmup_s, total, duration_s, max_run_s, stop_event):
        self.kinds = kinds
        self.pattern = mix_pattern([k.weight for k in kinds])
        self.next_ticket = 0
        self.rps = rps
        self.warmup_s = warmup_s
        self.total = total
        self.duration_s = duration_s
        self.stop_event = stop_event
        self.t0 = time.perf_counter()
        self.cpu0 = time.process_time()
        self.hard_deadline = self.t0 + max_run_s
        self.measure_from_ticket: int | None = warmup_calls if not warmup_s else None
        self.measure_start: float | None = None
        self.measure_end: float | None = None
        self.deadline: float | None = None
        self.overall = KindStats()
        self.per_kind = {k.name: KindStats() for k in kinds}
        self.codes: Counter = Counter()
        self.errors: Counter = Counter()
        self.warmup_done_calls = 0

    def claim(self, now: float) -> tuple[int, bool] | None:
        """Take the next ticket, or None when the run is over; says whether
        the call is measured."""
        if now >= self.hard_deadline or (self.stop_event is not None and self.stop_event.is_set()):
            return None
        if self.deadline is not None and now >= self.deadline:
            return None
        ticket = self.next_ticket
        if self.rps and self.deadline is not None and self.t0 + ticket / self.rps >= self.deadline:
            return None
        if self.measure_from_ticket is None and now - self.t0 >= self.warmup_s:
            self.measure_from_ticket = ticket
        measured = self.measure_from_ticket is not None and ticket >= self.measure_from_ticket
        if measured and self.total is not None and ticket - self.measure_from_ticket >= self.total:
            return None
        if measured and self.measure_start is None:
            self.measure_start = self.t0 + ticket / self.rps if self.rps else now
            if self.duration_s is not None:
                self.deadline = self.measure_start + self.duration_s
        self.next_ticket += 1
        return ticket, measured

    def kind_of(self, ticket: int) -> CallKind:
        return self.kinds[self.pattern[ticket % len(self.pattern)]]

    def record(self, kind: CallKind, measured: bool, code: str, message: str,
               start: float, end: float) -> None:
        if not measured:
            self.warmup_done_calls += 1
            return
        latency_us = int((end - start) * 1e6)
        ok = code == "OK"
        self.overall.record(ok, latency_us, kind.rows)
        self.per_kind[kind.name].record(ok, latency_us, kind.rows)
        self.codes[code] += 1
        if not ok:
            self.errors[(code, message)] += 1
        if self.measure_end is None or end > self.measure_end:
            self.measure_end = end

    def result(self, concurrency: int, interrupted: bool) -> LoadResult:
        if self.stop_event is not None and self.stop_event.is_set():
            interrupted = True
        if self.measure_start is None or self.measure_end is None:
            total_s = 0.0
        else:
            total_s = max(self.measure_end - self.measure_start, 0.0)
        calls = self.overall.count + self.warmup_done_calls
        cpu_us = (time.process_time() - self.cpu0) * 1e6 / calls if calls else 0.0
        return LoadResult(
            tool_cpu_us_per_call=cpu_us,
            concurrency=concurrency, rps_limit=self.rps, total_s=total_s, overall=self.overall,
            per_kind=self.per_kind, status_codes=self.codes, errors=self.errors,
            warmup_calls=self.warmup_done_calls, interrupted=interrupted, open_loop=self.rps is not None,
        )


def _check_bounds(concurrency, total, duration_s, rps) -> None:
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    if (total is None) == (duration_s is None):
        raise ValueError("give exactly one of total and duration_s")
    if total is not None and total < 1:
        raise ValueError(f"total must be >= 1, got {total}")
    if duration_s is not None and not duration_s > 0:
        raise ValueError(f"duration must be > 0, got {duration_s}")
    if rps is not None and not rps > 0:
        raise ValueError(f"rps must be > 0, got {rps}")


def _failure(exc: BaseException) -> tuple[str, str]:
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
        return _status_name(exc.code()), exc.details() or ""
    return CLIENT_ERROR, f"{type(exc).__name__}: {exc}"


async def run_load(
    kinds: Sequence[CallKind],
    *,
    concurrency: int,
    total: int | None = None,
    duration_s: float | None = None,
    warmup_calls: int = 0,
    warmup_s: float = 0.0,
    rps: float | None = None,
    max_run_s: float = 3600.0,
    stop_event: asyncio.Event | None = None,
) -> LoadResult:
    """Run the load on this asyncio loop (``CallKind.invoke`` returns an
    awaitable) and return its figures.

    Closed loop (``rps`` None): each of ``concurrency`` callers issues its
    next call as soon as its previous one returns. Open loop (``rps`` set):
    call i is scheduled at t0 + i/rps and taken by a free caller; its latency
    is measured from the scheduled time, so queueing behind slow calls is
    counted (no coordinated omission) — give enough callers for the rate.

    Exactly one of ``total`` (measured calls) and ``duration_s`` bounds the
    measured phase; ``warmup_calls`` or ``warmup_s`` precede it and are not
    counted. ``max_run_s`` bounds the whole run whatever happens;
    ``stop_event`` ends it early (Ctrl-C), keeping what was measured.
    """
    _check_bounds(concurrency, total, duration_s, rps)
    st = _RunState(kinds, rps=rps, warmup_calls=warmup_calls, warmup_s=warmup_s, total=total,
                   duration_s=duration_s, max_run_s=max_run_s, stop_event=stop_event)
    clock = time.perf_counter

    async def caller(index: int) -> None:
        n = 0
        while True:
            claimed = st.claim(clock())
            if claimed is None:
                return
            ticket, measured = claimed
            if rps:
                start = st.t0 + ticket / rps
                delay = start - clock()
                if delay > 0:
                    await asyncio.sleep(delay)
            else:
                start = clock()
            kind = st.kind_of(ticket)
            code, message = "OK", ""
            try:
                await kind.invoke(index, n)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - a load tool reports, it does not crash
                code, message = _failure(e)
            n += 1
            st.record(kind, measured, code, message, start, clock())

    tasks = [asyncio.ensure_future(caller(i)) for i in range(concurrency)]
    interrupted = False
    try:
        done, pending = await asyncio.wait(tasks, timeout=max_run_s + 60)
        for t in pending:  # a call hung past every deadline: give up on it
            t.cancel()
        for t in done:
            t.result()
    except asyncio.CancelledError:
        interrupted = True
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return st.result(concurrency, interrupted)


def run_load_threads(
    kinds: Sequence[CallKind],
    *,
    concurrency: int,
    total: int | None = None,
    duration_s: float | None = None,
    warmup_calls: int = 0,
    warmup_s: float = 0.0,
    rps: float | None = None,
    max_run_s: float = 3600.0,
    stop_event: threading.Event | None = None,
) -> LoadResult:
    """``run_load`` with one OS thread per caller and blocking calls
    (``CallKind.invoke`` returns when the call is done). Blocking grpc calls
    release the GIL while they wait; at low concurrency this costs less per
    call than grpc.aio (see client/loadtest.py's ``--engine``)."""
    _check_bounds(concurrency, total, duration_s, rps)
    st = _RunState(kinds, rps=rps, warmup_calls=warmup_calls, warmup_s=warmup_s, total=total,
                   duration_s=duration_s, max_run_s=max_run_s, stop_event=stop_event)
    clock = time.perf_counter
    lock = threading.Lock()

    def caller(index: int) -> None:
        n = 0
        while True:
            with lock:
                claimed = st.claim(clock())
            if claimed is None:
                return
            ticket, measured = claimed
            if rps:
                start = st.t0 + ticket / rps
                delay = start - clock()
                if delay > 0:
                    time.sleep(delay)
            else:
                start = clock()
            kind = st.kind_of(ticket)
            code, message = "OK", ""
            try:
                kind.invoke(index, n)
            except Exception as e:  # noqa: BLE001
                code, message = _failure(e)
            n += 1
            end = clock()
            with lock:
                st.record(kind, measured, code, message, start, end)

    threads = [threading.Thread(target=caller, args=(i,), daemon=True, name=f"loadtest-{i}")
               for i in range(concurrency)]
    for t in threads:
        t.start()
    give_up = time.perf_counter() + max_run_s + 60
    for t in threads:
        t.join(timeout=max(give_up - time.perf_counter(), 0.0))
    return st.result(concurrency, interrupted=any(t.is_alive() for t in threads))


# ---------------------------------------------------------------- the report

def latency_summary(stats: KindStats) -> dict | None:
    """fastest/slowest/average/stddev and percentiles in milliseconds
    (microsecond resolution), or None when no call succeeded."""
    h = stats.histogram
    if h.get_total_count() == 0:
        return None
    out = {
        "fastest": h.get_min_value() / 1000,
        "slowest": h.get_max_value() / 1000,
        "average": round(h.get_mean_value()) / 1000,
        "stddev": round(h.get_stddev()) / 1000,
    }
    for p in PERCENTILES:
        out[f"p{p:g}"] = h.get_value_at_percentile(p) / 1000
    return out


def histogram_buckets(stats: KindStats, buckets: int = 10) -> list[dict]:
    """ghz-style histogram: ``buckets`` equal-width ranges from fastest to
    slowest, each with its upper mark (ms) and the number of OK calls."""
    h = stats.histogram
    if h.get_total_count() == 0:
        return []
    lo, hi = h.get_min_value(), h.get_max_value()
    width = max((hi - lo) / buckets, 1e-9)
    counts = [0] * buckets
    for item in h.get_recorded_iterator():
        v = h.get_highest_equivalent_value(item.value_iterated_to)
        v = min(max(v, lo), hi)
        i = min(int((v - lo) / width), buckets - 1)
        counts[i] += item.count_added_in_this_iter_step
    return [{"upper_ms": (lo + width * (i + 1)) / 1000, "count": c} for i, c in enumerate(counts)]


def _kind_dict(stats: KindStats, total_s: float) -> dict:
    return {
        "count": stats.count,
        "ok": stats.ok,
        "errors": stats.count - stats.ok,
        "rps": stats.count / total_s if total_s > 0 else 0.0,
        "rows_per_s": stats.rows / total_s if total_s > 0 else 0.0,
        "latency_ms": latency_summary(stats),
    }


def result_to_dict(result: LoadResult, **context) -> dict:
    """The report as plain JSON-safe data; ``context`` (target, call, spec…)
    is copied in first."""
    d = dict(context)
    d.update({
        "concurrency": result.concurrency,
        "rps_limit": result.rps_limit,
        "open_loop": result.open_loop,
        "interrupted": result.interrupted,
        "warmup_calls": result.warmup_calls,
        "count": result.count,
        "ok": result.overall.ok,
        "errors": result.count - result.overall.ok,
        "total_s": result.total_s,
        "rps": result.rps,
        "rows_per_s": result.overall.rows / result.total_s if result.total_s > 0 else 0.0,
        "tool_cpu_us_per_call": result.tool_cpu_us_per_call,
        "latency_ms": latency_summary(result.overall),
        "histogram": histogram_buckets(result.overall),
        "status_codes": dict(sorted(result.status_codes.items())),
        "error_messages": [
            {"code": code, "message": msg, "count": n}
            for (code, msg), n in sorted(result.errors.items(), key=lambda kv: (-kv[1], kv[0]))
        ],
        "per_call": {name: _kind_dict(s, result.total_s) for name, s in result.per_kind.items()},
    })
    return d


def format_report(d: dict, bar_width: int = 40) -> str:
    """The report as text, ghz-like, from ``result_to_dict``'s output (so the
    text and the JSON show the same figures)."""
    lines = ["", "Summary:"]
    if d.get("interrupted"):
        lines.append("  (interrupted: partial figures)")
    for key, label in (("target", "Target"), ("call", "Call"), ("models", "Models"), ("engine", "Engine")):
        if d.get(key) is not None:
            lines.append(f"  {label + ':':<14}{d[key]}")
    load = f"closed loop, {d['concurrency']} callers"
    if d.get("open_loop"):
        load = f"open loop at {d['rps_limit']:g} req/s, {d['concurrency']} callers"
    lines += [
        f"  {'Load:':<14}{load}",
        f"  {'Count:':<14}{d['count']}",
        f"  {'Total:':<14}{d['total_s'] * 1000:.2f} ms",
    ]
    lat = d["latency_ms"]
    if lat:
        lines += [
            f"  {'Slowest:':<14}{lat['slowest']:.3f} ms",
            f"  {'Fastest:':<14}{lat['fastest']:.3f} ms",
            f"  {'Average:':<14}{lat['average']:.3f} ms",
        ]
    lines.append(f"  {'Requests/sec:':<14}{d['rps']:.2f}")
    if d.get("rows_per_s"):
        lines.append(f"  {'Rows/sec:':<14}{d['rows_per_s']:.1f}")
    if d.get("tool_cpu_us_per_call"):
        lines.append(f"  {'Tool CPU:':<14}{d['tool_cpu_us_per_call']:.0f} us per call (this process)")
    if d.get("warmup_calls"):
        lines.append(f"  {'Warm-up:':<14}{d['warmup_calls']} calls, not counted")
    if lat:
        lines += ["", "Response time histogram (OK calls):"]
        hist = d["histogram"]
        top = max((b["count"] for b in hist), default=0) or 1
        for b in hist:
            bar = "∎" * round(bar_width * b["count"] / top)
            lines.append(f"  {b['upper_ms']:10.3f} ms [{b['count']}]\t|{bar}")
        lines += ["", "Latency distribution (OK calls):"]
        for p in PERCENTILES:
            lines.append(f"  {p:g} % in {lat[f'p{p:g}']:.3f} ms")
    if len(d.get("per_call", {})) > 1:
        lines += ["", "Per call:"]
        for name, k in d["per_call"].items():
            kl = k["latency_ms"]
            figs = f"p50 {kl['p50']:.3f} ms, p99 {kl['p99']:.3f} ms" if kl else "no OK call"
            lines.append(f"  {name:<12} count {k['count']}, errors {k['errors']}, "
                         f"{k['rps']:.2f} req/s, {figs}")
    lines += ["", "Status code distribution:"]
    for code, n in d["status_codes"].items():
        lines.append(f"  [{code}]   {n} responses")
    if d["error_messages"]:
        lines += ["", "Error distribution:"]
        for e in d["error_messages"]:
            lines.append(f"  [{e['count']}]   {e['code']}: {e['message']}")
    return "\n".join(lines) + "\n"
