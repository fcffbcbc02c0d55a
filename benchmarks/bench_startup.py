# Time to first step: from process start to the first progress line of a training job, and each command's --help.
"""What a user waits for before anything trains.

    OMP_NUM_THREADS=2 python benchmarks/bench_startup.py                      # every case, 3 repeats
    OMP_NUM_THREADS=2 python benchmarks/bench_startup.py --cases single ddp --repeats 5

Training cases run the smoke recipe (recipes/smoke_synthetic.yaml) as a user would, in a fresh process
(`python launch/train.py`, or torchrun with 2 ranks and gloo for ddp, zero2 and fsdp), into a scratch run folder,
printing a progress line every step (run.log_every=1) for 2 steps (then its final verification). The clock starts when the launcher process is
started and stops at the first `step 1/` line on its stdout; each line of output is time-stamped, so the record
also says when the recipe was loaded (the `run folder:` line), when everything was built (`progress every`) and
when the job ended. The help cases time `python launch/NAME.py --help` to its exit. Each case is repeated and the
median is reported, with the 1-minute load average before each case.

The JSON goes to benchmarks/results/startup_cpu.json (a new time-stamped file beside a committed one, see
results_file.py). Targets (issue 25): single-engine first step under 6 s, every --help under 2 s, at idle.
"""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from results_file import results_path, write_results  # noqa: E402
from toolkit.command_line import CommandParser  # noqa: E402

SMOKE = "recipes/smoke_synthetic.yaml"
ENGINES = {"single": [], "ddp": ["parallel.engine=ddp"],
           "zero2": ["parallel.engine=deepspeed", "parallel.zero_stage=2"], "fsdp": ["parallel.engine=fsdp"]}
COMMANDS = ("train", "evaluate", "convert", "prepare_data", "plan")
# Two steps (125 per epoch), a line each; then the run's final verification, which the first step does not wait for.
QUICK_RUN = ["run.log_every=1", "train.num_epochs=0.016", "checkpoint.save_final=false", "run.trackers=[]",
             "data.synthetic.num_val_identities=10", "data.synthetic.num_val_pairs=20"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launcher(case: str) -> list[str]:
    if case == "single":
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
            f"--master_port={free_port()}"]


def timed_lines(command: list[str], timeout_s: float) -> tuple[list[tuple[float, str]], float, int, str]:
    """Run `command`; (each stdout line with its seconds since start, seconds to exit, exit status, stderr tail)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    errors: list[str] = []
    reader = threading.Thread(target=lambda: errors.extend(proc.stderr), daemon=True)
    reader.start()
    lines = []
    for line in proc.stdout:
        lines.append((time.perf_counter() - start, line.rstrip("\n")))
    status = proc.wait(timeout=timeout_s)
    ended = time.perf_counter() - start
    reader.join(timeout=5)
    return lines, ended, status, "".join(errors)[-2000:]


def first(lines: list[tuple[float, str]], prefix: str) -> float | None:
    return next((at for at, text in lines if text.startswith(prefix)), None)


def training_case(case: str, scratch: Path, timeout_s: float) -> dict:
    overrides = [*ENGINES[case], *QUICK_RUN, f"run.output_dir={scratch}", f"run.name={case}"]
    command = [*launcher(case), "launch/train.py", "--recipe", SMOKE,
               *(item for override in overrides for item in ("--set", override))]
    lines, ended, status, errors = timed_lines(command, timeout_s)
    if status != 0:
        raise SystemExit(f"error: {case} ended with exit status {status}:\n{errors}")
    first_step = first(lines, "step 1/")
    if first_step is None:
        raise SystemExit(f"error: {case} printed no 'step 1/' line:\n" + "\n".join(text for _, text in lines[-20:]))
    # run folder: the recipe is loaded and checked; progress every: data, model, engine and head are built
    return {"first_line_s": first(lines, "run folder:"), "built_s": first(lines, "progress every"),
            "first_step_s": first_step, "exit_s": ended}


def help_case(command: str, timeout_s: float) -> dict:
    lines, ended, status, errors = timed_lines([sys.executable, f"launch/{command}.py", "--help"], timeout_s)
    if status != 0 or not lines or not lines[0][1].startswith("usage:"):
        raise SystemExit(f"error: {command} --help failed (status {status}):\n{errors}")
    return {"exit_s": ended}


def median_record(records: list[dict]) -> dict:
    keys = [key for key in records[0] if all(record[key] is not None for record in records)]
    return {key: statistics.median(record[key] for record in records) for key in keys}


def main(argv: list[str] | None = None) -> int:
    cases = [*ENGINES, *(f"help:{name}" for name in COMMANDS)]
    parser = CommandParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="+", default=cases, choices=cases, help="what to time")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each case (the median is reported)")
    parser.add_argument("--timeout-s", type=float, default=600.0, help="limit per run")
    parser.add_argument("--json", type=Path, default=None,
                        help="output (default benchmarks/results/startup_cpu.json, or a new time-stamped file "
                             "beside it when that exists)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    output = results_path(args.json, "startup_cpu", overwrite=args.overwrite)
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    print(f"bench_startup: {' '.join(args.cases)}; {args.repeats} repeats; OMP_NUM_THREADS={threads}; "
          f"{os.cpu_count()} CPUs", flush=True)
    results = {}
    for case in args.cases:
        runs, loads = [], []
        for _ in range(args.repeats):
            loads.append(os.getloadavg()[0])
            if case.startswith("help:"):
                runs.append(help_case(case.removeprefix("help:"), args.timeout_s))
            else:
                with tempfile.TemporaryDirectory(prefix=f"facecl-startup-{case}-") as scratch:
                    runs.append(training_case(case, Path(scratch), args.timeout_s))
        results[case] = {"median": median_record(runs), "runs": runs, "load_average_before": loads}
        shown = ", ".join(f"{key} {value:.2f} s" for key, value in results[case]["median"].items())
        print(f"{case}: {shown} (median of {args.repeats}; load before {min(loads):.2f}-{max(loads):.2f})",
              flush=True)
    write_results(output, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
