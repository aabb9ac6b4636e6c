"""Object storage: runs on an S3 bucket (moto's S3 server on 127.0.0.1 stands in for it)
keep their checkpoints, caches, records and results there, resume from there, and lock
their phases with leases."""

import threading
import time

import pyarrow.fs as pafs
import pytest
import torch

from stackwise_ray import storage
from stackwise_ray.checkpoint import load_rack
from stackwise_ray.config import ConfigError
from stackwise_ray.data import build_datasets, token_store_location
from stackwise_ray.phase_store import PhaseStore
from stackwise_ray.trainer import ProgressiveTrainer

from .conftest import ray_config

moto_server = pytest.importorskip("moto.server")


@pytest.fixture(scope="module")
def bucket(ray_session):
    """s3://swr-test on a local S3 server; yields a function making URIs under it."""
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    query = f"endpoint_override={host}:{port}&scheme=http&region=us-east-1&allow_bucket_creation=true"
    storage.makedirs(f"s3://swr-test?{query}")
    yield lambda path: f"s3://swr-test/{path}?{query}"
    server.stop()


def listing(uri: str) -> set[str]:
    fs, root = storage.resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return {i.path[len(root) + 1:] for i in infos if i.type == pafs.FileType.File}


@pytest.fixture(params=["local", "s3"])
def location(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("bucket")(f"unit-{time.time_ns()}")


def test_files_round_trip_through_one_interface(location):
    record = storage.join(location, "phase", "done.json")
    assert not storage.exists(record)
    storage.write_json(record, {"loss": 1.5})
    assert storage.read_json(record) == {"loss": 1.5} and storage.exists(record)
    assert storage.listdir(location) == ["phase"] and storage.listdir(storage.join(location, "phase")) == ["done.json"]
    storage.copy_tree(storage.join(location, "phase"), storage.join(location, "copy"))
    assert storage.read_json(storage.join(location, "copy", "done.json")) == {"loss": 1.5}
    storage.remove(storage.join(location, "phase"))
    assert storage.listdir(location) == ["copy"] and storage.listdir(storage.join(location, "absent")) == []


def test_a_uri_keeps_its_query_and_a_remote_directory_is_downloaded_once_per_change(bucket):
    root = bucket("download")
    assert storage.join(root, "a", "b").startswith("s3://swr-test/download/a/b?endpoint_override=")
    storage.write_bytes(storage.join(root, "ckpt", "w.bin"), b"one")
    first = storage.local_path(storage.join(root, "ckpt"))
    assert open(f"{first}/w.bin", "rb").read() == b"one"
    assert storage.local_path(storage.join(root, "ckpt")) == first  # cached
    storage.write_bytes(storage.join(root, "ckpt", "w.bin"), b"two!")
    second = storage.local_path(storage.join(root, "ckpt"))
    assert second != first and open(f"{second}/w.bin", "rb").read() == b"two!"


def test_leases_exclude_wait_and_lapse_when_their_holder_stops_renewing(bucket):
    store = PhaseStore(bucket("leases"))
    held = store.try_claim("s00-a")
    assert held is not None and store.try_claim("s00-a") is None
    other = store.try_claim("s00-b")  # another phase is independent
    assert other is not None
    other.release()

    got = []
    waiter = threading.Thread(target=lambda: got.append(store.claim("s00-a")))
    waiter.start()
    time.sleep(1.0)
    assert not got  # waits while the lease is held
    held.release()
    waiter.join(timeout=30)
    assert got and store.try_claim("s00-a") is None
    got[0].release()

    from stackwise_ray.locks import LeaseLock

    dead = LeaseLock.acquire(storage.join(store.root, "s00-c"), blocking=False, lease_s=1.0)
    dead._stop.set()  # its process died: no more renewals, no release
    assert store.try_claim("s00-c") is None
    time.sleep(1.2)
    lapsed = store.try_claim("s00-c")
    assert lapsed is not None
    lapsed.release()


def test_a_run_on_object_storage_caches_there_resumes_from_there_and_loads_back(bucket):
    root = bucket("runs")
    config = ray_config(target_stacks=2, ray={"cache_backend": "arrow"})
    trainer = ProgressiveTrainer(config, storage_path=root, name="s3run", prestart=False)
    history = trainer.train_progressively()
    assert [h["status"] for h in history] == ["trained", "trained"]
    assert history[1]["cache"]["kind"] == "trunk_outputs" and history[1]["cache"]["built"]
    assert history[1]["trunk_forwards"] == 0  # the phase read the trunk's outputs from the bucket
    files = listing(storage.join(root, "s3run"))
    ids = [h["phase_id"] for h in history]
    assert {f"phases/{i}/done.json" for i in ids} <= files
    cache = next(f.rsplit("/", 1)[0] for f in files if f.startswith(f"phases/{ids[0]}/cache_position_001_"))
    assert {f"{cache}/shard_00000.parquet", f"{cache}/shard_00000.parquet.sha256", f"{cache}/manifest.json",
            "final/rack.json", "final/model.safetensors", "summary.json"} <= files
    assert all(h["checkpoint"].startswith(f"s3://swr-test/runs/s3run/phases/{i}/s3run.s{k:02d}/checkpoint_")
               for k, (h, i) in enumerate(zip(history, ids)))  # the Ray Train run is named after run and stack

    again = ProgressiveTrainer(config, storage_path=root, name="s3run", resume=True)
    assert [h["status"] for h in again.train_progressively()] == ["reused", "reused"]

    final = load_rack(storage.join(root, "s3run", "final")).build_rack().state_dict()
    last = load_rack(history[-1]["checkpoint"]).build_rack().state_dict()
    assert final.keys() == last.keys() and all(torch.equal(final[k], last[k]) for k in final)


def test_a_token_store_on_s3_is_built_locally_uploaded_and_read_from_a_local_copy(bucket):
    local = ray_config()
    remote = ray_config(ray={"storage_path": bucket("tokens-run")})
    location = token_store_location(remote)
    assert location.startswith("s3://swr-test/tokens-run/tokens/") and listing(location) == {"meta.json", "tokens.bin"}
    (a_train, a_val, _), (b_train, b_val, _) = build_datasets(local), build_datasets(remote)
    for a, b in ((a_train, b_train), (a_val, b_val)):
        assert torch.equal(a.example_ids, b.example_ids) and torch.equal(a.input_ids[:], b.input_ids[:])


def config_error(fn) -> str:
    with pytest.raises(ConfigError) as e:
        fn()
    return str(e.value)


@pytest.mark.parametrize("name", ["../escaped_run", "/abs/path", "a/b", ".", "..", "", "a\0b", "x" * 256,
                                  "tokens", "--resume", "-x"])
def test_a_run_name_is_one_directory_name(name):
    assert config_error(lambda: storage.check_name(name)).startswith("--name: ")


def test_the_storage_probe_leaves_nothing_behind(tmp_path):
    storage.check_storage(str(tmp_path / "new" / "runs"))
    assert list(tmp_path.iterdir()) == []  # made for the probe, removed again
    (tmp_path / "afile").write_text("")
    for bad in ("afile", "afile/runs"):
        msg = config_error(lambda: storage.check_storage(str(tmp_path / bad)))
        assert msg == f"ray.storage_path: {tmp_path / bad}: cannot write there: Not a directory"
    assert config_error(lambda: storage.check_storage(str(tmp_path / "a\0b"))).startswith("ray.storage_path: ")
    assert [p.name for p in tmp_path.iterdir()] == ["afile"]


@pytest.mark.slow
@pytest.mark.parametrize("uri", ["gs://swr-no-such-bucket/runs", "abfs://runs@nosuchaccount.dfs.core.windows.net/x"])
def test_a_storage_uri_of_any_scheme_is_probed_in_one_line_within_seconds(tmp_path, capsys, uri):
    """No network but 127.0.0.1 is reachable here: GCS without credentials retries for
    minutes inside pyarrow's C++ client unless the probe is stopped."""
    from stackwise_ray.cli import load_for_command

    path = tmp_path / "x.yaml"
    path.write_text("model: {d_model: 32, n_heads: 2}\n")
    t0 = time.monotonic()
    assert load_for_command(str(path), uri, check_data=False) is None
    err = capsys.readouterr().err
    assert time.monotonic() - t0 < storage.PROBE_TIMEOUT_S + 5
    assert err.startswith(f"error: {path}: ray.storage_path: {uri}: cannot be reached: ") and err.count("\n") == 1


def test_the_replacing_writes_never_follow_a_link_nor_touch_a_file_they_did_not_make(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("theirs")
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").symlink_to(elsewhere / "keep.txt")
    storage.write_json(str(run / "summary.json"), {"ours": 1})
    assert (elsewhere / "keep.txt").read_text() == "theirs" and not (run / "summary.json").is_symlink()
    assert storage.read_json(str(run / "summary.json")) == {"ours": 1}
    source = tmp_path / "rack"
    source.mkdir()
    (source / "rack.json").write_text("{}")
    (run / "final").symlink_to(elsewhere, target_is_directory=True)
    (run / "final.tmp").mkdir()  # the user's: the copy must neither use nor remove it
    (run / "final.tmp" / "mine.txt").write_text("mine")
    storage.copy_tree(str(source), str(run / "final"))
    assert sorted(p.name for p in elsewhere.iterdir()) == ["keep.txt"] and (elsewhere / "keep.txt").read_text() == "theirs"
    assert not (run / "final").is_symlink() and sorted(p.name for p in (run / "final").iterdir()) == ["rack.json"]
    assert (run / "final.tmp" / "mine.txt").read_text() == "mine"
    storage.copy_tree(str(source), str(run / "final"))  # a second copy replaces the first: nothing left beside it
    assert sorted(p.name for p in run.iterdir()) == ["final", "final.tmp", "summary.json"]
