"""Phase locks: one run trains a phase while the others that need it wait.

On a local or mounted store the lock is `flock` on a file beside the phase (it dies with
its process, and it also holds between separate Ray clusters sharing the directory). An
object store has no locks, so there a lease is held in a named Ray actor: the holder
renews it in the background, and a holder that dies lets it lapse after `LEASE_S`.
Leases coordinate the runs of one Ray cluster (all trials of a sweep).
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import threading
import time
import uuid

import ray

LEASE_S = 30.0
LEASES_ACTOR = "stackwise_ray-leases"


class FileLock:
    def __init__(self, f):
        self._f = f

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        if self._f is not None:
            fcntl.flock(self._f, fcntl.LOCK_UN)
            self._f.close()
            self._f = None

    @classmethod
    def acquire(cls, path: str, blocking: bool) -> "FileLock | None":
        f = open(path, "a")
        try:
            fcntl.flock(f, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            return None
        return cls(f)


@ray.remote(num_cpus=0)
class Leases:
    """key -> (holder token, expiry). Async: waiting acquirers do not block the others."""

    def __init__(self):
        self.held: dict[str, tuple[str, float]] = {}

    async def acquire(self, key: str, token: str, lease_s: float, blocking: bool) -> bool:
        while True:
            holder = self.held.get(key)
            if holder is None or holder[1] < time.monotonic():
                self.held[key] = (token, time.monotonic() + lease_s)
                return True
            if not blocking:
                return False
            await asyncio.sleep(0.1)

    async def renew(self, key: str, token: str, lease_s: float) -> bool:
        if self.held.get(key, (None,))[0] != token:
            return False
        self.held[key] = (token, time.monotonic() + lease_s)
        return True

    async def release(self, key: str, token: str) -> None:
        if self.held.get(key, (None,))[0] == token:
            del self.held[key]


def leases():
    """The cluster's lease table (one detached actor, made on first use)."""
    return Leases.options(name=LEASES_ACTOR, namespace="stackwise_ray", lifetime="detached",
                          get_if_exists=True).remote()


class LeaseLock:
    def __init__(self, key: str, token: str, lease_s: float):
        self.key, self.token, self.lease_s = key, token, lease_s
        self._stop = threading.Event()
        self._renewer = threading.Thread(target=self._renew, daemon=True, name=f"lease {key}")
        self._renewer.start()

    def _renew(self) -> None:
        try:
            table = leases()
            while not self._stop.wait(self.lease_s / 3):
                if not ray.get(table.renew.remote(self.key, self.token, self.lease_s)):
                    return  # lapsed (this process stalled past its lease): nothing left to renew
        except ray.exceptions.RayError:
            return  # Ray is shutting down; the lease goes with its actor

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        if not self._stop.is_set():
            self._stop.set()
            ray.get(leases().release.remote(self.key, self.token))

    @classmethod
    def acquire(cls, key: str, blocking: bool, lease_s: float = LEASE_S) -> "LeaseLock | None":
        token = f"{os.getpid()}-{uuid.uuid4().hex}"
        if not ray.get(leases().acquire.remote(key, token, lease_s, blocking)):
            return None
        return cls(key, token, lease_s)
