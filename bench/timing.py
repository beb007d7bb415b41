"""Timing and profiling shared by the benchmark scripts."""
import time

import torch


def elapsed_ms(fn, cuda):
    """Milliseconds of one call: CUDA events on a GPU, a host clock on the CPU."""
    if cuda:
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); fn(); e.record(); e.synchronize()
        return s.elapsed_time(e)
    t0 = time.perf_counter(); fn()
    return (time.perf_counter() - t0) * 1e3


def profile(step, device, title):
    """One step under torch.profiler: where the time goes, kernel by kernel."""
    from torch.profiler import ProfilerActivity
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch.profiler.profile(activities=acts) as prof:
        step()
        if device == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    print(f"## profile: {title}", flush=True)
    print(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=90), flush=True)
