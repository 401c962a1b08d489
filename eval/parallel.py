"""Independent evaluations side by side, each process with its share of the CPU threads.

A few-shot evaluation runs a small model query by query: much of its time is Python and small kernels, which a
second thread speeds up by about 1.3x on a 2-core CPU (`kensa-vl eval --task grading`: 47.7 s with two threads,
60.9 s with one). Two evaluations in two processes of one thread each finish together in about the time one takes
with both threads. A kernel's reductions depend on its thread count, so figures can differ from a one-process run's
in the last float digits (1e-6 on grading probabilities in that run; no answer changed).
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

WORKERS = 2


def side_by_side(tasks: list[tuple], workers: int | None = None) -> list:
    """Run `tasks`, each `(function, kwargs)` with a module-level `function`, in `workers` spawned processes
    (default: `WORKERS`, at most one per task and per CPU thread), each with an equal share of this process's torch
    threads; a free worker takes the next task, so put the longest first. Returns each task's result, in order. With
    one worker, or inside a distributed run (each rank already has its processes), the tasks run here in turn."""
    import torch
    from accelerate import PartialState

    threads = torch.get_num_threads()
    workers = min(workers or WORKERS, len(tasks), threads)
    if workers <= 1 or PartialState().num_processes > 1:
        return [function(**kwargs) for function, kwargs in tasks]
    spawn = multiprocessing.get_context("spawn")  # a forked copy of a process that ran torch's threads can hang
    with ProcessPoolExecutor(workers, mp_context=spawn, initializer=_threads, initargs=(threads // workers,)) as pool:
        futures = [pool.submit(function, **kwargs) for function, kwargs in tasks]
        try:
            return [future.result() for future in futures]
        except BrokenProcessPool as err:  # a worker died (killed for memory, a crash in native code): say where
            lost = [f.__name__ for (f, _), future in zip(tasks, futures, strict=True) if _broken(future)]
            raise RuntimeError(
                "a worker process ended abruptly (killed, e.g. for memory, or crashed in native code) while these "
                f"tasks were unfinished: {', '.join(lost)}"
            ) from err


@dataclass(frozen=True)
class timed:
    """A task's function that also says where the time went: `timed(function)(**kwargs)` is `(function(**kwargs),
    the seconds it took)`, under the function's own name."""

    function: Callable

    @property
    def __name__(self) -> str:
        return self.function.__name__

    def __call__(self, **kwargs) -> tuple:
        began = time.perf_counter()
        return self.function(**kwargs), time.perf_counter() - began


def _broken(future) -> bool:
    return isinstance(future.exception(), BrokenProcessPool)


def _threads(count: int) -> None:
    import torch

    torch.set_num_threads(count)
