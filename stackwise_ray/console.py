"""What the commands show on the terminal, and where everything else goes.

The terminal gets our lines only: one live progress line per phase (stack, step, loss,
tokens/s, ETA), each phase's row of the per-stack table when it ends, warnings that
matter to the user (one line each), and errors. Ray's worker and controller lines, library
notices and Ray Train internals' tracebacks go to a log file in the run (or experiment)
directory, named in one line at start. `--verbose` leaves Ray's output on the terminal.
Without a terminal (CI, nohup) the progress line is printed as plain lines, at most one
every `PLAIN_EVERY_S` seconds per phase, with no control characters.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import warnings

import ray

from .local_files import NotRegularFileError, open_log

POLL_S = 0.5
PLAIN_EVERY_S = 10.0


class LogFileError(ValueError):
    """The command's log cannot be opened safely (a link, not a regular file); the message names it."""


@ray.remote(num_cpus=0)
class ProgressBoard:
    """Where a phase's rank-0 worker posts its progress and the driver reads it."""

    def __init__(self):
        self.posts: dict[str, dict] = {}

    def post(self, phase: str, info: dict) -> None:
        now = time.time()
        first = self.posts[phase]["first"] if phase in self.posts else {"time": now, "tokens": info["tokens"]}
        self.posts[phase] = {**info, "at": now, "first": first}

    def read(self) -> dict:
        return self.posts


def progress_text(info: dict) -> str:
    """`stack 1  step 120/200  loss 2.345  8.1k tok/s  ETA 0:07` from a phase's post;
    `stack 2  cache 4096/20000 examples  ...` from a cache build's."""
    first, step, steps = info["first"], info["step"], info["steps"]
    rate = (info["tokens"] - first["tokens"]) / max(info["at"] - first["time"], 1e-9)
    eta = (steps - step) * (info["tokens"] / max(step, 1)) / rate if rate > 0 else None
    if info.get("what") == "cache":
        parts = [f"stack {info['stack']}", f"cache {step}/{steps} examples"]
    else:
        parts = [f"stack {info['stack']}", f"step {step}/{steps}", f"loss {info['loss']:.3f}"]
    if rate > 0:
        parts.append(f"{rate / 1000:.1f}k tok/s" if rate >= 1000 else f"{rate:.0f} tok/s")
    if eta is not None:
        parts.append(f"ETA {int(eta) // 60}:{int(eta) % 60:02d}")
    return "  ".join(parts)


