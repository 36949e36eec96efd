"""Fair peer timings on a shared machine: each peer at its best thread count, and the load beside every figure.

On a busy machine a library set to every core can be several times slower than at one thread (transformers
ran at 4.6-4.9 tok/s on all cores against 23-24 with one thread while other work ran), which made our ratio
look 10x where it was 1.3x. So the benchmarks time torch at every thread count in 1..cores and keep the
fastest (`best_thread_count`), and print the load average (`load_field`) on every line with a figure.

JAX (XLA:CPU) sizes its thread pool once, when the backend starts, so our side cannot be searched in the same
process: it runs as it starts (all cores), and the benchmarks say so (`xla_threads_note`).
"""

from __future__ import annotations

import os
from typing import Callable, Iterable, Sequence


def thread_counts(cores: int | None = None) -> list[int]:
    """1..cores (default: this machine's cores)."""
    return list(range(1, max(1, cores or os.cpu_count() or 1) + 1))


def best_thread_count(run: Callable[[int], float], counts: Iterable[int]) -> tuple[int, dict[int, float]]:
    """Calls run(k) for each thread count k (fewest first) and returns (the fastest k, {k: seconds}).

    run(k) sets the library to k threads, times the work and returns its seconds. A tie goes to fewer threads
    (a larger count must be strictly faster to win)."""
    seconds_by_count: dict[int, float] = {}
    for count in sorted(set(counts)):
        seconds_by_count[count] = float(run(count))
    if not seconds_by_count:
        raise ValueError("best_thread_count: no thread counts to try")
    best = min(seconds_by_count, key=lambda count: (seconds_by_count[count], count))
    return best, seconds_by_count


def format_search(best: int, seconds_by_count: dict[int, float]) -> str:
    """'threads=2 searched=1:0.512s,2:0.431s': the count kept and every count's seconds."""
    tried = ",".join(f"{count}:{seconds:.3g}s" for count, seconds in sorted(seconds_by_count.items()))
    return f"threads={best} searched={tried}"


def load_field(load: Sequence[float] | None = None) -> str:
    """'load=1.23,0.98,0.77': the 1, 5 and 15 minute load averages (default: os.getloadavg() now)."""
    if load is None:
        try:
            load = os.getloadavg()
        except OSError:  # not available on this platform
            return "load=unknown"
    return "load=" + ",".join(f"{value:.2f}" for value in load)


def search_torch_threads(time_at: Callable[[], float], counts: Iterable[int]) -> tuple[int, dict[int, float]]:
    """best_thread_count for torch: before each time_at() call torch runs at k threads (torch.set_num_threads);
    torch is left at the best count."""
    import torch

    def run(count: int) -> float:
        torch.set_num_threads(count)
        return time_at()

    best, seconds = best_thread_count(run, counts)
    torch.set_num_threads(best)
    return best, seconds


def xla_threads_note() -> str:
    """What our side runs with on CPU: XLA's pool is fixed at process start."""
    return (f"jax: XLA:CPU sizes its thread pool once at process start ({os.cpu_count()} cores here), so ours is "
            "timed as it starts, not searched")
