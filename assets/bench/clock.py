"""One timing loop for the micro-benchmarks in this folder (imported as `from clock import median_ms`: a script run as
`python assets/bench/x.py` finds its neighbours first on sys.path)."""

import time

import torch


def median_ms(fn, calls=20, warmup=3):
    """fn()'s median wall time in ms over `calls` calls, after `warmup` untimed ones (compiles, autotuning, caches).
    On a GPU the device is synced before and after each call, so a call is charged with the kernels it launched and
    none of the ones before it. The median, not the mean: a stray slow call (another process, a clock change) moves
    a mean of 20 by more than the ~0.1 ms differences these scripts compare."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(calls):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[calls // 2] * 1e3
