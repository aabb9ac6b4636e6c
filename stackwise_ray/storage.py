"""Where runs live: a local or mounted directory, or a URI that pyarrow's filesystem layer
understands (`s3://bucket/prefix`, `gs://bucket/prefix`, `hdfs://...`, with pyarrow's query
options such as `?endpoint_override=host:9000&scheme=http`). Completion records, phase
checkpoints, Arrow caches and sweep results all go through these functions, and Ray Train
writes its checkpoints to the same location through the same layer.

A location is a string: a local path, or a URI. Readers that need a real file (safetensors,
a memory-mapped Parquet cache) call `local_path`, which downloads a remote file or
directory once per node into a local cache keyed by what was listed there.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import posixpath
import shutil
import subprocess
import sys
import tempfile
import uuid
from urllib.parse import urlsplit, urlunsplit

import pyarrow.fs as pafs

from .errors import ConfigError, clip, first_line, show

# the schemes pyarrow.fs.FileSystem.from_uri resolves (file:// is made a local path)
SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")
TOKENS_DIR = "tokens"  # <storage path>/tokens holds the token stores (data/token_store.py)
# a URI's probe gets this long: pyarrow's GCS client retries for 15 minutes without
# credentials, and a name that does not resolve can wait as long
PROBE_TIMEOUT_S = 8.0


def is_remote(location: str) -> bool:
    return "://" in location


@functools.lru_cache(maxsize=16)
def _filesystem(base: str) -> pafs.FileSystem:
    return pafs.FileSystem.from_uri(base)[0] if base else pafs.LocalFileSystem()


def resolve(location: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path on it). A filesystem is made once per process and bucket (making
    an S3 one may ask the bucket's region)."""
    if not is_remote(location):
        return _filesystem(""), os.path.abspath(location)
    parts = urlsplit(location)
    fs = _filesystem(urlunsplit((parts.scheme, parts.netloc, "", parts.query, "")))
    if parts.scheme in ("s3", "gs", "gcs"):  # the bucket is part of the path
        return fs, (parts.netloc + parts.path).rstrip("/")
    return fs, pafs.FileSystem.from_uri(location)[1]


def join(location: str, *names: str) -> str:
    """`location/names...`, keeping a URI's query options at its end."""
    if not is_remote(location):
        return os.path.join(location, *names)
    parts = urlsplit(location)
    return urlunsplit(parts._replace(path=posixpath.join(parts.path or "/", *names)))


def basename(location: str) -> str:
    """The last name of a path or URI (`s3://b/runs/x?opt=1` -> `x`)."""
    path = urlsplit(location).path if is_remote(location) else location
    return posixpath.basename(path.rstrip("/"))


def suffixed(location: str, suffix: str) -> str:
    """`location` with `suffix` added to its last name (`x.parquet` -> `x.parquet.sha256`)."""
    if not is_remote(location):
        return location + suffix
    parts = urlsplit(location)
    return urlunsplit(parts._replace(path=parts.path + suffix))


def relative(location: str, root: str) -> str:
    """`location` relative to `root` (one of its parents)."""
    a, b = resolve(location)[1], resolve(root)[1]
    return posixpath.relpath(a, b) if is_remote(root) else os.path.relpath(a, b)


