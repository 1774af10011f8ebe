"""The one thread that runs the process's tensor work: model loads, engine steps, reward scoring.

Why one: torch splits a CPU op across cores with OpenMP (libgomp), and each thread that starts
a parallel region gets a team of worker threads of its own. Once the process holds more such
threads than it has cores, libgomp stops letting idle workers spin (its throttled spin count)
and parks them on a futex, so each of a decode step's hundreds of parallel regions pays a
wake-up. On a 2-core Xeon a 1-row step of the embedded model went from 38 to 55 ms, and a
16-row step from 52 to 79 ms, as soon as a second thread had run tensor work
(bench/omp_teams.py). Work submitted from one thread keeps one team.

`call` runs a function there and waits (a plain call when already there); `run` awaits it from
an event loop. Everything queued runs in order, one at a time, which on a CPU is what the cores
allow anyway.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None
_ident: int | None = None


def _remember_thread() -> None:
    global _ident
    _ident = threading.get_ident()


def executor() -> ThreadPoolExecutor:
    """The process's compute thread, as an executor (created on first use, never shut down)."""
    global _executor
    with _lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="alignserve-compute",
                                           initializer=_remember_thread)
        return _executor


def on_compute_thread() -> bool:
    return _ident is not None and threading.get_ident() == _ident


def call(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """fn(*args, **kwargs) on the compute thread; blocks the caller until it returns."""
    if on_compute_thread():
        return fn(*args, **kwargs)
    return executor().submit(fn, *args, **kwargs).result()


def pinned(fn: Callable[..., T]) -> Callable[..., T]:
    """`fn`, always run on the compute thread (through `call`); the plain function stays at
    `__wrapped__` for a caller that means to run it elsewhere (bench/omp_teams.py)."""
    @functools.wraps(fn)
    def on_compute(*args: Any, **kwargs: Any) -> T:
        return call(fn, *args, **kwargs)

    return on_compute


async def run(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """Await fn(*args, **kwargs) run on the compute thread (asyncio.to_thread's place). An event
    loop that itself runs on the compute thread (a script handed whole to `call`) runs fn in
    place: queued behind the loop's own thread, it would wait forever."""
    if on_compute_thread():
        return fn(*args, **kwargs)
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(executor(), functools.partial(fn, *args, **kwargs))
