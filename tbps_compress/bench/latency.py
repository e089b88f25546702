"""Timing primitives for the benchmark: repeated timings with warm-up, interleaved A/B timings, peak memory, the
machine's matrix-product ceiling and a description of the environment.

Conventions:

- Every timed call is bracketed by ``sync`` (``torch.cuda.synchronize`` for CUDA work; onnxruntime's ``run`` is
  synchronous, CPU work needs nothing), so a timing covers the whole computation, not its launch.
- Latencies are reported in milliseconds as the median (p50) and 90th percentile (p90) of the timed calls; a
  throughput is ``batch / median latency``.
- Peak memory on the CPU is the peak resident set size above the level before the model was loaded, sampled by
  a background thread from ``/proc/self/statm`` (freed heap is handed back with ``malloc_trim`` first, so earlier
  work does not hide a later model's memory). On CUDA it is ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import platform
import resource
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

__all__ = [
    "PeakMemory",
    "Timing",
    "cpu_name",
    "environment",
    "interleaved",
    "matmul_ceiling",
    "measure",
    "no_sync",
    "percentile",
    "rss_bytes",
    "torch_threads",
]


def no_sync() -> None:
    """The ``sync`` of CPU work and of synchronous runtimes (onnxruntime): nothing to wait for."""


def percentile(values: list[float] | np.ndarray, q: float) -> float:
    """The ``q``-th percentile (0-100, linear interpolation) of ``values``; NaN when empty."""
    arr = np.asarray(values, dtype=np.float64)
    return float(np.percentile(arr, q)) if arr.size else float("nan")


@dataclass
class Timing:
    """Per-call times in milliseconds of one measured function."""

    times_ms: list[float] = field(default_factory=list)
    warmup: int = 0

    @property
    def n(self) -> int:
        return len(self.times_ms)

    @property
    def p50(self) -> float:
        return percentile(self.times_ms, 50)

    @property
    def p90(self) -> float:
        return percentile(self.times_ms, 90)

    @property
    def mean(self) -> float:
        return float(np.mean(self.times_ms)) if self.times_ms else float("nan")

    def per_second(self, items: int) -> float:
        """Items per second at the median latency (``items`` per call)."""
        p50 = self.p50
        return items * 1000.0 / p50 if p50 > 0 else float("nan")


def _timed(fn: Callable[[], Any], sync: Callable[[], None]) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return (time.perf_counter() - t0) * 1000.0


def measure(fn: Callable[[], Any], *, warmup: int = 3, reps: int = 20, sync: Callable[[], None] = no_sync,
            max_time_s: float | None = None, min_reps: int = 3) -> Timing:
    """Call ``fn`` ``warmup`` times untimed, then time ``reps`` calls.

    ``max_time_s``: stop timing early once the timed calls have taken this long in total and at least
    ``min_reps`` were timed (for slow models on small machines; ``Timing.n`` says how many were timed)."""
    if warmup < 0 or reps < 1:
        raise ValueError(f"warmup must be >= 0 and reps >= 1, got warmup={warmup}, reps={reps}")
    for _ in range(warmup):
        fn()
    sync()
    out = Timing(warmup=warmup)
    total = 0.0
    while out.n < reps:
        t = _timed(fn, sync)
        out.times_ms.append(t)
        total += t
        if max_time_s is not None and out.n >= min_reps and total >= max_time_s * 1000.0:
            break
    return out


def interleaved(fns: Mapping[str, Callable[[], Any]], *, warmup: int = 2, rounds: int = 10,
                sync: Callable[[], None] = no_sync, calls_per_round: int = 1,
                deadline: float | None = None) -> dict[str, Timing]:
    """Time several functions in turns (A, B, A, B, ...) so that slow drift of the machine's load hits all of
    them alike; compare their medians. Each round times ``calls_per_round`` calls of each function.

    ``deadline`` (a ``time.perf_counter()`` value): stop after the round in progress when it has passed (at least
    three rounds are always run)."""
    if rounds < 1 or calls_per_round < 1:
        raise ValueError(f"rounds and calls_per_round must be >= 1, got {rounds}, {calls_per_round}")
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync()
    out = {name: Timing(warmup=warmup) for name in fns}
    for r in range(rounds):
        for name, fn in fns.items():
            for _ in range(calls_per_round):
                out[name].times_ms.append(_timed(fn, sync))
        if deadline is not None and r >= 2 and time.perf_counter() > deadline:
            log.info("interleaved timing stopped after %d of %d rounds (time budget)", r + 1, rounds)
            break
    return out


# ---------------------------------------------------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------------------------------------------------

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """Current resident set size of this process (``/proc/self/statm``; the peak RSS where /proc is absent)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        scale = 1 if sys.platform == "darwin" else 1024
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


