"""Starting or joining Ray, for both commands, ProgressiveTrainer and the tests.

- Which Ray: `--address`, else `ray.address`, else RAY_ADDRESS, else a new local Ray
  (`local` asks for one explicitly; `auto` joins one already running on this machine).
  A given address is probed first (a TCP connect, a few seconds): ray.init blocks for
  40 s and more on an address nothing answers at.
- Our Ray Train settings (RAY_ENV_DEFAULTS) go to every process of the job through the
  job's runtime_env: a Tune trial on a `ray start` cluster does not inherit the driver's
  environment. A variable the user set wins.
- A local Ray gets its GCS port from here, and every process of its job gets RAY_ADDRESS
  naming it: Ray's state API (Train's PlacementGroupCleaner, Ray Data) otherwise looks
  for "the" Ray of this machine, and fails with `Found multiple active Ray instances`
  while another run's Ray is up.
- SIGINT and SIGTERM end a command within seconds, status 130 (stop_on_signals).

`ray` is imported where it is used: the commands import this module before they know
whether the input lets them start Ray.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import sys
import threading
import time

from .config import ConfigError, StackWiseConfig

RAY_ENV_DEFAULTS = {
    # Train V2 polls workers every 2 s by default; a phase's teardown waits for one poll
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    # fail a phase whose workers cannot be placed instead of waiting forever
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "120",
    # Ray Train's own Prometheus metrics cost each phase ~2.4 CPU seconds on 2 CPUs (P9); a
    # phase's progress is ours (ray_metrics.py)
    "RAY_TRAIN_METRICS_ENABLED": "0",
    # the dashboard's Train page lists every phase run, its workers, status and logs
    "RAY_TRAIN_ENABLE_STATE_TRACKING": "1",
}
LOCAL_RAY_ENV_DEFAULTS = {
    # Ray starts workers at nice 15 under its own daemons; on a small machine the phase's
    # steps then lose the CPU to them (~25% slower training on 2 CPUs). Read by the
    # raylet, which inherits the environment of the driver that starts it.
    "RAY_worker_niceness": "0",
    # spot-instance preemption cannot happen to a local Ray: one actor less per phase
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}
PROBE_TIMEOUT_S = 3.0
INTERRUPTED = 130  # the shell's status for a command ended by SIGINT
PROMISED_EXIT_S = 6.0  # README: a command ends this long after a signal at the latest
EXIT_MARGIN_S = 1.0


class RayAddressError(ConfigError):
    """A Ray address nothing answers at; the message starts with where the address came from."""


def resolve_address(config: StackWiseConfig, address: str | None = None) -> tuple[str | None, str]:
    """(address, the flag, key or variable it came from); address None: start a local Ray."""
    for value, source in ((address, "--address"), (config.ray.address, "ray.address"),
                          (os.environ.get("RAY_ADDRESS"), "RAY_ADDRESS")):
        if value:
            return (None if value == "local" else value), source
    return None, ""


def probe(address: str, source: str, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Raise RayAddressError unless something accepts a TCP connection at `address`
    (host:port, ray://host:port, or auto)."""
    target = address
    if address == "auto":
        from ray._private.services import canonicalize_bootstrap_address

        try:  # what ray.init does with "auto": RAY_ADDRESS, `ray start`'s record, running GCS processes
            target = canonicalize_bootstrap_address("auto")
        except ConnectionError:
            raise RayAddressError(f"{source}: auto: no Ray is running on this machine") from None
    host, _, port = target.split("://", 1)[-1].rstrip("/").rpartition(":")
    if not host or not port.isdigit():
        raise RayAddressError(f"{source}: {address!r} is not host:port")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        reason = f"nothing answered within {timeout_s:g} s" if isinstance(e, TimeoutError) else e.strerror or str(e)
        raise RayAddressError(f"{source}: cannot reach {address} ({reason})") from None


def start(config: StackWiseConfig, address: str | None = None, **local_init):
    """Join the Ray `address` / the config / RAY_ADDRESS name (probed first), or start a
    local one with ray.init keyword arguments `local_init`. Returns ray.init's context."""
    import ray

    address, source = resolve_address(config, address)
    if address is None:
        return start_local(**local_init)
    probe(address, source)
    for key, value in RAY_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    try:
        with _keeping_our_sigterm_handler():
            return ray.init(address=address, runtime_env={"env_vars": _job_env_vars()})
    except ConnectionError as e:  # something listens there, but no Ray answers
        raise RayAddressError(f"{source}: {e}") from None


def ensure_ray(config: StackWiseConfig) -> None:
    """start(config) unless this process is already connected (a Tune trial, a command)."""
    import ray

    if not ray.is_initialized():
        start(config)


def start_local(**init_kwargs):
    """A new local Ray whose job's processes all get RAY_ADDRESS naming it (ray.init
    keyword arguments pass through). Returns ray.init's context."""
    import ray

    for key, value in {**RAY_ENV_DEFAULTS, **LOCAL_RAY_ENV_DEFAULTS}.items():
        os.environ.setdefault(key, value)
    # a job's runtime_env is fixed by ray.init, before Ray has picked a port: pick it here
    port = os.environ.get("RAY_GCS_SERVER_PORT") or str(_free_port())
    env = {**_job_env_vars(), "RAY_ADDRESS": f"127.0.0.1:{port}"}
    with _env("RAY_GCS_SERVER_PORT", port), _keeping_our_sigterm_handler():
        return ray.init(address="local", runtime_env={"env_vars": env}, **init_kwargs)


