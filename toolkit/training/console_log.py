# train.log: what rank 0's console shows, kept in the run folder (appended by every run or resume of it).
"""The run's console, copied to RUN/train.log as the user saw it.

`ConsoleLog.start()` is called first thing by launch/train.py on rank 0: from then on everything Python writes
to sys.stdout and sys.stderr (the toolkit's lines, warnings, library messages, the final `error:` line) also
goes to a buffer in memory, because the run folder is only created once the model is built and a resume is
accepted (nothing is written for a run that is refused). `attach(run_dir)` then appends the buffer to
RUN/train.log behind a header line (UTC time, host, pid, command line) and keeps appending until the process
ends. A resumed run appends to the same file, so the log of a run that was stopped and continued reads as one.
Not in it: what other ranks print, and output that bypasses Python's sys.stdout (C++ libraries writing to
file descriptor 1 or 2 directly).
"""
from __future__ import annotations

import atexit
import io
import os
import socket
import sys
import time
from pathlib import Path

LOG_FILE = "train.log"


class _Tee(io.TextIOBase):
    """A text stream that writes to the console stream it replaces and to the log (memory, then the file)."""

    def __init__(self, console, log: "ConsoleLog"):
        self.console, self.log = console, log

    def write(self, text: str) -> int:
        self.log.record(text)
        return self.console.write(text)

    def flush(self) -> None:
        self.console.flush()
        self.log.flush()

    def isatty(self) -> bool:
        return self.console.isatty()

    def fileno(self) -> int:
        return self.console.fileno()

    @property
    def encoding(self):
        return self.console.encoding


class ConsoleLog:
    """Tees sys.stdout and sys.stderr into train.log (see the module docstring)."""

    def __init__(self):
        self._pending: list[str] = []
        self._file = None

    @classmethod
    def start(cls) -> "ConsoleLog":
        log = cls()
        sys.stdout, sys.stderr = _Tee(sys.stdout, log), _Tee(sys.stderr, log)
        atexit.register(log.close)
        return log

    def record(self, text: str) -> None:
        if self._file is not None:
            self._file.write(text)
        else:
            self._pending.append(text)

    def attach(self, run_dir: Path) -> Path:
        """Append what the console showed so far, and everything from now on, to run_dir/train.log."""
        path = Path(run_dir) / LOG_FILE
        self._file = open(path, "a", encoding="utf-8", buffering=1)   # line-buffered: a killed run keeps its lines
        command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
        self._file.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())} | {socket.gethostname()} "
                         f"pid {os.getpid()} | {command}\n")
        self._file.write("".join(self._pending))
        self._pending.clear()
        return path

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
