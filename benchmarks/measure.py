# Measurement helpers shared by the benchmarks: peak allocator memory of one step (CPU or CUDA), quiet stderr.
from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path

import torch


def peak_bytes(run, device: str) -> int:
    """Peak bytes allocated above the starting point while `run()` runs: on a GPU torch.cuda's peak statistic,
    on a CPU the peak of the allocator's running total read from torch.profiler's memory events."""
    if device == "cuda":
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    with tempfile.TemporaryDirectory() as folder:
        trace = Path(folder) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    memory = [event["args"] for event in events
              if event.get("name") == "[memory]" and event["args"].get("Device Type", 0) == 0]
    if not memory:
        return 0
    # The running total may carry allocations of earlier profiles freed outside them: count from this start.
    start = memory[0]["Total Allocated"] - memory[0]["Bytes"]
    return max(0, max(record["Total Allocated"] for record in memory) - start)


@contextlib.contextmanager
def silenced_stderr():
    """Redirects file descriptor 2 (C++ libraries write there directly) to /dev/null."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
