"""Command lines: bad input is one line and exit status 2; sampling works on any rack."""

import os
import socket
import subprocess
import sys

import pytest

from stackwise_ray.builder import ProgressiveRackBuilder
from stackwise_ray.inference import generate

from .conftest import tiny_config


def run_cli(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=cwd, timeout=120,
                          env={**os.environ, **(env or {})})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("body, expected", [
    ("training:\n  progressive:\n    qlora_rnak: 8\n", "training.progressive.qlora_rnak: unknown key (did you mean 'qlora_rank'?)"),
    ("training:\n  progressive:\n    qlora_rank: 0\n", "training.progressive.qlora_rank: must be > 0, got 0"),
    ("model: [1, 2\n", "YAML syntax error"),
    ("data:\n  source: /nonexistent/corpus.jsonl\n", "data.source: no such file"),
])
def test_train_rejects_bad_config_with_one_line_and_status_2(tmp_path, body, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    storage = tmp_path / "storage"
    result = run_cli("stackwise_ray.train", str(path), "--storage", str(storage))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}") and expected in lines[0]
    assert "Traceback" not in result.stderr and not storage.exists()


def test_train_rejects_empty_data_file(tmp_path):
    data = tmp_path / "empty.txt"
    data.write_text("")
    path = tmp_path / "x.yaml"
    path.write_text(f"data:\n  source: {data}\n")
    result = run_cli("stackwise_ray.train", str(path))
    assert result.returncode == 2 and str(data) in result.stderr and "Traceback" not in result.stderr


def test_sample_without_a_rack_is_status_2(tmp_path):
    result = run_cli("stackwise_ray.sample", str(tmp_path))
    assert result.returncode == 2 and "no trained rack" in result.stderr


@pytest.mark.parametrize("objective", ["clm", "mlm"])
def test_generate_fills_every_position(objective):
    builder = ProgressiveRackBuilder(tiny_config(training_objective=objective))
    builder.add_stack()
    prompt = list(b"The ")
    ids = generate(builder, prompt, length=12, steps=4)
    assert ids[:4] == prompt and len(ids) == 16
    assert builder.build_rack().pad_id not in ids and 257 not in ids  # no pad, no mask token left