class Console:
    """The terminal of one command.

    Args:
        log_path: the log file for everything that is not ours (None: no redirection).
        verbose: leave Ray's and the libraries' output on the terminal.
    """

    def __init__(self, log_path: str | None = None, verbose: bool = False):
        self.out, self.err = sys.stdout, sys.stderr
        self.tty = self.out.isatty()
        self.log_path = None if verbose else log_path
        self._saved = None
        self._live = ""  # the progress line now on screen (a terminal only)
        self._printed: dict[str, float] = {}
        self._stop = threading.Event()
        self._watcher = None

    # ------------------------------------------------------------------ redirection
    def start(self) -> "Console":
        """Send file descriptors 1 and 2 (C libraries, subprocesses, and the logging handlers
        Ray made at import) and the warnings of other libraries to the log file; Python's
        sys.stdout and sys.stderr stay on the terminal (our lines, Tune's table, errors)."""
        if self.log_path is None:
            return self
        os.makedirs(os.path.dirname(self.log_path), exist_ok=True)
        try:
            log = open_log(self.log_path)  # a link planted there is refused, never written through
        except NotRegularFileError as e:
            raise LogFileError(f"{e.filename}: {e.strerror}") from None
        saved_fds = os.dup(1), os.dup(2)
        self.out = os.fdopen(os.dup(saved_fds[0]), "w", buffering=1, encoding="utf-8")
        self.err = os.fdopen(os.dup(saved_fds[1]), "w", buffering=1, encoding="utf-8")
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(log.fileno(), 1)  # C libraries and subprocesses write here
        os.dup2(log.fileno(), 2)
        self._saved = (saved_fds, sys.stdout, sys.stderr, warnings.showwarning, log)
        sys.stdout, sys.stderr = self.out, self.err
        warnings.showwarning = self._showwarning
        self.line(f"log: {self.log_path}  (Ray's and the libraries' output; --verbose shows it here)")
        return self

    def capture_ray_worker_logs(self) -> None:
        """Ray forwards every worker's and controller's lines to the driver, which prints
        them; once Ray is up, send them to the log file instead."""
        if self.log_path is None:
            return
        from ray._private import worker

        dispatcher = getattr(worker, "global_worker_stdstream_dispatcher", None)
        if dispatcher is None or not hasattr(worker, "print_worker_logs"):
            return  # another Ray version: its lines stay where Ray puts them
        log = self._saved[4]
        dispatcher.remove_handler("ray_print_logs")
        # Ray's log thread may still deliver lines after close (a command ending on an error)
        dispatcher.add_handler("ray_print_logs",
                               lambda data: None if log.closed else worker.print_worker_logs(data, log, False))

    def close(self) -> None:
        self.stop_watching()
        self._clear()
        if self._saved is None:
            return
        (fd1, fd2), stdout, stderr, showwarning, log = self._saved
        sys.stdout.flush()
        os.dup2(fd1, 1)
        os.dup2(fd2, 2)
        os.close(fd1)
        os.close(fd2)
        sys.stdout, sys.stderr, warnings.showwarning = stdout, stderr, showwarning
        log.close()
        self._saved = None

    def _showwarning(self, message, category, filename, lineno, file=None, line=None):
        if "stackwise_ray" in filename:  # ours say something the user must know
            self.line(f"warning: {message}", stream=self.err)
        else:
            self._saved[4].write(warnings.formatwarning(message, category, filename, lineno, line))

    # ------------------------------------------------------------------ our lines
    def line(self, text: str, stream=None) -> None:
        self._clear()
        print(text, file=stream or self.out, flush=True)

    def error(self, text: str) -> None:
        self.line(text, stream=self.err)

    def progress(self, key: str, text: str) -> None:
        if self.tty:
            width = max(20, _columns(self.out) - 1)
            self._live = text[:width]
            self.out.write("\r" + self._live.ljust(width))
            self.out.flush()
        elif time.time() - self._printed.get(key, 0.0) >= PLAIN_EVERY_S:
            self._printed[key] = time.time()
            print(text, file=self.out, flush=True)

    def _clear(self) -> None:
        if self._live:
            self.out.write("\r" + " " * len(self._live) + "\r")
            self.out.flush()
            self._live = ""

    # ------------------------------------------------------------------ phases
    def watch(self, board) -> None:
        """Show the progress the phases post on `board` until `stop_watching`."""
        shown: dict[str, float] = {}

        def loop():
            while not self._stop.wait(POLL_S):
                try:
                    posts = ray.get(board.read.remote(), timeout=30)
                except ray.exceptions.GetTimeoutError:  # the board's process still starting on a busy machine
                    continue
                except Exception:  # noqa: BLE001 - Ray going down: nothing left to show
                    return
                fresh = [(p["at"], key, p) for key, p in posts.items() if p["at"] > shown.get(key, 0.0)]
                for at, key, p in sorted(fresh):
                    shown[key] = at
                    if p["step"] < p["steps"]:
                        self.progress(key, progress_text(p))

        self._stop.clear()
        self._watcher = threading.Thread(target=loop, daemon=True, name="progress")
        self._watcher.start()

    def stop_watching(self) -> None:
        if self._watcher is not None:
            self._stop.set()
            self._watcher.join(timeout=10)
            self._watcher = None


def log_path(run_dir: str, name: str) -> str:
    """The command's log file: in the run directory, or, for a run on an object store, in
    this machine's temp directory (a log is written line by line)."""
    from . import storage

    if storage.is_remote(run_dir):
        import tempfile

        return os.path.join(tempfile.gettempdir(), f"stackwise_ray-{os.getuid()}", "logs",
                            f"{storage.basename(run_dir)}-{name}")
    return os.path.join(run_dir, name)


def _columns(stream) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except OSError:
        return 100
