"""P8: what a run costs as the corpus grows (issue 12).

Three corpora, assembled in a temporary directory (never shipped):
  pydoc     the bundled corpus (data.source: pydoc)
  stdlib    the running Python's standard library .py files as JSONL, one file per line
  packages  the installed packages' .py files as JSONL, repeated until it holds MIN_PACKAGES_MB

Per corpus: the token store built alone in a fresh process (byte tokenizer, one process:
tokenization MB/s and its peak RSS), the split and one batch read over it in another one,
then the same 3-stack run (append, frozen trunk, cached, d_model 128, seq_len 128, 100
steps of batch 32 per stack, 1 worker) once per cache backend, each `python -m stackwise_ray.train` in a fresh process. Both runs share a
storage directory, so the first builds the corpus's token store and the second reuses it.
The driver's peak RSS is its VmHWM (/proc/PID/status), polled until it exits; a worker's
is the phase's `peak_memory_mb`.

`--build` (issue 27) measures the token store's parallel build instead: a corpus of the
installed packages' `.py` files as Parquet shards (BUILD_SHARDS of them of about equal size,
BUILD_MB in all), a `tokenizers` BPE file (vocabulary 4,096,
byte-level pre-tokenizer) trained here on some of those files, and the store built by
`python -m stackwise_ray.prepare` in a fresh process: once in one process (`--local`), then
by Ray tasks on every CPU of a local Ray (`--num-cpus` of them; the default is all). The
stores must be byte-identical; the target is parallel >= 0.8 x CPUs x one process.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ROOT, config, table, write_section  # noqa: E402

CORPORA = ("pydoc", "stdlib", "packages")
BACKENDS = ("object_store", "arrow")
MIN_PACKAGES_MB = 300
STEPS, BATCH, SEQ_LEN, D_MODEL = 100, 32, 128, 128
MB = 1e6


# ---------------------------------------------------------------- corpora

def python_files(root: str, skip: tuple[str, ...] = ()) -> list[str]:
    found = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in skip)
        found += [os.path.join(d, f) for f in sorted(files) if f.endswith(".py")]
    return found


def write_jsonl(path: str, files: list[str], min_bytes: int = 0, max_bytes: int | None = None) -> int:
    """One {"text": source} line per file that is valid UTF-8, the list repeated until the
    file holds `min_bytes`, stopping after `max_bytes`; returns its size."""
    size = 0
    with open(path, "w", encoding="utf-8") as out:
        while True:
            for name in files:
                try:
                    with open(name, encoding="utf-8") as f:
                        text = f.read()
                except (UnicodeDecodeError, OSError):  # a few test files are deliberately not UTF-8
                    continue
                size += out.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
                if max_bytes is not None and size >= max_bytes:
                    return os.path.getsize(path)
            if size >= min_bytes or not files:
                return os.path.getsize(path)


def assemble(tmp: str, packages_mb: float, stdlib_mb: float | None) -> dict[str, str]:
    paths = sysconfig.get_paths()
    stdlib = os.path.join(tmp, "stdlib.jsonl")
    write_jsonl(stdlib, python_files(paths["stdlib"], ("site-packages", "dist-packages")),
                max_bytes=None if stdlib_mb is None else int(stdlib_mb * MB))
    packages = os.path.join(tmp, "packages.jsonl")
    roots = dict.fromkeys([paths["purelib"], paths["platlib"]])  # often the same directory
    write_jsonl(packages, [f for r in roots for f in python_files(r)], int(packages_mb * MB),
                int(packages_mb * MB * 1.3))
    return {"pydoc": "pydoc", "stdlib": stdlib, "packages": packages}


def corpus_bytes(source: str) -> int:
    if source == "pydoc":
        from pydoc_data.topics import topics
        return sum(len(topics[k].encode()) for k in topics)
    return os.path.getsize(source)


# ---------------------------------------------------------------- runs

def run_config(source: str, backend: str, steps: int) -> dict:
    return config({"data": {"source": source, "seq_len": SEQ_LEN, "batch_size": BATCH},
                   "model": {"d_model": D_MODEL, "n_heads": 4, "max_seq_len": SEQ_LEN},
                   "training": {"steps_per_stack": steps,
                                "progressive": {"target_stacks": 3, "building_mode": "append",
                                                "trunk_strategy": "frozen", "cache_activations": True}},
                   "ray": {"num_workers": 1, "cache_backend": backend}}).to_dict()


def write_yaml(cfg: dict, path: str) -> str:
    import yaml

    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    return path


def tokenize_child(cfg_path: str, storage: str) -> None:
    """In a fresh process: build the token store; print its timing, the CPU seconds of the
    whole call (the source's sha256 included) and this process's peak RSS."""
    from stackwise_ray.config import load_config
    from stackwise_ray.data import token_store_location

    cfg = load_config(cfg_path)
    cfg.ray.storage_path = storage
    t0, c0 = time.perf_counter(), time.process_time()
    location = token_store_location(cfg)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    meta = read_json(os.path.join(location, "meta.json"))
    print(json.dumps({"wall_s": wall, "cpu_s": cpu, "build_s": meta["build_s"], "tokens": meta["tokens"],
                      "store_bytes": os.path.getsize(os.path.join(location, "tokens.bin")),
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def probe_child(cfg_path: str, storage: str) -> None:
    """In a fresh process, over a built store: the memory the split and a phase's batch
    order take (peak RSS above the RSS after imports), and the time to read one batch
    (what a cached step reads from the corpus)."""
    from stackwise_ray.config import load_config
    from stackwise_ray.data import GlobalBatches, open_datasets, token_store_location

    cfg = load_config(cfg_path)
    cfg.ray.storage_path = storage
    location = token_store_location(cfg)
    base = current_rss_mb()
    train_ds, _ = open_datasets(cfg, location)
    batches = GlobalBatches(train_ds, BATCH, cfg.training.seed)
    batches.first_reads(STEPS)
    t0, reads = time.perf_counter(), 0
    for reads, batch in enumerate(batches, 1):
        if reads == STEPS:
            break
    read_ms = 1000 * (time.perf_counter() - t0) / reads
    print(json.dumps({"index_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base,
                      "read_ms": read_ms, "examples": len(train_ds)}))


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def current_rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


def child(mode: str, cfg_path: str, storage: str) -> dict:
    out = subprocess.run([sys.executable, __file__, mode, cfg_path, "--storage", storage], cwd=ROOT,
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def tokenize(cfg_path: str, tmp: str) -> dict:
    storage = tempfile.mkdtemp(prefix="tok-", dir=tmp)
    measured = {**child("--tokenize", cfg_path, storage), **child("--probe", cfg_path, storage)}
    shutil.rmtree(storage)  # the runs build their own: this one only measured the build
    return measured


def peak_rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None


def train(cfg_path: str, storage: str, name: str, log: str) -> dict:
    """`python -m stackwise_ray.train` in a fresh process: wall s, driver peak RSS, history."""
    t0 = time.perf_counter()
    with open(log, "w") as out:
        p = subprocess.Popen([sys.executable, "-m", "stackwise_ray.train", cfg_path, "--storage", storage,
                              "--name", name], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        peak, load = 0.0, []
        while p.poll() is None:
            peak = max(peak, peak_rss_mb(p.pid) or 0.0)  # VmHWM only grows: the last poll is the peak
            load.append(os.getloadavg()[0])
            time.sleep(0.2)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{name}: exit status {p.returncode}; see {log}")
    history = read_json(os.path.join(storage, name, "summary.json"))["history"]
    return {"wall_s": wall, "driver_mb": peak, "load": sum(load) / max(1, len(load)), "history": history,
            "started": time.time() - wall,
            "ended": time.time()}


def stores(storage: str) -> list[dict]:
    """The complete token stores under `storage`, with when they were finished."""
    root = os.path.join(storage, "tokens")
    found = []
    for key in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        meta = os.path.join(root, key, "meta.json")
        if os.path.exists(meta):
            found.append({"key": key, "finished": os.path.getmtime(meta), **read_json(meta)})
    return found


# ---------------------------------------------------------------- report

def step_ms(m: dict) -> float:
    return 1000 * m["train_s"] / m["steps"]


def run_rows(results: dict) -> list[list]:
    rows = []
    for (corpus, backend), r in results.items():
        h = r["history"]
        c1, c2 = h[1]["cache"], h[2]["cache"]
        rows.append([corpus, backend, r["wall_s"], f"{r['load']:.1f}", "yes" if r["built_store"] else "no",
                     f"{c1['build_s']:.1f} / {c2['build_s']:.1f}",
                     f"{c1['bytes'] / MB:.1f} / {c2['bytes'] / MB:.1f}", f"{c1['rows']} / {c2['rows']}",
                     f"{c1['shards']} / {c2['shards']}", " / ".join(f"{step_ms(m):.1f}" for m in h),
                     " / ".join(str(m["trunk_forwards"]) for m in h[1:]),
                     " / ".join(f"{m['peak_memory_mb']:.0f}" for m in h), r["driver_mb"]])
    return rows


def verdict(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def targets(results: dict, tok: dict, corpora: list[str], steps: int) -> list[str]:
    from stackwise_ray.cache import cache_bytes

    big, lines = corpora[-1], []
    worker = {b: {c: max(m["peak_memory_mb"] for m in results[c, b]["history"]) for c in corpora} for b in BACKENDS}
    for backend in BACKENDS:
        driver = {c: results[c, backend]["driver_mb"] for c in corpora}
        ratio = worker[backend][big] / worker[backend]["pydoc"]
        lines.append(f"- Worker peak RSS, {backend}: {big} {worker[backend][big]:.0f} MB against pydoc "
                     f"{worker[backend]['pydoc']:.0f} MB = {ratio:.2f}× (target ≤ 1.25×): {verdict(ratio <= 1.25)}. "
                     "The driver's: " + ", ".join(f"{c} {v:.0f} MB" for c, v in driver.items())
                     + f" ({driver[big] / driver['pydoc']:.2f}×).")
    examples = {c: tok[c]["tokens"] // SEQ_LEN for c in corpora}
    split = tok[big]["index_mb"] - tok["pydoc"]["index_mb"]
    growth = results[big, BACKENDS[0]]["driver_mb"] - results["pydoc", BACKENDS[0]]["driver_mb"]
    phase0 = {b: results[big, b]["history"][0]["peak_memory_mb"] - results["pydoc", b]["history"][0]["peak_memory_mb"]
              for b in BACKENDS}
    lines.append(f"  What still grows with the corpus: the split. {big} has {examples[big]:,} examples against "
                 f"pydoc's {examples['pydoc']:,}; the split and batch order alone peak {split:.0f} MB higher "
                 f"(*split MB*; {1e6 * split / (examples[big] - examples['pydoc']):.0f} B per example: the seeded "
                 "split permutation while it is made, the training ids (int64, kept), and each epoch's batch "
                 "permutation), against "
                 f"a driver that grew {growth:.0f} MB and phase-0 workers that grew "
                 + ", ".join(f"{b} +{phase0[b]:.0f} MB" for b in BACKENDS)
                 + ". The arrow backend's workers peak "
                 + ", ".join(f"{worker['arrow'][c] - worker['object_store'][c]:.0f}" for c in corpora)
                 + " MB above the object store's on the same caches: a Parquet shard is read into a buffer "
                 "and decoded into a second one (Arrow's allocator keeps the first one's pages), while an "
                 "object-store shard is mapped without a copy.")
    for backend in BACKENDS:
        # phase 2 alone: phase 1 trains while phase 2's worker group starts on the same CPUs (prestart)
        cached = {c: step_ms(results[c, backend]["history"][2]) for c in corpora}
        spread = max(cached.values()) / min(cached.values())
        lines.append(f"- Cached step time (phase 2: phase 1 shares the CPUs with the prestarting phase 2), {backend}: "
                     + ", ".join(f"{c} {v:.1f} ms" for c, v in cached.items())
                     + f"; slowest / fastest = {spread:.2f} (target ≤ 1.10): {verdict(spread <= 1.10)}.")
    reads = {c: tok[c]["read_ms"] for c in corpora}
    lines.append("  The part of a cached step that depends on the corpus is reading its batch from the token store "
                 "(*read ms*, shuffle included): " + ", ".join(f"{c} {v:.2f} ms" for c, v in reads.items())
                 + f", {max(reads.values()) - min(reads.values()):.2f} ms apart; the rest (the cache shard "
                 "lookup, the new stack's forward and backward) is the same work on every corpus, so a spread "
                 "beyond that comes from the machine's load (column *load*), not the corpus size.")
    exact, rows_ok = True, True
    for r in results.values():
        for m in r["history"][1:]:
            c = m["cache"]
            exact &= c["bytes"] == cache_bytes(c["rows"], SEQ_LEN, D_MODEL, c["dtype"])
            rows_ok &= c["rows"] == steps * BATCH
    c = results["pydoc", BACKENDS[0]]["history"][1]["cache"]
    activations = c["rows"] * SEQ_LEN * D_MODEL * 4
    lines.append(f"- Cache bytes = consumed examples × seq_len × d_model × dtype bytes: every cache holds "
                 f"{'exactly' if rows_ok else 'NOT'} steps × batch = {steps} × {BATCH} = {steps * BATCH:,} rows "
                 f"(dtype {c['dtype']}), and its bytes are {'exactly' if exact else 'NOT'} "
                 f"`stackwise_ray.cache.cache_bytes` = rows × (8 + 4 × seq_len + seq_len × d_model × dtype bytes): "
                 f"the 8-byte example id and the int32 corrupted input ids come on top of the activations, "
                 f"{c['bytes']:,} B against {activations:,} B (+{100 * (c['bytes'] / activations - 1):.2f}%), "
                 f"whatever the corpus size: {verdict(exact and rows_ok)}.")
    rates = {c: t["mb_cpu_s"] for c, t in tok.items() if c != "pydoc"}
    lines.append("- Byte tokenizer ≥ 50 MB/s per CPU (MB per CPU second of the one building process, hash "
                 "included): " + ", ".join(f"{c} {v:.1f}" for c, v in rates.items())
                 + f": {verdict(min(rates.values()) >= 50)}.")
    return lines


# ---------------------------------------------------------------- --build: the parallel token-store build

BUILD_MB, BUILD_SHARDS, VOCAB = 24, 16, 4096


def build_corpus(tmp: str, mb: float) -> tuple[str, str]:
    """(a directory of Parquet shards of Python sources, and one JSONL file of the same
    sources), each about `mb` MB; and a BPE tokenizer trained on 400 of the files."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    paths = sysconfig.get_paths()
    files = [f for r in dict.fromkeys([paths["purelib"], paths["platlib"]]) for f in python_files(r)]
    texts, size = [], 0
    for name in files:
        try:
            with open(name, encoding="utf-8") as f:
                text = f.read()
        except (UnicodeDecodeError, OSError):
            continue
        texts.append(text)
        size += len(text.encode())
        if size >= mb * MB:
            break
    shards = os.path.join(tmp, "shards")
    os.makedirs(shards)
    # shards of about equal text bytes (files in order), so no task gets much more work than another
    groups, acc = [[] for _ in range(BUILD_SHARDS)], 0
    for text in texts:
        groups[min(BUILD_SHARDS - 1, int(acc * BUILD_SHARDS // size))].append(text)
        acc += len(text.encode())
    for i, group in enumerate(groups):
        pq.write_table(pa.table({"text": group}), os.path.join(shards, f"part-{i:03d}.parquet"), row_group_size=256)
    with open(os.path.join(tmp, "one.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts[:400], trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["[PAD]", "[MASK]", "<s>", "</s>"],
                                                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(os.path.join(tmp, "bpe.json"))
    return shards, os.path.join(tmp, "one.jsonl"), size / MB


def prepare(cfg_path: str, storage: str, local: bool, num_cpus: int | None) -> dict:
    """`python -m stackwise_ray.prepare` in a fresh process; the store's meta and its wall time."""
    # one process is one CPU, as each Ray task is: the library's own threads off in both
    env = {**os.environ, "RAY_ADDRESS": "", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "stackwise_ray.prepare", cfg_path, "--storage", storage]
    cmd += ["--local"] if local else ["--num-cpus", str(num_cpus)]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"prepare failed: {out.stderr.strip().splitlines()[-1:]}")
    [location] = [line.split(": ", 1)[1] for line in out.stdout.splitlines() if line.strip().startswith("location:")]
    meta = read_json(os.path.join(location, "meta.json"))
    with open(os.path.join(location, "tokens.bin"), "rb") as f:
        import hashlib
        digest = hashlib.sha256(f.read()).hexdigest()
    return {**meta, "wall_s": wall, "digest": digest}


def measure_build(tmp: str, mb: float, cpus: list[int]) -> str:
    shards, _, text_mb = build_corpus(tmp, mb)
    rows, ok, load = [], True, os.getloadavg()[0]
    for name, source in ((f"{BUILD_SHARDS} Parquet shards", shards),):
        cfg_path = write_yaml({"data": {"source": source, "tokenizer": os.path.join(tmp, "bpe.json"), "seq_len": 128}},
                              os.path.join(tmp, "build.yaml"))
        single = prepare(cfg_path, os.path.join(tmp, f"s-{len(rows)}"), True, None)
        base = text_mb / single["build_s"]
        rows.append([name, text_mb, single["units"], "1 process", f"{single['tokens']:,}",
                     single["build_s"], base, 1.0, "-", "-"])
        print(rows[-1], flush=True)
        for n in cpus:
            par = prepare(cfg_path, os.path.join(tmp, f"p-{len(rows)}"), False, n)
            rate = text_mb / par["build_s"]
            same = par["digest"] == single["digest"]
            met = rate >= 0.8 * n * base
            ok = ok and same
            rows.append([name, text_mb, par["units"], f"Ray, {n} CPUs", f"{par['tokens']:,}",
                         par["build_s"], rate, rate / base, "yes" if same else "NO", verdict(met)])
            print(rows[-1], flush=True)
    body = (f"The token store's build of a corpus of the installed packages' `.py` files ({mb:.0f} MB of text) with a "
            f"`tokenizers` BPE file trained inside the benchmark (vocabulary {VOCAB:,}, byte-level pre-tokenizer), "
            "each build a fresh `python -m stackwise_ray.prepare` process: `--local` (one process, the library's own "
            "`encode_batch` with its own threads off, `TOKENIZERS_PARALLELISM=false`, as in each task), then Ray tasks on a local Ray of *CPUs* CPUs, one unit per task (a Parquet shard's row "
            "groups up to 16 MB), joined in order. *build s*: the build alone (the "
            "source's sha256 and Ray's start are outside it); *MB/s*: MB of text per build second; *x*: over one "
            "process; *identical*: the store's bytes equal the one-process store's; *target*: >= 0.8 x CPUs x one "
            f"process. The machine's 1-minute load average when this started: {load:.1f} (above about 1 per "
            f"CPU, other work shared its {os.cpu_count()} CPUs).\n\n")
    scaling = ("\n\n**How it scales.** Each unit is one Ray task holding one CPU, at most two per CPU of the cluster in "
               "flight, so the rate grows with the CPUs Ray offers (`ray start --num-cpus N` on each node, or "
               "`prepare --num-cpus N` for a local Ray) while there are more units than CPUs and the CPUs are "
               "otherwise idle: a unit is a Parquet shard's row groups up to 16 MB, or 16 MB of an uncompressed "
               "text or JSONL file, and a compressed file is one unit, so a corpus of fewer units than CPUs leaves "
               "CPUs idle. The driver writes the ids in order (hundreds of MB/s), which bounds it from above. Each "
               "task's worker process costs its start (imports, about a second on an idle machine) once; on a machine "
               "whose CPUs other work already holds (the load average above), the tasks only share the same CPUs "
               "and the start-up is pure cost, which is what the rows show when the target is not met.")
    return body + table(["source", "MB", "units", "build", "tokens", "build s", "MB/s", "x", "identical", "target"], rows) + scaling


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small corpora and 10 steps; prints, writes no section")
    parser.add_argument("--build", action="store_true", help="measure the parallel token-store build (issue 27)")
    parser.add_argument("--build-mb", type=float, default=BUILD_MB, help="--build: MB of Python sources")
    parser.add_argument("--cpus", default=str(os.cpu_count()), help="--build: comma-separated Ray CPU counts")
    parser.add_argument("--tokenize", help=argparse.SUPPRESS)
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    parser.add_argument("--storage", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tokenize:
        return tokenize_child(args.tokenize, args.storage)
    if args.probe:
        return probe_child(args.probe, args.storage)
    if args.build:
        tmp = tempfile.mkdtemp(prefix="bench-p8-build-")
        try:
            body = measure_build(tmp, args.build_mb, [int(c) for c in args.cpus.split(",")])
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return write_section("p8build", "P8: the token store built in parallel", body)
    steps = 10 if args.quick else STEPS
    tmp = tempfile.mkdtemp(prefix="bench-p8-")
    try:
        body = measure(tmp, steps, packages_mb=20 if args.quick else MIN_PACKAGES_MB,
                       stdlib_mb=5 if args.quick else None)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.quick:
        print(body)
    else:
        write_section("p8", "P8: corpus size", body)


def measure(tmp: str, steps: int, packages_mb: float, stdlib_mb: float | None) -> str:
    sources = assemble(tmp, packages_mb, stdlib_mb)
    size = {c: corpus_bytes(s) for c, s in sources.items()}
    for c in CORPORA:
        print(f"{c}: {size[c] / MB:.2f} MB", flush=True)
    tok, results, built = {}, {}, {}
    for c in CORPORA:
        paths = {b: write_yaml(run_config(sources[c], b, steps), os.path.join(tmp, f"{c}-{b}.yaml")) for b in BACKENDS}
        t = tokenize(paths[BACKENDS[0]], tmp)
        tok[c] = {**t, "mb_s": size[c] / MB / t["build_s"], "mb_cpu_s": size[c] / MB / t["cpu_s"]}
        print(f"{c}: tokenized in {t['build_s']:.1f} s ({tok[c]['mb_s']:.1f} MB/s, {tok[c]['mb_cpu_s']:.1f} MB per "
              f"CPU s), peak RSS {t['peak_rss_mb']:.0f} MB; split and order {t['index_mb']:.0f} MB, "
              f"batch read {t['read_ms']:.2f} ms", flush=True)
        storage = os.path.join(tmp, f"runs-{c}")
        for b in BACKENDS:
            r = train(paths[b], storage, b, os.path.join(tmp, f"{c}-{b}.log"))
            made = stores(storage)
            r["built_store"] = any(r["started"] <= s["finished"] <= r["ended"] for s in made)
            built[c] = made
            results[c, b] = r
            h = r["history"]
            print(f"{c} {b}: {r['wall_s']:.0f} s (load {r['load']:.1f}), driver {r['driver_mb']:.0f} MB, worker "
                  + "/".join(f"{m['peak_memory_mb']:.0f}" for m in h) + " MB, step ms "
                  + "/".join(f"{step_ms(m):.1f}" for m in h), flush=True)
    return report(sources, size, tok, results, built, steps)


def report(sources, size, tok, results, built, steps) -> str:
    corpora = list(sources)
    epoch = {c: results[c, BACKENDS[0]]["history"][1]["cache"] for c in corpora}
    tok_rows = [[c, size[c] / MB, f"{tok[c]['tokens']:,}", tok[c]["store_bytes"] / MB, tok[c]["build_s"],
                 tok[c]["wall_s"] - tok[c]["build_s"], tok[c]["mb_s"], tok[c]["mb_cpu_s"], tok[c]["peak_rss_mb"],
                 f"{tok[c]['examples']:,}", tok[c]["index_mb"], f"{tok[c]['read_ms']:.2f}", len(built[c]),
                 "yes" if results[c, BACKENDS[0]]["built_store"] else "no",
                 "yes" if results[c, BACKENDS[1]]["built_store"] else "no"] for c in corpora]
    one_run = all(len(built[c]) == 1 and results[c, BACKENDS[0]]["built_store"]
                  and not results[c, BACKENDS[1]]["built_store"] for c in corpora)
    load = [r["load"] for r in results.values()]
    within_epoch = all(steps * BATCH <= tok[c]["examples"] for c in corpora)
    body = [
        (f"The same 3-stack run (append, frozen trunk, cached; d_model {D_MODEL}, 4 heads, seq_len {SEQ_LEN}, "
        f"byte tokenizer, {steps} steps of batch {BATCH} per stack, so {steps * BATCH:,} examples read per "
        "phase; 1 worker) on three corpora, once per cache backend, each a fresh `python -m stackwise_ray.train` "
        "process. *pydoc*: the bundled corpus; *stdlib*: the running Python's standard-library `.py` files as JSONL, "
        f"one file per line; *packages*: the installed packages' `.py` files the same way (at least "
        f"{MIN_PACKAGES_MB} MB). The corpora are built in a temporary directory and deleted afterwards. "
        f"Other work shared the machine's CPUs while this ran (1-minute load average {min(load):.1f} to "
        f"{max(load):.1f} during the runs, column *load*), so times and their ratios carry that noise; "
        "memory does not.\n"),
        ("**Tokenization**: the token store built alone in a fresh process (`token_store_location`, byte "
        "tokenizer, one process = one CPU). *hash s*: the sha256 of the source that keys the store, outside "
        "*build s*; *MB/s*: per wall second of the build; *MB/CPU s*: per CPU second of the whole call. Then, in "
        "another fresh process over that store, the training split and a phase's batch order (*split MB*: peak "
        "RSS above the RSS after imports) and one batch read from the store (*read ms*). The two runs of a "
        "corpus shared one storage directory: *stores* counts the token stores it holds afterwards, and the "
        "last columns say which run's time span holds the store's completion "
        f"({'the first run built it, the second reused it, for every corpus' if one_run else 'NOT built once'}).\n"),
        table(["corpus", "MB", "tokens", "store MB", "build s", "hash s", "MB/s", "MB/CPU s", "peak RSS MB",
               "train examples", "split MB", "read ms", "stores", "built in run 1", "built in run 2"], tok_rows), "",
        ("**Runs.** Per phase (0 / 1 / 2) or per cached phase (1 / 2). *cache*: `summary.json` "
        "history[k][\"cache\"]; *step ms*: train_s / steps; *worker MB*: the phase worker's peak RSS "
        "(`peak_memory_mb`); *driver MB*: the `stackwise_ray.train` process's VmHWM; *wall s*: process start "
        "to exit, Ray start-up included (the first run of a corpus also builds its token store).\n"),
        table(["corpus", "backend", "wall s", "load", "tokenized here", "cache build s", "cache MB", "cache rows",
               "shards", "step ms", "trunk fwd", "worker MB", "driver MB"], run_rows(results)), "",
        f"{'Less than one epoch everywhere' if within_epoch else 'NOT less than one epoch'}"
        f": {steps * BATCH:,} examples read per phase against the *train examples* above; phase 1's caches hold "
        + ", ".join(f"{epoch[c]['rows']:,}" for c in corpora) + " rows.\n",
        "**Targets (issue 12)**\n",
        *targets(results, tok, corpora, steps),
    ]
    return "\n".join(body)


if __name__ == "__main__":
    main()