def exists(location: str) -> bool:
    fs, path = resolve(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def size(location: str) -> int:
    fs, path = resolve(location)
    return fs.get_file_info(path).size


def listdir(location: str) -> list[str]:
    """Names directly under `location` (empty if it does not exist)."""
    fs, path = resolve(location)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(posixpath.basename(i.path) for i in infos)


def makedirs(location: str) -> None:
    fs, path = resolve(location)
    fs.create_dir(path, recursive=True)


def remove(location: str) -> None:
    """Delete a file or a directory tree; nothing if it is not there."""
    fs, path = resolve(location)
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif kind == pafs.FileType.File:
        fs.delete_file(path)


def read_bytes(location: str) -> bytes:
    fs, path = resolve(location)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(location: str, data: bytes) -> None:
    """Write a whole file atomically: a reader sees the old file or the whole new one (an
    object store's single upload is atomic; locally a temporary file is renamed)."""
    fs, path = resolve(location)
    if is_remote(location):
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # a fresh name (never a file that was there), renamed over `path`: a link at `path` is
    # replaced, not followed; ".tmp" in it keeps a crashed write out of checksums
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would keep results from other users of a shared path
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_json(location: str):
    return json.loads(read_bytes(location))


def write_json(location: str, obj) -> None:
    write_bytes(location, json.dumps(obj, indent=1, sort_keys=True, default=float).encode())


def read_text(location: str) -> str:
    return read_bytes(location).decode("utf-8")


def write_frame_csv(location: str, frame) -> None:
    """A pandas DataFrame as CSV."""
    write_bytes(location, frame.to_csv(index=False).encode())


def write_frame_parquet(location: str, frame) -> None:
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    write_bytes(location, buf.getvalue())


def upload(local: str, location: str) -> None:
    """Copy a local file or directory to `location` (replacing a file there)."""
    if not is_remote(location):
        if os.path.isdir(local):
            shutil.copytree(local, location, dirs_exist_ok=True)
        else:
            os.makedirs(os.path.dirname(location), exist_ok=True)
            shutil.copyfile(local, location)
        return
    fs, path = resolve(location)
    pafs.copy_files(local, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def copy_tree(source: str, destination: str) -> None:
    """Copy a directory to a new place, replacing what was there. Locally the copy is
    made beside it, under a fresh name, and renamed into place (replace_dir)."""
    if not is_remote(destination):
        stage = fresh_dir_beside(destination)
        try:
            shutil.copytree(local_path(source), stage, dirs_exist_ok=True)
            os.chmod(stage, 0o755)  # mkdtemp's 0700 would keep the rack from other users of a shared path
            replace_dir(stage, destination)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        return
    remove(destination)
    (src_fs, src), (dst_fs, dst) = resolve(source), resolve(destination)
    pafs.copy_files(src, dst, source_filesystem=src_fs, destination_filesystem=dst_fs)


def fresh_dir_beside(destination: str) -> str:
    """A new, empty directory next to `destination` (same filesystem, so a rename moves it
    there), under a name nothing else has: a build never overwrites or deletes a file it
    did not make."""
    destination = os.path.abspath(destination)
    return tempfile.mkdtemp(dir=os.path.dirname(destination), prefix=f".{os.path.basename(destination)}.part-")


def replace_dir(stage: str, destination: str) -> None:
    """Rename the directory `stage` to `destination`, replacing what is there: a link or a
    file is removed (never followed), an empty directory replaced by the rename itself,
    a directory with files renamed aside first and removed once `stage` is in place."""
    if os.path.islink(destination) or (os.path.lexists(destination) and not os.path.isdir(destination)):
        os.unlink(destination)
    elif os.path.isdir(destination) and os.listdir(destination):
        aside = fresh_dir_beside(destination)
        os.rename(destination, os.path.join(aside, "old"))
        os.replace(stage, destination)
        shutil.rmtree(aside, ignore_errors=True)
        return
    os.replace(stage, destination)


def free_bytes(location: str) -> float:
    """Free space where `location` lives; an object store has no such limit (inf)."""
    if is_remote(location):
        return float("inf")
    path = os.path.abspath(location)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return shutil.disk_usage(path).free


def local_path(location: str) -> str:
    """A local path holding the file or directory at `location`: the path itself when it
    is local; otherwise a copy downloaded once per node (into the system temp directory)
    and kept while what is listed there (names, sizes, times) does not change."""
    if not is_remote(location):
        return location
    fs, path = resolve(location)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(location)
    listing = [info] if info.type == pafs.FileType.File else fs.get_file_info(pafs.FileSelector(path, recursive=True))
    key = hashlib.sha256(json.dumps([location] + sorted(
        (i.path, i.size, str(i.mtime)) for i in listing)).encode()).hexdigest()[:24]
    root = os.path.join(tempfile.gettempdir(), f"stackwise_ray-{os.getuid()}", "downloads")
    target = os.path.join(root, key, posixpath.basename(path))
    if os.path.exists(target):
        return target
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=root, prefix=".part-")
    if info.type == pafs.FileType.Directory:
        os.makedirs(os.path.join(tmp, posixpath.basename(path)))
    pafs.copy_files(path, os.path.join(tmp, posixpath.basename(path)), source_filesystem=fs,
                    destination_filesystem=pafs.LocalFileSystem())
    try:
        os.rename(tmp, os.path.join(root, key))  # atomic; another process may have won the race
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def storage_dir(path: str) -> str:
    """Where runs go, normalised once: an absolute local directory (a plain or mounted
    path, or file://), or a URI of a filesystem pyarrow knows (SCHEMES)."""
    if path.startswith("file://"):
        path = path[len("file://"):]
    elif "://" in path:
        scheme = path.split("://", 1)[0]
        if scheme not in SCHEMES:
            raise ConfigError(f"ray.storage_path: {show(path)}: unknown scheme {show(scheme)}; use a local or mounted path, "
                              f"file://, or one of {', '.join(s + '://' for s in SCHEMES)}")
        return path.rstrip("/")
    return os.path.abspath(path)


def check_storage(path: str) -> None:
    """Check, before anything starts, that runs can be written under the storage path, by
    writing a probe file there and removing it. A local directory the probe needs is
    made for it and removed again: nothing is left behind either way."""
    location = storage_dir(path)
    probe = f".probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    if is_remote(location):
        problem = remote_problem(location, probe)
        if problem:
            raise ConfigError(f"ray.storage_path: {location}: cannot be reached: {problem}")
        return
    made = []
    try:
        for directory in reversed(missing_dirs(location)):
            os.mkdir(directory)
            made.append(directory)
        with open(os.path.join(location, probe), "xb"):
            pass
        os.remove(os.path.join(location, probe))
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the path
        reason = getattr(e, "strerror", None) or first_line(e)
        raise ConfigError(f"ray.storage_path: {clip(location, 200)}: cannot write there: {reason}") from None
    finally:
        remove_made_dirs(reversed(made))


_REMOTE_PROBE = """
import sys
import pyarrow.fs as pafs
location, probe = sys.argv[1], sys.argv[2]
try:
    fs, path = pafs.FileSystem.from_uri(location)
    if probe:  # write a file there and remove it
        fs.create_dir(path, recursive=True)
        with fs.open_output_stream(path.rstrip("/") + "/" + probe) as f:
            f.write(b"")
        fs.delete_file(path.rstrip("/") + "/" + probe)
    else:
        fs.get_file_info(path)
except BaseException as e:
    print((str(e).strip().splitlines() or [type(e).__name__])[0][:200], file=sys.stderr)
    sys.exit(1)
"""


def remote_problem(location: str, probe: str = "", timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """Why the URI `location` cannot be read (probe "": its listing) or written (a file
    named `probe` written there and removed), or None. It runs in a child process that is
    killed after `timeout_s`: some clients (GCS without credentials) retry for minutes
    inside C++, where no Python thread can stop them, and every scheme's errors (pyarrow's
    own, NotImplementedError for a filesystem it was built without) end as one line."""
    try:
        done = subprocess.run([sys.executable, "-c", _REMOTE_PROBE, location, probe], capture_output=True, text=True,
                              timeout=timeout_s, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return f"no answer within {timeout_s:g} s (check the URI, the network and the credentials)"
    if done.returncode == 0:
        return None
    return clip((done.stderr.strip().splitlines() or [f"the probe ended with status {done.returncode}"])[-1], 200)


def remove_made_dirs(dirs) -> None:
    """Remove directories this process made (deepest first), up to the first that another
    process has put something in meanwhile: it, and those above it, stay."""
    for directory in dirs:
        try:
            os.rmdir(directory)
        except OSError:
            break


def missing_dirs(path: str) -> list[str]:
    """`path` and those of its parents that do not exist, deepest first."""
    missing = []
    while not os.path.lexists(path) and os.path.dirname(path) != path:
        missing.append(path)
        path = os.path.dirname(path)
    return missing


def check_name(name: str) -> None:
    """A run or experiment name is one directory right under the storage path."""
    bad = next((c for c in ("/", "\\", "\0", "?", "#") if c in name), None)
    if name in ("", ".", "..") or bad:
        why = f"contains {bad!r}" if bad else "is not a directory name"
        raise ConfigError(f"--name: must be one directory name under the storage path; {show(name)} {why}")
    if len(name.encode("utf-8", "surrogateescape")) > 255:
        raise ConfigError("--name: longer than 255 bytes, the most a directory name can be")
    if name == TOKENS_DIR:
        raise ConfigError(f"--name: {name!r} is where the token stores live under the storage path; choose another name")
    if name.startswith("-"):
        raise ConfigError(f"--name: {show(name)} starts with '-': it would read as a flag; choose another name")