@pytest.mark.slow
def test_storage_scheme_and_reachability_are_checked_in_one_line(tmp_path):
    from stackwise_ray.storage import storage_dir

    assert storage_dir(f"file://{tmp_path}") == str(tmp_path)
    assert storage_dir("s3://bucket/runs/?endpoint_override=h:1") == "s3://bucket/runs/?endpoint_override=h:1"
    path = tmp_path / "x.yaml"
    path.write_text("model: {d_model: 32, n_heads: 2}\n")
    for module in ("stackwise_ray.train", "stackwise_ray.tune"):
        result = run_cli(module, str(path), "--storage", "ftp://bucket/runs")
        assert result.returncode == 2 and "unknown scheme 'ftp'" in result.stderr
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    # a bucket behind an endpoint nothing listens on: refused before Ray starts
    port = free_port()
    result = run_cli("stackwise_ray.train", str(path), "--storage",
                     f"s3://bucket/runs?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1",
                     env={"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x"})
    assert result.returncode == 2 and "ray.storage_path: s3://bucket/runs" in result.stderr
    assert "cannot be reached" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_use_gpu_without_a_gpu_or_cluster_is_one_line_and_status_2(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    path = tmp_path / "gpu.yaml"
    path.write_text("ray: {use_gpu: true}\n")
    for module in ("stackwise_ray.train", "stackwise_ray.tune"):
        result = run_cli(module, str(path), "--storage", str(tmp_path / "runs"))
        assert result.returncode == 2
        assert "ray.use_gpu: true, but this machine has no CUDA GPU" in result.stderr
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("module", ["stackwise_ray.train", "stackwise_ray.tune"])
def test_a_name_outside_storage_or_an_unwritable_storage_is_one_line_and_status_2(tmp_path, module):
    path = tmp_path / "x.yaml"
    path.write_text("model: {d_model: 32, n_heads: 2}\n")
    (tmp_path / "afile").write_text("")
    before = sorted(tmp_path.rglob("*"))
    for args, expected in ((["--storage", str(tmp_path / "S"), "--name", "../escaped_run"],
                            "--name: must be one directory name under the storage path; '../escaped_run' contains '/'"),
                           (["--storage", str(tmp_path / "afile")],
                            f"ray.storage_path: {tmp_path / 'afile'}: cannot write there: Not a directory")):
        result = run_cli(module, str(path), *args)
        assert result.returncode == 2 and result.stderr == f"error: {path}: {expected}\n", result.stderr
        assert result.stdout == ""  # tune prints the dashboard's address once Ray has started
    assert sorted(tmp_path.rglob("*")) == before


def test_sample_of_a_tampered_rack_runs_nothing_it_names(tmp_path):
    from .test_checkpoint import make_tampered

    original, tampered, marker, code = make_tampered(tmp_path)
    env = {"PYTHONPATH": os.pathsep.join([str(code), os.environ.get("PYTHONPATH", "")])}
    mine = run_cli("stackwise_ray.sample", str(original), "--length", "12", env=env)
    theirs = run_cli("stackwise_ray.sample", str(tampered), "--length", "12", env=env)
    assert mine.returncode == theirs.returncode == 0, theirs.stderr
    assert theirs.stdout == mine.stdout and len(mine.stdout) > 12  # the stored time steps, not the named function's
    assert list(marker.iterdir()) == []


@pytest.mark.parametrize("damage, expected", [
    (lambda d: (d / "checksums.json").write_text("{}"), "checksums.json: rack.json is not listed"),
    (lambda d: (d / "extra.bin").write_bytes(b"x"), "extra.bin: not listed in checksums.json"),
    (lambda d: (d / "model.safetensors").unlink(), "model.safetensors: missing (listed in checksums.json)"),
])
def test_sample_refuses_a_damaged_rack_in_one_line(tmp_path, capsys, damage, expected):
    from stackwise_ray.checkpoint import save_rack
    from stackwise_ray.sample import main

    builder = ProgressiveRackBuilder(tiny_config())
    builder.add_stack()
    save_rack(builder, str(tmp_path))
    damage(tmp_path)
    assert main([str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"error: {tmp_path}") and err.count("\n") == 1 and expected in err


@pytest.mark.parametrize("flag, value, expected", [
    ("--temperature", "nan", "--temperature: must be a finite number >= 0"),
    ("--temperature", "-0.5", "--temperature: must be a finite number >= 0"),
    ("--top-k", "0", "--top-k: must be an integer >= 1, got 0"),
    ("--top-k", "-3", "--top-k: must be an integer >= 1, got -3"),
    ("--length", "0", "--length: must be an integer in [1, 10000], got 0"),
    ("--length", "1e9", "--length: must be an integer, got '1e9'"),
    ("--seed", str(2**64), "--seed: must be an integer in [0, 9223372036854775807]"),
])
def test_sample_flags_are_checked_in_one_line(tmp_path, capsys, flag, value, expected):
    from stackwise_ray.sample import main

    with pytest.raises(SystemExit) as exit:
        main([str(tmp_path), flag, value])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.startswith(f"error: {expected}") and err.count("\n") == 1


def test_vocab_size_below_a_tokenizer_files_is_refused_once_it_is_loaded(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from stackwise_ray.cli import load_for_command

    tokens = ["[PAD]", "[UNK]", "[MASK]", "[CLS]", "[SEP]", "hello", "world"]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tok.json"))
    path = tmp_path / "x.yaml"
    path.write_text(f"model: {{vocab_size: 6}}\ndata: {{tokenizer: {tmp_path / 'tok.json'}}}\n")
    assert load_for_command(str(path), str(tmp_path / "runs"), check_data=False) is None
    assert capsys.readouterr().err == f"error: {path}: model.vocab_size: must be >= the tokenizer's 7 ids, got 6\n"
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("override, expected", [
    ("training.lr=abc", "override 'training.lr=abc': training.lr: must be a number, got 'abc'"),
    ("training.lrr=1e-3", "override 'training.lrr=1e-3': training.lrr: no such config key (did you mean 'lr'?)"),
    ("ray.num_workers=1.5", "override 'ray.num_workers=1.5': ray.num_workers: must be an integer, got '1.5'"),
    ("training.min_lr=1", "training.min_lr: must be in [0, training.lr=0.003], got 1.0"),  # the schema after it
    ("training.lr", "override 'training.lr': must be key.path=value, e.g. training.lr=1e-3"),
])
def test_a_bad_override_is_one_line_naming_it_and_writes_nothing(tmp_path, override, expected):
    path = tmp_path / "x.yaml"
    path.write_text("{}\n")
    for module in ("stackwise_ray.train", "stackwise_ray.tune"):
        out = run_cli(module, str(path), override, "--storage", str(tmp_path / "runs"))
        assert out.returncode == 2 and out.stderr == f"error: {path}: {expected}\n", out.stderr
    assert not (tmp_path / "runs").exists()


def test_overrides_reach_a_dry_run_typed_by_the_schema(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("tune: {search_space: {training.progressive.trunk_strategy: {grid: [frozen, full]}}}\n")
    out = run_cli("stackwise_ray.tune", str(path), "--dry-run", "tune.lrs=[1.0e-3, 3.0e-3]", "tune.seeds=[0, 1]")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("8 trials (8 grid points: 2 arms x 2 lrs x 2 seeds;")


# ---------------------------------------------------------------- a received rack chooses nothing this machine reads or writes

def received_rack(tmp_path, storage_path: str, source: str, max_examples=None):
    """A rack whose stored config names a storage path and a data file of the sender's choosing."""
    from stackwise_ray.checkpoint import save_rack

    builder = ProgressiveRackBuilder(tiny_config(data={"max_examples": max_examples}))
    builder.add_stack()
    builder.config.ray.storage_path, builder.config.data.source = storage_path, source
    save_rack(builder, str(tmp_path / "rack"))
    return str(tmp_path / "rack")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("storage_kind", ["local", "s3"])
def test_evaluating_a_received_rack_reads_and_writes_only_where_the_user_says(tmp_path, monkeypatch, capsys,
                                                                             storage_kind):
    import json

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.mkfifo(elsewhere / "data.txt")  # a read of the rack's data file would block: the test would time out
    named_storage = (str(elsewhere / "storage") if storage_kind == "local" else
                     f"s3://their-bucket/runs?endpoint_override=127.0.0.1:{free_port()}&scheme=http")
    rack = received_rack(tmp_path, named_storage, str(elsewhere / "data.txt"))
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(scratch))
    from stackwise_ray.sample import main

    # without --data: one line saying what to pass, nothing read
    assert main([rack, "--evaluate", "--length", "4"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: --evaluate: the rack was trained on ") and "pass --data PATH" in err
    # the user's data, into a temporary token store that is removed again
    mine = tmp_path / "mine.txt"
    mine.write_text("Some text of my own, paragraph after paragraph.\n\n" * 200)
    assert main([rack, "--evaluate", "--data", str(mine), "--length", "4"]) == 0
    out, _ = capsys.readouterr()
    assert "'val_loss'" in out.splitlines()[0]
    assert [p.name for p in elsewhere.iterdir()] == ["data.txt"] and list(scratch.iterdir()) == []
    # with --storage: the token store is kept there
    assert main([rack, "--evaluate", "--data", str(mine), "--storage", str(tmp_path / "mine"), "--length", "4"]) == 0
    [store] = (tmp_path / "mine" / "tokens").iterdir()
    assert json.loads((store / "meta.json").read_text())["source"] == str(mine)
    assert [p.name for p in elsewhere.iterdir()] == ["data.txt"]


def test_evaluating_a_rack_trained_on_the_bundled_corpus_needs_no_data(tmp_path, monkeypatch, capsys):
    rack = received_rack(tmp_path, str(tmp_path / "elsewhere"), "pydoc", max_examples=200)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(scratch))
    from stackwise_ray.sample import main

    assert main([rack, "--evaluate", "--length", "4"]) == 0
    assert "'val_loss'" in capsys.readouterr().out
    assert not (tmp_path / "elsewhere").exists() and list(scratch.iterdir()) == []
    assert main([rack, "--data", str(rack)]) == 2  # a flag that does nothing without --evaluate
    assert capsys.readouterr().err == "error: --data: only used with --evaluate\n"
    assert main([rack, "--evaluate", "--data", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: --data {tmp_path}: not a regular file (a directory)\n"


def test_sampling_a_rack_whose_weights_are_not_finite_is_one_line(tmp_path, capsys):
    import torch

    from stackwise_ray.checkpoint import save_rack
    from stackwise_ray.sample import main

    builder = ProgressiveRackBuilder(tiny_config())
    builder.add_stack()
    with torch.no_grad():
        builder.build_rack().embed.weight[3, 0] = float("inf")
    save_rack(builder, str(tmp_path))
    assert main([str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == (f"error: {tmp_path / 'model.safetensors'}: weights are not finite "
                                 "(NaN or inf in embed.weight)\n")


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_sampling_a_run_directory_on_unreachable_object_storage_is_one_line(tmp_path, capsys):
    import time

    from stackwise_ray.sample import main

    uri = f"s3://bucket/runs/x?endpoint_override=127.0.0.1:{free_port()}&scheme=http&region=us-east-1"
    t0 = time.monotonic()
    assert main([uri]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {uri}: cannot be reached: ") and err.count("\n") == 1
    assert time.monotonic() - t0 < 20


# ---------------------------------------------------------------- run directories, flags, full disks

TINY_YAML = ("model: {d_model: 32, n_heads: 2, blocks_per_stack: 1, max_seq_len: 32}\n"
             "data: {seq_len: 32, batch_size: 8, max_examples: 120}\n"
             "training: {steps_per_stack: 8, eval_batches: 2, warmup_steps: 2, "
             "progressive: {time_embedding_dim: 16, max_stacks: 1}}\n")


def test_a_linked_train_log_on_resume_is_refused_and_its_target_left_alone(tmp_path, capsys):
    from stackwise_ray.train import main

    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_YAML)
    (tmp_path / "runs" / "tiny").mkdir(parents=True)
    target = tmp_path / "elsewhere.txt"
    target.write_text("someone else's file\n")
    (tmp_path / "runs" / "tiny" / "train.log").symlink_to(target)
    assert main([str(config), "--storage", str(tmp_path / "runs"), "--resume"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == (f"error: {tmp_path / 'runs' / 'tiny' / 'train.log'}: a symbolic link; a run writes "
                                 "its files only inside its directory (remove the link)\n")
    assert target.read_text() == "someone else's file\n"


@pytest.mark.parametrize("module, argv, expected", [
    ("train", ["x.yaml", "--bogus"], "error: unrecognized arguments: --bogus"),
    ("train", ["x.yaml", "--name", "--resume"], "error: --name: expected one argument"),
    ("tune", ["x.yaml", "--bogus"], "error: unrecognized arguments: --bogus"),
    ("tune", ["x.yaml", "--name", "--dry-run"], "error: --name: expected one argument"),
    ("report", ["d", "--bogus"], "error: unrecognized arguments: --bogus"),
    ("export", ["r", "o", "--format", "onnx"], "error: --format: invalid choice: 'onnx'"),
])
def test_a_bad_flag_is_one_line_and_status_2_for_every_command(capsys, module, argv, expected):
    import importlib

    main = importlib.import_module(f"stackwise_ray.{module}").main
    with pytest.raises(SystemExit) as exit:
        main(argv)
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.startswith(expected) and err.count("\n") == 1, err


@pytest.mark.parametrize("module", ["train", "tune"])
@pytest.mark.parametrize("name, expected", [
    ("tokens", "--name: 'tokens' is where the token stores live under the storage path"),
    ("-x", "--name: '-x' starts with '-': it would read as a flag"),
])
def test_a_name_that_collides_with_the_token_stores_or_reads_as_a_flag_is_refused(tmp_path, capsys, module, name,
                                                                                  expected):
    import importlib

    config = tmp_path / "x.yaml"
    config.write_text(TINY_YAML)
    main = importlib.import_module(f"stackwise_ray.{module}").main
    assert main([str(config), "--storage", str(tmp_path / "runs"), f"--name={name}"]) == 2
    assert capsys.readouterr().err.startswith(f"error: {config}: {expected}")
    tokens = tmp_path / "tokens.yaml"  # the default name is the file's: checked the same way
    tokens.write_text(TINY_YAML)
    assert main([str(tokens), "--storage", str(tmp_path / "runs")]) == 2
    assert "is where the token stores live" in capsys.readouterr().err and not (tmp_path / "runs").exists()


def test_a_full_disk_mid_run_is_one_line_naming_the_path_and_what_was_kept(tmp_path, monkeypatch, capsys):
    """Ray is not started: the run's body is replaced by one that finishes a phase, then
    fails the way a phase's checkpoint upload does on a full disk (wrapped by Ray)."""
    import errno

    import stackwise_ray.train as train
    from stackwise_ray.checkpoint import save_rack
    from stackwise_ray.trainer import ProgressiveTrainer

    def full_disk_in_phase_1(self):
        builder = ProgressiveRackBuilder(self.config)
        builder.add_stack()
        checkpoint = os.path.join(self.store.root, "s00-done", "run", "checkpoint_000000")
        save_rack(builder, checkpoint, extra={"metrics": {"val_loss": 1.0}})
        self.store.finish("s00-done", {"checkpoint": checkpoint, "metrics": {"val_loss": 1.0}})
        where = os.path.join(self.store.root, "s01-next", "run", "checkpoint_000000", "model.safetensors")
        try:
            raise OSError(errno.ENOSPC, "No space left on device", where)
        except OSError as e:
            raise RuntimeError("Training failed due to a worker error") from e

    monkeypatch.setattr(train, "start", lambda config, **kw: None)
    monkeypatch.setattr(train, "dashboard_line", lambda context: "Ray dashboard: (not started)")
    monkeypatch.setattr(ProgressiveTrainer, "train_progressively", full_disk_in_phase_1)
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_YAML)
    assert train.main([str(config), "--storage", str(tmp_path / "runs"), "--verbose"]) == 2
    phases = tmp_path / "runs" / "tiny" / "phases"
    err = capsys.readouterr().err
    assert err == (f"error: {phases / 's01-next' / 'run' / 'checkpoint_000000' / 'model.safetensors'}: No space left "
                   f"on device (1 finished phase(s) kept in {phases}; free some space, then rerun with --resume)\n")


def test_a_full_disk_is_found_behind_rays_wrappers():
    import errno

    from stackwise_ray.cli import disk_full

    full = OSError(errno.ENOSPC, "No space left on device", "/x")
    wrapper = type("WorkerGroupError", (RuntimeError,), {})("worker 0 failed")
    wrapper.worker_failures = {0: RuntimeError("boom"), 1: full}
    assert disk_full(wrapper) is full
    assert disk_full(RuntimeError("(RayTaskError) OSError: [Errno 28] No space left on device")).errno == errno.ENOSPC
    assert disk_full(RuntimeError("boom")) is None and disk_full(OSError(errno.EACCES, "denied")) is None