def _trim_heap() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory of the work inside ``with PeakMemory(device) as pm:`` in MiB (``pm.peak_mb``).

    CPU: peak RSS above the level at entry, sampled every ``interval_s`` by a daemon thread (a lower bound: a
    spike shorter than the interval can be missed). CUDA (``device`` starting with ``cuda``):
    ``torch.cuda.max_memory_allocated`` after a reset at entry, i.e. tensors allocated by PyTorch on that device
    (not onnxruntime's own CUDA allocations: those rows report host RSS).
    """

    def __init__(self, device: str = "cpu", interval_s: float = 0.002) -> None:
        self.device = str(device)
        self.interval_s = interval_s
        self.peak_mb: float | None = None
        self.method = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._base = 0
        self._peak = 0

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, rss_bytes())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakMemory:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            self.method = "torch.cuda.max_memory_allocated above the level at load"
            return self
        _trim_heap()
        self._base = self._peak = rss_bytes()
        self.method = f"peak RSS above the level before load (sampled every {self.interval_s * 1000:.0f} ms)"
        self._thread = threading.Thread(target=self._sample, name="peak-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            self.peak_mb = max(0, torch.cuda.max_memory_allocated() - self._base) / 2**20
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._peak = max(self._peak, rss_bytes())
        self.peak_mb = max(0, self._peak - self._base) / 2**20


# ---------------------------------------------------------------------------------------------------------------------
# machine ceiling and environment
# ---------------------------------------------------------------------------------------------------------------------


def matmul_ceiling(device: str = "cpu", dtype: str = "fp32", n: int | None = None, reps: int = 5) -> dict[str, Any]:
    """Measured FLOP/s of a large square matrix product (``torch.mm``, n x n by n x n, ``2 n^3`` FLOPs) on
    ``device`` in ``dtype`` ('fp32', 'fp16', 'bf16'): the best of ``reps`` timed products after two warm-ups, so
    it approximates what the device can do at the current thread count (TF32 stays off for fp32 unless the
    caller enabled it). Returns ``{"gflops", "n", "dtype", "device", "method"}``."""
    import torch

    dt = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    cuda = str(device).startswith("cuda")
    if n is None:
        n = 8192 if cuda else 2048
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dt)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dt)
    sync = torch.cuda.synchronize if cuda else no_sync
    t = measure(lambda: torch.mm(a, b), warmup=2, reps=reps, sync=sync)
    best_s = min(t.times_ms) / 1000.0
    return {
        "gflops": 2.0 * n**3 / best_s / 1e9,
        "n": n,
        "dtype": dtype,
        "device": str(device),
        "method": f"torch.mm {n}x{n} {dtype}, best of {reps}",
    }


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "fma")
                    return [w for w in wanted if w in flags]
    except OSError:
        pass
    return []


def environment(device: str = "cpu") -> dict[str, Any]:
    """Library versions, CPU / GPU names, thread counts and providers: what a benchmark row was measured on."""
    import torch

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_flags": _cpu_flags(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "numpy": np.__version__,
    }
    try:
        import onnxruntime as ort

        env["onnxruntime"] = ort.__version__
        env["onnxruntime_providers"] = ort.get_available_providers()
    except ImportError:
        env["onnxruntime"] = None
        env["onnxruntime_providers"] = []
    if str(device).startswith("cuda") and torch.cuda.is_available():
        idx = torch.device(device).index or 0
        env["device_name"] = torch.cuda.get_device_name(idx)
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
    else:
        env["device_name"] = env["cpu"]
    return env


@contextmanager
def torch_threads(threads: int | None) -> Iterator[int]:
    """Set ``torch.set_num_threads`` for the block (unchanged when None) and restore it after; yields the count."""
    import torch

    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
