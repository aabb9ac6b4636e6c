"""A corpus of malformed experiment YAMLs (tests/bad_configs/*.yaml): each one must be
rejected by both CLIs with one line `error: <file>: <key path>: <problem>` on stderr and
exit status 2, before Ray starts or the storage directory is created.

Each file starts with `# expect: <substring of the error line>`. Paths inside the files
(data files, custom time mappings imported by module name) are relative to the repo root,
so every test runs with the repo root as its working directory.
"""

import pathlib
import subprocess
import sys

import pytest

from stackwise_ray import train, tune

ROOT = pathlib.Path(__file__).resolve().parents[1]
CORPUS = sorted((ROOT / "tests" / "bad_configs").glob("*.yaml"))
CLIS = {"train": train.main, "tune": tune.main}
# one syntax error, one data-file error, one custom-mapping import error
SUBPROCESS_CASES = ["yaml_syntax_error", "jsonl_invalid_line", "custom_mapping_wrong_signature"]


def rel(path: pathlib.Path) -> str:
    return str(path.relative_to(ROOT))


def expected_of(path: pathlib.Path) -> str:
    first = path.read_bytes().split(b"\n")[0].decode("utf-8")  # the rest may be anything, even not UTF-8
    assert first.startswith("# expect: "), f"{path.name}: first line must be '# expect: ...'"
    return first[len("# expect: "):].strip()


def check_error(stderr: str, path: str, expected: str) -> None:
    assert "Traceback" not in stderr, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip(), f"expected exactly one line, got {stderr!r}"
    line = lines[0]
    assert len(line) < 400, f"an error line stays short whatever the value: {len(line)} characters"
    assert line.startswith("error: "), line
    assert path in line, line
    assert expected in line, f"{expected!r} not in {line!r}"


@pytest.fixture(autouse=True)
def _at_repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.syspath_prepend(str(ROOT))  # custom time mappings are imported by module name


def test_corpus_is_large_and_annotated():
    assert len(CORPUS) >= 32
    for path in CORPUS:
        assert expected_of(path)


@pytest.mark.parametrize("cli", sorted(CLIS))
@pytest.mark.parametrize("path", CORPUS, ids=lambda p: p.stem)
def test_bad_config_is_one_line_and_status_2(path, cli, tmp_path, capsys):
    import ray

    storage = tmp_path / "store"
    status = CLIS[cli]([rel(path), "--storage", str(storage)])
    captured = capsys.readouterr()
    assert status == 2, captured
    check_error(captured.err, rel(path), expected_of(path))
    assert not storage.exists()
    assert not ray.is_initialized()


@pytest.mark.parametrize("cli", ["stackwise_ray.train", "stackwise_ray.tune"])
@pytest.mark.parametrize("name", SUBPROCESS_CASES)
def test_bad_config_in_a_real_process(name, cli, tmp_path):
    path = ROOT / "tests" / "bad_configs" / f"{name}.yaml"
    storage = tmp_path / "store"
    result = subprocess.run([sys.executable, "-m", cli, rel(path), "--storage", str(storage)],
                            capture_output=True, text=True, cwd=ROOT, timeout=60)  # -m puts the cwd (repo root) on sys.path
    assert result.returncode == 2, result
    check_error(result.stderr, rel(path), expected_of(path))
    assert not storage.exists()


@pytest.mark.parametrize("cli", sorted(CLIS))
def test_a_jsonl_line_nested_100000_deep_is_one_line(cli, tmp_path, capsys):
    import ray

    data = tmp_path / "deep.jsonl"
    data.write_text('{"text": "fine"}\n{"text": ' + "[" * 100_000 + "]" * 100_000 + "}\n", encoding="utf-8")
    config = tmp_path / "deep.yaml"
    config.write_text(f"data:\n  source: {data}\n", encoding="utf-8")
    storage = tmp_path / "store"
    status = CLIS[cli]([str(config), "--storage", str(storage)])
    captured = capsys.readouterr()
    assert status == 2, captured
    check_error(captured.err, str(config), f"{data}: line 2: invalid JSON: nested too deeply")
    assert not storage.exists()
    assert not ray.is_initialized()
