"""Timing, peak-memory and per-component helpers shared by the benchmarks and the ablation (CPU and GPU)."""

from __future__ import annotations

import ctypes
import statistics
import threading
import time
from collections import defaultdict
from pathlib import Path

import torch


def timed(fn, repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time of `fn()` in seconds, after `warmup` calls (GPU work is synchronised)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class PeakMemory:
    """Peak memory of the block above what was in use when it started, in bytes (`.peak`).

    On a GPU: `torch.cuda.max_memory_allocated`. On a CPU: the process's resident set, sampled every millisecond
    by a thread (torch releases the GIL in its kernels), after glibc has returned freed memory (`malloc_trim`), so
    short spikes between samples can be missed; good to a few MB, enough for ratios between models."""

    def __enter__(self) -> PeakMemory:
        self.peak = 0
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            return self
        import psutil

        _trim()
        self._process = psutil.Process()
        self._base = self._high = self._process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._high = max(self._high, self._process.memory_info().rss)
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self._base
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(self._high, self._process.memory_info().rss) - self._base


def _trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: the baseline may then include freed memory
        pass


def cpu_model() -> str:
    """The CPU's model name and its widest vector instructions (AVX2, AVX-512, AMX change CPU timings 2-3x)."""
    import platform

    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    fields = {}
    for line in info.splitlines():  # the first processor's fields
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields:  # a virtual machine's name can be generic ("Intel(R) Xeon(R) Processor")
        name += f", family {fields['cpu family']} model {fields.get('model')}"
    flags = set(fields.get("flags", "").split())
    isa = [label for flag, label in (("avx2", "AVX2"), ("avx512f", "AVX-512"), ("amx_tile", "AMX")) if flag in flags]
    return f"{name} ({', '.join(isa) or 'no AVX2'})"


def machine() -> str:
    """One line for BENCHMARKS.md: device with the CPU model, torch and transformers versions, threads, date."""
    import psutil
    import transformers

    device = f"{psutil.cpu_count()}-core {cpu_model()}"
    if torch.cuda.is_available():
        device = f"{torch.cuda.get_device_name()}, {device}"
    return (
        f"{device}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"transformers {transformers.__version__}, {time.strftime('%Y-%m-%d')}"
    )


def component_times(model, inputs: dict) -> dict[str, float]:
    """Seconds spent inside each of the backbone's top-level components during one forward (the rest: glue)."""
    backbone, spent, handles = model.model, defaultdict(float), []
    parts = {f"tower {n}": m for n, m in backbone.vision_towers.items()}
    parts.update({"projector": backbone.multi_modal_projector, "language model": backbone.language_model})
    if getattr(backbone, "reference_comparison", None) is not None:
        parts["reference comparison"] = backbone.reference_comparison
    for name, module in parts.items():
        starts = []
        handles.append(module.register_forward_pre_hook(lambda *_, s=starts: s.append(time.perf_counter())))
        handles.append(
            module.register_forward_hook(
                lambda *_, s=starts, n=name: spent.__setitem__(n, spent[n] + time.perf_counter() - s.pop())
            )
        )
    try:
        start = time.perf_counter()
        model(**inputs)
        total = time.perf_counter() - start
    finally:
        for handle in handles:
            handle.remove()
    return {**spent, "other (glue: tiling bookkeeping, scatter, LM head)": total - sum(spent.values()), "total": total}
