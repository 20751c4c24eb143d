"""Shared pieces of the benchmarks: the upstream grouped-conv NOAH head, interleaved timing, memory.

Timings are taken side by side in one process: every round runs each candidate once, in a
rotating order, and a figure is the median over rounds of the per-round ratio (candidate time /
anchor time of the same round), so load from other processes that drifts over seconds hits both
sides of a ratio alike. The spread printed with it is the inter-quartile range of those ratios.
"""
import gc
import os
import platform
import resource
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn


class GroupedConvNoahHead(nn.Module):
    """NOAH as published: two grouped 1x1 convolutions, softmax over tokens and dropout on the
    materialised (B, N*K, L) values, product summed over tokens and groups.

    Reuses the `query` / `value` convolutions of a NoahHead, so both compute the same function.
    Takes the (B, L, C) tokens the NoahHead takes.
    """

    def __init__(self, noah_head: nn.Module):
        super().__init__()
        self.query = noah_head.query
        self.value = noah_head.value
        self.num_heads = noah_head.num_heads
        self.num_classes = noah_head.num_classes
        self.key_chs = noah_head.key_chs
        self.kv_split = noah_head.kv_split
        self.drop = nn.Dropout(noah_head.drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        fmap = x.transpose(1, 2).reshape(B, C, L, 1)  # tokens as a (B, C, L, 1) feature map
        if self.kv_split:
            xk, xv = fmap[:, :self.key_chs], fmap[:, self.key_chs:]
        else:
            xk = xv = fmap
        q = self.query(xk).reshape(B, self.num_heads, self.num_classes, L)
        v = self.value(xv).reshape(B, self.num_heads, self.num_classes, L)
        a = q.softmax(dim=-1)
        v = self.drop(v)
        return (a * v).sum(dim=(1, 3))


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    cpu = line.split(':', 1)[1].strip()
                    break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, 'getloadavg') else (float('nan'),) * 3
    return (f'{cpu}; {os.cpu_count()} logical CPUs; torch {torch.__version__} with '
            f'torch.set_num_threads({torch.get_num_threads()}); CPU capability '
            f'{torch.backends.cpu.get_cpu_capability()}; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}')


def interleaved_times(fns: Dict[str, Callable[[], None]], rounds: int, warmup: int = 1,
                      device: Optional[torch.device] = None) -> Dict[str, List[float]]:
    """Seconds per call of every candidate, `rounds` times each, candidates alternating.

    On a CUDA `device` each call is timed with CUDA events on the current stream (the host only
    queues the work), after a synchronize that keeps the previous candidate's work out of it.
    """
    cuda = device is not None and torch.device(device).type == 'cuda'
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate who goes first
        for name in order:
            gc.collect()
            if cuda:
                torch.cuda.synchronize(device)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fns[name]()
                end.record()
                end.synchronize()
                times[name].append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fns[name]()
                times[name].append(time.perf_counter() - t0)
    return times


def peak_memory_growth(fn: Callable[[], None], device: torch.device) -> int:
    """Bytes above the memory held before `fn` at its peak: CUDA's allocator statistics on a GPU,
    the process's peak RSS (VmHWM, in-process: a rough figure) on the CPU."""
    device = torch.device(device)
    gc.collect()
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    before = current_rss()
    reset_peak_rss()
    fn()
    return peak_rss() - before


def quartiles(values: Sequence[float]):
    if len(values) < 4:
        m = statistics.median(values)
        return min(values), m, max(values)
    q = statistics.quantiles(values, n=4, method='inclusive')
    return q[0], q[1], q[2]


def paired_ratio(times: Dict[str, List[float]], name: str, anchor: str):
    """(median, q1, q3) over rounds of times[name][r] / times[anchor][r]."""
    return quartiles([a / b for a, b in zip(times[name], times[anchor])])


def saved_tensor_bytes(fn: Callable[[], torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd saves for backward while `fn` runs its forward."""
    storages = {}

    def pack(t: torch.Tensor):
        s = t.untyped_storage()
        storages[(s.data_ptr(), s.device)] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(storages.values())


def current_rss() -> int:
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def reset_peak_rss() -> None:
    """Linux: make the peak RSS (VmHWM) restart from the current RSS (no-op where unsupported)."""
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
    except OSError:
        pass


def peak_rss() -> int:
    """Peak resident set size of this process (since the last reset_peak_rss on Linux)."""
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('VmHWM:'):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def mib(n: float) -> str:
    return f'{n / 2 ** 20:.1f} MiB'
