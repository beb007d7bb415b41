"""Timing, profiling and result rows shared by the benchmark scripts."""
import json
import os
import re
import time
from contextlib import contextmanager

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
    if device == "cuda":
        idle(prof)
    if os.environ.get("MOEFUSE_TRACE_DIR"):  # a Chrome/Perfetto trace per profiled step
        os.makedirs(os.environ["MOEFUSE_TRACE_DIR"], exist_ok=True)
        prof.export_chrome_trace(os.path.join(os.environ["MOEFUSE_TRACE_DIR"], re.sub(r"\W+", "_", title) + ".json"))


def idle(prof, top=8):
    """The GPU's idle time between the step's first and last kernel, and its longest gaps with the kernels around
    them: time the step spends waiting on the host rather than computing."""
    from torch.autograd import DeviceType
    ks = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                if e.device_type == DeviceType.CUDA)
    if not ks:
        return
    gaps, end = [], ks[0][1]
    for (s, e, name), prev in zip(ks[1:], ks):
        if s > end:
            gaps.append((s - end, prev[2], name))
        end = max(end, e)
    span = end - ks[0][0]
    print(f"GPU idle: {sum(g for g, _, _ in gaps) / 1e3:.3f} ms of the {span / 1e3:.3f} ms from the first kernel to "
          f"the last; longest gaps (µs, after -> before):")
    for g, a, b in sorted(gaps, reverse=True)[:top]:
        print(f"  {g:8.1f}  {a[:60]} -> {b[:60]}")


def failed(row, e):
    """Records exception e in a result row instead of ending the script: one failing implementation must not hide
    the others' numbers."""
    row["error"] = f"{type(e).__name__}: {e}"[:300]


@contextmanager
def result_row(rows, row, cuda):
    """The block fills `row` with one run's results (a failure is recorded in it: failed). Then the GPU memory the run
    cached is given back (the next run's peak memory is its own), and the row is printed as one JSON line and kept."""
    try:
        yield row
    except Exception as e:
        failed(row, e)
    if cuda:
        torch.cuda.empty_cache()
    print(json.dumps(row), flush=True)
    rows.append(row)


def save(rows, path):
    """All rows as one JSON file (what plot.py reads), when a path is given."""
    if path:
        with open(path, "w") as f:
            json.dump(rows, f, indent=1)
