"""A process pool and an order-keeping parallel map with a progress bar, for the shard tools
(``build``, ``verify``, the demo set)."""
from __future__ import annotations

from concurrent.futures import Executor, ProcessPoolExecutor
from contextlib import contextmanager
from multiprocessing import get_context
from typing import Callable, Iterator, Sequence, TypeVar

from runtime.logging import progress as progress_bar

T = TypeVar("T")
R = TypeVar("R")


@contextmanager
def worker_pool(workers: int) -> Iterator[Executor | None]:
    """A process pool of ``workers`` (spawned, so no state is inherited), or None for 1."""
    if workers <= 1:
        yield None
        return
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        yield pool


def parallel_map(fn: Callable[[T], R], items: Sequence[T], pool: Executor | None = None,
                 desc: str = "", progress: bool = True, chunksize: int = 1) -> list[R]:
    """``[fn(x) for x in items]`` in input order, on ``pool`` when given, with a progress bar."""
    results = map(fn, items) if pool is None else pool.map(fn, items, chunksize=chunksize)
    return list(progress_bar(results, total=len(items), desc=desc, enabled=progress))
