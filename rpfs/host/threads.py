"""Work spread over threads, results taken in order: blocks decoded while the caller writes them (restore),
read and checked while it uploads them (vault push). The threads overlap waits (network, page faults) and
the parts of decoding that let go of the GIL (zstd, AES, BLAKE3)."""
from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def in_order(work: Callable[[T], R], items: Iterable[T], workers: int, ahead: int) -> Iterator[tuple[T, R]]:
    """(item, work(item)) for each item in order, computed by `workers` threads at most `ahead` items ahead of
    the caller (which bounds memory). A caller that stops early cancels what has not started."""
    window: deque = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rpfs-work") as pool:
        try:
            for item in items:
                window.append((item, pool.submit(work, item)))
                if len(window) >= ahead:
                    item, result = window.popleft()
                    yield item, result.result()
            while window:
                item, result = window.popleft()
                yield item, result.result()
        except BaseException:   # also the caller stopping early (GeneratorExit)
            pool.shutdown(wait=True, cancel_futures=True)
            raise
