"""Content-addressed phases: a finished phase is reused by any run or trial that needs it.

A phase's identity hashes exactly what can change what phases 0..k produce, as each
config field declares it (config.setting): every HASHED setting; the TRUNK settings
(trunk strategy, building mode, trunk adapters, new_stack_init) once there is a trunk;
and, per stack 0..k, what its plan says (blocks, precision, side, LoRA rank/alpha, time
step, and the cache dtype where it rounds), which is where the PLANNED settings arrive.
IGNORED settings (target_stacks, cache backend and sizes, storage, logging, the tune and
tracking sections) are in no id, so a sweep over later-stack strategies shares its common
early phases. The data's content enters through its token store's key.

Layout under the store root:
    <id>/<run>/checkpoint_*/  the Ray Train run of the phase (named after experiment, trial, stack)
    <id>/done.json       completion record, written atomically after the phase
    <id>.lock            held (flock) by the run training that phase (an object store:
                         a lease in a Ray actor, locks.py)
    identity.json        {"version": IDENTITY_VERSION}: how the ids in this store were made
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from typing import Callable

from . import storage
from .checkpoint import CorruptCheckpointError, load_metadata, verify_checkpoint
from .config import HASHED, TRUNK, StackWiseConfig
from .errors import clip
from .locks import FileLock, LeaseLock
from .plan import PhasePlan

# 2: ids from the fields' declarations (before: a list of keys left out); a store of another
# version is not reused (its phases are trained again, with one warning)
IDENTITY_VERSION = 2
VERSION_FILE = "identity.json"


def declared_settings(config, identities: tuple[str, ...], prefix: str = "", hashing: bool = False) -> dict:
    """{key path: value} of every setting of `config` (a section) whose declared identity is
    one of `identities`, sections walked in order. `hashing`: without the settings added
    since the stores of IDENTITY_VERSION were made that hold their default (which does
    what those stores' phases did), so those stores keep their ids."""
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            out.update(declared_settings(value, identities, f"{prefix}{f.name}.", hashing))
        elif f.metadata["identity"] in identities and not (hashing and f.metadata.get("added") and value == f.default):
            out[prefix + f.name] = value
    return out


def phase_identity(config: StackWiseConfig, plans: list[PhasePlan], k: int, data_key: str | None = None) -> str:
    """The id of phase k of `plans` (plan.plan_phases): a hash of everything that
    determines its weights and reported numbers. The data enters as config.data and
    `data_key` (the token store's key, a hash of the source's content), so an edited file
    at the same path never reuses a phase."""
    stacks = [{
        "n_blocks": plan.n_blocks, "precision": plan.precision,
        "at_input_side": plan.at_input_side if j > 0 else None,  # a first stack has no side
        "lora": plan.lora, "time_step": plan.time_step,
        "cache_dtype": plan.cache.dtype if plan.cache.rounds else None,
    } for j, plan in enumerate(plans[:k + 1])]
    parts = {
        "version": IDENTITY_VERSION,
        "settings": declared_settings(config, (HASHED, TRUNK) if k > 0 else (HASHED,), hashing=True),
        "stacks": stacks,
        "data_content": data_key,
    }
    if config.training.lr_schedule != "per_phase":  # a run-wide schedule spans every phase the run trains
        parts["run_phases"] = len(plans)
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
    return f"s{k:02d}-{digest[:16]}"


class PhaseStore:
    """The phases under `root`: a local or mounted directory, or an object-store URI
    (storage.py)."""

    def __init__(self, root: str):
        self.root = root  # made by the first lock or write: a run refused before it starts writes nothing

    def record(self, phase_id: str, plans: list[PhasePlan] | None = None) -> dict | None:
        """The completion record of a finished phase whose checkpoint is intact, or None. A
        phase whose record cannot be read, names a checkpoint outside the phase's own
        directory, or whose checkpoint fails its checksums or holds other stacks than
        `plans` (the phase's plans, stack 0 to its own) is forgotten (and so trained again)."""
        path = self._record_path(phase_id)
        record = None if self._is_link(path) else self._read(path)  # a link could make us read anything
        if record is None:
            if storage.exists(path) or self._is_link(path):
                warnings.warn(f"phase {phase_id} is trained again: {path} is not a completion record")
                self._forget(path)
            return None
        checkpoint = self._inside(phase_id, record["checkpoint"])
        problem = ("its done.json names a checkpoint outside the phase's directory: "
                   f"{clip(str(record['checkpoint']))}") if checkpoint is None else self._unusable(checkpoint, plans)
        if problem is not None:
            warnings.warn(f"phase {phase_id} is trained again: {problem}")
            self._forget(path)
            return None
        record["checkpoint"] = checkpoint
        return record

    def _inside(self, phase_id: str, relative: str) -> str | None:
        """The location of `relative` (as finish wrote it: `<phase id>/<run>/checkpoint_*`),
        or None where it leaves `<root>/<phase id>/`: an absolute path, a URI, `..`, or a
        link inside the phase directory that points out of it."""
        parts = relative.split("/")
        if len(parts) < 2 or parts[0] != phase_id or any(p in ("", ".", "..") or "\\" in p for p in parts):
            return None  # absolute paths and URIs start with an empty part or a scheme
        location = storage.join(self.root, *parts)
        if not storage.is_remote(self.root):
            phase_dir = os.path.realpath(os.path.join(self.root, phase_id))
            if os.path.commonpath([os.path.realpath(location), phase_dir]) != phase_dir:
                return None
        return location

    @staticmethod
    def _unusable(checkpoint: str, plans: list[PhasePlan] | None) -> str | None:
        """Why a checkpoint cannot stand for the phase, or None: it must pass its checksums
        and hold the stacks the phase's plans describe (the count, and each stack's blocks,
        precision, time step and side)."""
        try:
            verify_checkpoint(checkpoint)
            meta = load_metadata(checkpoint) if plans is not None else {}
        except (CorruptCheckpointError, OSError, ValueError) as e:
            return str(e)
        if plans is None:
            return None
        stored, steps = meta.get("plan"), meta.get("time_steps")
        if not isinstance(stored, list) or not isinstance(steps, dict) or len(stored) != len(plans):
            return f"{checkpoint} holds {len(stored) if isinstance(stored, list) else 'no'} stacks; the phase has {len(plans)}"
        for k, (s, p) in enumerate(zip(stored, plans)):
            # a first stack has no side (phase_identity): a reusing run may build the other way
            if (not isinstance(s, dict) or (s.get("n_blocks"), s.get("precision")) != (p.n_blocks, p.precision)
                    or (k > 0 and s.get("at_input_side") != p.at_input_side) or steps.get(str(k)) != p.time_step):
                return f"{checkpoint}: stack {k} is not the one the phase's plan describes"
        return None

    def _is_link(self, path: str) -> bool:
        return not storage.is_remote(path) and os.path.islink(path)

    def _forget(self, path: str) -> None:
        """Remove a completion record (a link: the link itself, never what it points at)."""
        if self._is_link(path):
            os.unlink(path)
        else:
            storage.remove(path)

    def _record_path(self, phase_id: str) -> str:
        return storage.join(self.root, phase_id, "done.json")

    @staticmethod
    def _read(path: str) -> dict | None:
        """The record at `path` if it is there and well formed (flipped bytes, a truncated
        write or a missing key make it no record)."""
        try:
            record = storage.read_json(path)
        except (OSError, ValueError, RecursionError):  # missing, not a directory (a lock file); garbled
            return None
        if not isinstance(record, dict) or not isinstance(record.get("checkpoint"), str) \
                or not isinstance(record.get("metrics"), dict):
            return None
        return record

    def finish(self, phase_id: str, record: dict) -> None:
        """Write the completion record; checkpoint paths are stored relative to the store,
        so a store can be moved or mounted elsewhere."""
        record = {**record, "checkpoint": storage.relative(record["checkpoint"], self.root)}
        storage.write_json(self._record_path(phase_id), record)
        if not storage.exists(storage.join(self.root, VERSION_FILE)):
            storage.write_json(storage.join(self.root, VERSION_FILE), {"version": IDENTITY_VERSION})

    def check_version(self) -> None:
        """Warn, in one line, where this store holds phases identified another way (a store
        written before identity version 2): their ids cannot match, so they are trained again
        rather than reused wrongly."""
        try:
            version = storage.read_json(storage.join(self.root, VERSION_FILE)).get("version")
        except (OSError, ValueError, AttributeError):
            version = None
        if version != IDENTITY_VERSION and self.finished_count():
            warnings.warn(f"phase store {self.root}: its {self.finished_count()} finished phases have ids of phase identity "
                          f"version {version or 1}, this is version {IDENTITY_VERSION}: none is reused, phases are trained "
                          "again")

    def claim(self, phase_id: str) -> "FileLock | LeaseLock":
        """The phase's lock (release it when done, or use it as a context manager): a
        second run needing the same phase waits here, then finds it finished. A crashed
        owner blocks no one (locks.py)."""
        return self._lock(phase_id, blocking=True)

    def try_claim(self, phase_id: str) -> "FileLock | LeaseLock | None":
        """The phase's lock if no one holds it (release it when done), else None."""
        return self._lock(phase_id, blocking=False)

    def _lock(self, phase_id: str, blocking: bool):
        if storage.is_remote(self.root):
            return LeaseLock.acquire(storage.join(self.root, phase_id), blocking)
        os.makedirs(self.root, exist_ok=True)
        return FileLock.acquire(os.path.join(self.root, f"{phase_id}.lock"), blocking)

    def train_once(self, phase_id: str, train: Callable[[str | None], tuple[dict, str]],
                   claim=None, plans: list[PhasePlan] | None = None) -> tuple[dict, str]:
        """(record, status) of phase `phase_id`, trained at most once across runs: "reused"
        where it is finished; else, under its claim (`claim`: one the caller holds
        already), `train(checkpoint)` returns its record and status ("recovered" or
        "trained"), which is written as the phase's completion record. `checkpoint` is one a
        run of the phase wrote before a crash that came before its record, or None. `plans`
        (the phase's, stack 0 to its own): what a reused or recovered checkpoint must hold."""
        record = self.record(phase_id, plans)
        if record is not None:
            return record, "reused"
        with claim if claim is not None else self.claim(phase_id):
            record = self.record(phase_id, plans)  # another run may have finished it while we waited
            if record is not None:
                return record, "reused"
            record, status = train(self.finished_checkpoint(phase_id, plans))
            self.finish(phase_id, record)
        return record, status

    def finished_checkpoint(self, phase_id: str, plans: list[PhasePlan] | None = None) -> str | None:
        """A checkpoint that a run of phase `phase_id` wrote whole, with its final metrics
        (e.g. before a crash that came before its record), inside the phase's directory and
        holding the stacks of `plans` where given, or None."""
        phase = storage.join(self.root, phase_id)
        runs = [storage.join(phase, d) for d in storage.listdir(phase)]
        checkpoints = sorted((c, run) for run in runs for c in storage.listdir(run) if c.startswith("checkpoint_"))
        for path in [storage.join(run, c) for c, run in reversed(checkpoints)]:
            if self._inside(phase_id, storage.relative(path, self.root).replace(os.sep, "/")) is None:
                continue  # a link out of the phase's directory
            try:
                if self._unusable(path, plans) is None and "metrics" in load_metadata(path):
                    return path
            except (OSError, KeyError, ValueError):  # incomplete, corrupt or in-phase: not a finished phase
                continue
        return None

    def clear(self, phase_id: str) -> None:
        """Remove what unfinished runs of the phase left (before a run of it starts afresh)."""
        storage.remove(storage.join(self.root, phase_id))

    def has_record(self, phase_id: str) -> bool:
        """A readable completion record is there (cheap: its checkpoint is not verified;
        `record` does)."""
        return self._read(self._record_path(phase_id)) is not None

    def finished_count(self) -> int:
        return sum(1 for d in storage.listdir(self.root) if "." not in d and self.has_record(d))  # not locks, markers