def dashboard_url(context) -> str:
    url = getattr(context, "dashboard_url", None)
    return f"http://{url}" if url else "(no dashboard: install ray[default])"


def dashboard_line(context) -> str:
    """The dashboard's URL and how to get in: Ray 2.60 asks for its token first."""
    url = dashboard_url(context)
    if not url.startswith("http") or os.environ.get("RAY_AUTH_MODE") == "disabled":
        return f"Ray dashboard: {url}"
    where = ("$RAY_AUTH_TOKEN" if os.environ.get("RAY_AUTH_TOKEN")
             else os.environ.get("RAY_AUTH_TOKEN_PATH") or "~/.ray/auth_token")
    return f"Ray dashboard: {url}  (it asks for a token: `ray get-auth-token` prints it; it is in {where})"


def _job_env_vars() -> dict:
    """Our Ray Train settings for every process of the job, the user's values where set.
    A variable a `ray job submit --runtime-env` already gives the job is left to it
    (ray.init refuses a job whose env_vars name a variable twice)."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    submitted = (json.loads(raw).get("runtime_env") or {}).get("env_vars") or {} if raw else {}
    return {key: os.environ.get(key, value) for key, value in RAY_ENV_DEFAULTS.items() if key not in submitted}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _env(key: str, value: str):
    previous = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if previous is None:
            del os.environ[key]
        else:
            os.environ[key] = previous


@contextlib.contextmanager
def _keeping_our_sigterm_handler():
    """ray.init replaces the SIGTERM handler with its own (sys.exit): put stop_on_signals' back."""
    ours = threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is _interrupt
    try:
        yield
    finally:
        if ours:
            signal.signal(signal.SIGTERM, _interrupt)


# ---------------------------------------------------------------- signals

def _interrupt(signum, frame):
    raise KeyboardInterrupt


@contextlib.contextmanager
def stop_on_signals(grace_s: float = PROMISED_EXIT_S - EXIT_MARGIN_S):
    """For a command's main (a decorator too): SIGINT and SIGTERM shut Ray down and end
    the process within PROMISED_EXIT_S seconds, with status 130.

    Python runs a signal handler only between bytecodes of the main thread, and ray.init
    can sit in C++ for 40 s and more: a watcher thread, woken by the signal itself
    (signal.set_wakeup_fd), ends the process `grace_s` after the first signal, at once
    after a second one (a local Ray's processes then end with it: Ray's reaper). The
    grace is shorter than the promise: a watcher firing at the promised second itself
    ended the process after it (the exit of a process with Ray's threads, on a loaded
    machine, takes a moment)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    settings = contextlib.ExitStack()
    if "RAY_ENABLE_AUTO_CONNECT" not in os.environ:
        # the body may still be in Ray calls in another thread (run_in_thread): after the
        # shutdown, each would start a new local Ray (Ray's auto-init; read when ray is imported)
        settings.enter_context(_env("RAY_ENABLE_AUTO_CONNECT", "0"))
    read, write = os.pipe()
    os.set_blocking(write, False)
    handlers = {s: signal.signal(s, _interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    wakeup = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    threading.Thread(target=_exit_after_signal, args=(read, grace_s), name="stop-on-signals", daemon=True).start()
    try:
        yield
    except KeyboardInterrupt:
        _say_interrupted()
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():
            ray.shutdown()
        _exit_interrupted()
    finally:
        signal.set_wakeup_fd(wakeup)
        for s, handler in handlers.items():
            signal.signal(s, handler)
        os.close(write)  # the watcher reads end-of-file and ends
        settings.close()


def _exit_after_signal(fd: int, grace_s: float) -> None:
    deadline = None
    try:
        while True:
            ready, _, _ = select.select([fd], [], [], None if deadline is None else max(0.0, deadline - time.monotonic()))
            if not ready:
                _exit_interrupted()
            data = os.read(fd, 64)
            if not data:
                return
            if {signal.SIGINT, signal.SIGTERM} & set(data):
                if deadline is not None:
                    _exit_interrupted()
                deadline = time.monotonic() + grace_s
                _say_interrupted()  # now, should the main thread be held in C++
    finally:
        os.close(fd)


_said = threading.Event()


def _say_interrupted() -> None:
    if not _said.is_set():
        _said.set()
        print("interrupted: stopping Ray (rerun with --resume to continue)", file=sys.stderr, flush=True)


def _exit_interrupted() -> None:
    """End the process now, status 130: threads still inside Ray's C++ code can hang the
    interpreter's own shutdown."""
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(INTERRUPTED)


def run_in_thread(fn, *args, **kwargs):
    """fn(*args, **kwargs) in a thread while the main thread waits for it: run in the main
    thread, Ray Train's fit and Ray Tune install their own SIGINT handlers (a graceful
    abort that the caller then sees as a failed phase), and a blocked main thread would
    take no signal at all."""
    outcome = {}

    def target():
        try:
            outcome["value"] = fn(*args, **kwargs)
        except BaseException as e:  # re-raised in the caller's thread
            outcome["error"] = e

    thread = threading.Thread(target=target, name=getattr(fn, "__name__", "command"), daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
