"""Activation caches without Ray: what is cached, incremental builds, staleness, Parquet."""

import subprocess
import sys
import numpy as np
import pytest
import torch

from stackwise_ray.builder import ProgressiveRackBuilder
from stackwise_ray.cache import (ShardReader, StaleCacheError, cache_bytes, cache_complete, compute_cache,
                                 compute_shard, plan_layout, read_shard, shard_intact, shard_path,
                                 write_manifest, write_shard)
from stackwise_ray.data import GlobalBatches, ProgressiveDataLoader, build_datasets
from stackwise_ray.masking import TimeStepMasking
from stackwise_ray.phase import forever, train_stack
from stackwise_ray.plan import phase_plan

from .conftest import tiny_config


def grown(config, n):
    torch.manual_seed(0)
    builder = ProgressiveRackBuilder(config)
    for _ in range(n):
        builder.add_stack()
    train, _, tok = build_datasets(config)
    return builder, train, TimeStepMasking(config, tok)



def test_incremental_cache_equals_a_cache_from_scratch():
    config = tiny_config(data={"max_examples": 40})
    builder, train, masking = grown(config, 3)
    rack = builder.build_rack()
    c1 = compute_cache(rack, train, masking, 2, 0, 1)
    step = compute_cache(rack, train, masking, 2, 1, 2, prev=c1)
    scratch = compute_cache(rack, train, masking, 2, 0, 2)
    assert np.array_equal(step.example_ids, train.example_ids.numpy())
    np.testing.assert_allclose(step.hidden, scratch.hidden, rtol=1e-5, atol=1e-6)
    assert step.nbytes == step.hidden.nbytes + step.input_ids.nbytes + step.example_ids.nbytes


def test_stale_cache_is_refused():
    config = tiny_config(data={"max_examples": 40})
    builder, train, masking = grown(config, 2)
    cache = compute_cache(builder.build_rack(), train, masking, 1, 0, 1)
    ids = train.example_ids[:4]
    other = TimeStepMasking(tiny_config(data={"max_examples": 40}, training={"seed": 1}))
    batch = other.generate_masks_for_stack({"input_ids": train.input_ids[:4], "example_ids": ids}, 1)
    with pytest.raises(StaleCacheError):
        cache.lookup(ids, batch["input_ids"])
    with pytest.raises(StaleCacheError):
        cache.lookup(torch.tensor([10_000]))


def test_parquet_round_trip(tmp_path):
    config = tiny_config(data={"max_examples": 20})
    builder, train, masking = grown(config, 1)
    cache = compute_cache(builder.build_rack(), train, masking, 0, 0, 1)
    for dtype in ("float32", "bfloat16"):
        cache = compute_cache(builder.build_rack(), train, masking, 0, 0, 1, dtype=dtype)
        write_shard(cache, str(tmp_path / f"{dtype}.parquet"))
        back = read_shard(str(tmp_path / f"{dtype}.parquet"))
        for name, array in cache.arrays().items():
            assert np.array_equal(getattr(back, name), array), name
        assert cache.nbytes == cache_bytes(len(train), 32, 32, dtype)


def test_qlora_trunk_streams_from_cached_inputs_like_a_recompute():
    config = tiny_config(trunk_strategy="qlora", qlora_enabled=True, qlora_rank=4, data={"max_examples": 40},
                         training={"steps_per_stack": 4})
    trained = {}
    for cached in (False, True):
        builder, train, masking = grown(config, 1)
        torch.manual_seed(1)
        builder.add_stack()
        builder.prepare_phase()
        rack = builder.build_rack()
        cache = compute_cache(rack, train, masking, 1, 0, 0) if cached else None  # trunk inputs
        calls = []
        hook = builder.stack(0).register_forward_hook(lambda *a: calls.append(1))
        batches = ProgressiveDataLoader(GlobalBatches(train, 8, 0), masking, 1, cache, cached)
        train_stack(rack, batches, config.training, 4, start=0)
        hook.remove()
        assert len(calls) == 4  # the adapted trunk is streamed either way
        trained[cached] = {n: p.detach().clone() for n, p in rack.named_parameters() if p.requires_grad}
    assert any("lora_B" in n for n in trained[True])
    for name, p in trained[False].items():
        torch.testing.assert_close(trained[True][name], p, rtol=1e-5, atol=1e-6)


def consumed(train, config, steps):
    """The example ids the first `steps` global batches of a phase read, in reading order."""
    batches = forever(GlobalBatches(train, config.data.batch_size, config.training.seed))
    return torch.cat([next(batches)["example_ids"] for _ in range(steps)]).numpy()


def test_a_cache_holds_the_examples_the_phase_reads_once_each_in_first_read_order():
    config = tiny_config(data={"max_examples": 60})
    _, train, _ = grown(config, 0)
    for steps in (3, len(train) // 8 * 2 + 1):  # part of one epoch; into a third epoch
        layout = plan_layout(config, train, steps, "float32")
        read = consumed(train, config, steps)
        _, first = np.unique(read, return_index=True)
        assert np.array_equal(layout.example_ids, read[np.sort(first)])
        assert layout.rereads == (steps > len(train) // 8)
    assert len(plan_layout(config, train, 3, "float32").example_ids) == 3 * 8


def test_shard_reader_reads_a_phase_shard_by_shard_and_matches_one_whole_cache():
    config = tiny_config(data={"max_examples": 200})
    config.ray.cache_shard_mb = 1  # shards of 3 batches: 7 shards for 20 steps
    builder, train, masking = grown(config, 2)
    rack, steps = builder.build_rack(), 20
    layout = plan_layout(config, train, steps, "float32")
    layout = type(layout)(**{**layout.__dict__, "shard_rows": 24})
    whole = compute_cache(rack, train, masking, 2, 0, 2, positions=layout.positions)
    shards = [compute_shard(rack, train, masking, 2, 0, 2, layout.positions[layout.shard(i)]) for i in range(layout.shards)]
    held = []

    def load(i):
        held.append(i)
        return shards[i]

    reader = ShardReader(layout, load, resident=2)
    batches = ProgressiveDataLoader(GlobalBatches(train, 8, config.training.seed), masking, 2)
    it = forever(batches)
    for _ in range(steps):
        batch = next(it)
        got = reader.lookup(batch["example_ids"], batch["input_ids"])
        assert torch.equal(got, whole.lookup(batch["example_ids"], batch["input_ids"]))
        assert len(reader._shards) <= 2
    reader.close()
    assert layout.shards == 7 and sorted(held) == list(range(7)) and reader.loads == 7  # each shard loaded once
    wrong = ShardReader(layout, lambda i: shards[(i + 1) % len(shards)])
    with pytest.raises(StaleCacheError):
        wrong.lookup(torch.from_numpy(layout.example_ids[:4]))


def test_a_bfloat16_cache_of_a_bfloat16_stack_is_lossless_and_half_the_bytes():
    config = tiny_config(data={"max_examples": 40}, new_stack_precision="bfloat16")
    builder, train, masking = grown(config, 2)
    plan = phase_plan(config, 2).cache
    assert (plan.dtype, plan.rounds) == ("bfloat16", False)
    config.ray.cache_dtype = "float16"  # another 16-bit format rounds a bfloat16 stream
    assert (phase_plan(config.validate(), 2).cache.dtype, phase_plan(config.validate(), 2).cache.rounds) == ("float16", True)
    config.ray.cache_dtype = "float32"  # wider: lossless
    assert phase_plan(config.validate(), 2).cache.rounds is False
    config.ray.cache_dtype = None
    qlora = phase_plan(tiny_config(trunk_strategy="qlora", qlora_enabled=True), 2).cache
    assert (qlora.kind, qlora.dtype, qlora.rounds) == ("trunk_inputs", "float32", False)
    rack = builder.build_rack()
    full = compute_cache(rack, train, masking, 2, 0, 2)
    half = compute_cache(rack, train, masking, 2, 0, 2, dtype="bfloat16")
    ids = train.example_ids[:8]
    assert torch.equal(half.lookup(ids), full.lookup(ids))
    assert half.hidden.nbytes * 2 == full.hidden.nbytes


# What building a phase's cache (Parquet shards, one at a time) and reading it through a
# ShardReader for the phase's steps add to RSS at their peak, in one process
CACHE_RSS = """
import sys, tempfile
from stackwise_ray.builder import ProgressiveRackBuilder
from stackwise_ray.cache import ShardReader, compute_shard, plan_layout, read_shard, shard_path, write_shard
from stackwise_ray.config import StackWiseConfig
from stackwise_ray.data import GlobalBatches, ProgressiveDataLoader, build_datasets
from stackwise_ray.masking import TimeStepMasking
from stackwise_ray.phase import forever
def status_mb(key):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key)) / 1024
for source, storage in zip(*[iter(sys.argv[1:])] * 2):
    config = StackWiseConfig.from_dict({"model": {"d_model": 32, "n_heads": 2, "max_seq_len": 128},
                                        "data": {"source": source, "seq_len": 128, "batch_size": 16},
                                        "ray": {"storage_path": storage, "cache_shard_mb": 1}}).validate()
    train, _, tokenizer = build_datasets(config)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    start = status_mb("VmRSS")
    builder = ProgressiveRackBuilder(config)
    builder.add_stack()
    rack, masking, steps = builder.build_rack(), TimeStepMasking(config, tokenizer), 60
    layout = plan_layout(config, train, steps, "float32")
    directory = tempfile.mkdtemp(dir=storage)
    for i in range(layout.shards):
        write_shard(compute_shard(rack, train, masking, 1, 0, 1, layout.positions[layout.shard(i)]), shard_path(directory, i))
    reader = ShardReader(layout, lambda i: read_shard(shard_path(directory, i)))
    batches = forever(ProgressiveDataLoader(GlobalBatches(train, 16, config.training.seed), masking, 1, reader, True))
    for _ in range(steps):
        next(batches)
    reader.close()
    print(len(train), layout.rows, layout.shards, reader.loads, round(status_mb("VmHWM") - start))
"""


@pytest.mark.slow
def test_building_and_reading_a_cache_costs_the_same_memory_on_a_corpus_70x_larger(tmp_path):
    """A phase's cache and its reads follow its steps, not the corpus (the whole-corpus
    cache of the stdlib corpus at this d_model would be ~4 GB)."""
    from .test_token_store import ROOT, stdlib_jsonl

    corpus = tmp_path / "stdlib.jsonl"
    stdlib_jsonl(corpus)
    # pydoc twice: the first pass also pays one-time costs (imports, allocator arenas)
    runs = ["pydoc", str(tmp_path / "a"), "pydoc", str(tmp_path / "a"), str(corpus), str(tmp_path / "b")]
    out = subprocess.run([sys.executable, "-c", CACHE_RSS, *runs], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, check=True)
    (n_small, rows, shards, loads, small), (n_big, rows_big, _, loads_big, big) = (
        [int(x) for x in line.split()] for line in out.stdout.split("\n")[1:3])
    print(f"cache build + read peak RSS added: pydoc {small} MB ({n_small} examples), stdlib {big} MB ({n_big})")
    assert n_big > 60 * n_small and rows == rows_big == 60 * 16 and shards > 1 and loads == loads_big == shards
    assert big - small < 32


def test_a_cache_build_stopped_midway_is_not_taken_as_complete(tmp_path):
    config = tiny_config(data={"max_examples": 100})
    builder, train, masking = grown(config, 1)
    layout = plan_layout(config, train, 6, "float32")
    layout = type(layout)(**{**layout.__dict__, "shard_rows": 16})  # 3 shards of the 48 rows
    directory = str(tmp_path / "cache")
    shards = [compute_shard(builder.build_rack(), train, masking, 1, 0, 1, layout.positions[layout.shard(i)])
              for i in range(layout.shards)]
    for i in (0, 1):
        write_shard(shards[i], shard_path(directory, i))
    (tmp_path / "cache" / "shard_00002.parquet.tmp123").write_bytes(b"PAR1 half a shard")  # killed while writing
    assert [shard_intact(shard_path(directory, i)) for i in range(3)] == [True, True, False]
    assert not cache_complete(directory, layout)
    write_shard(shards[2], shard_path(directory, 2))
    assert not cache_complete(directory, layout)  # every shard, but no manifest yet
    write_manifest(directory, layout)
    assert cache_complete(directory, layout)
    other = type(layout)(**{**layout.__dict__, "dtype": "bfloat16"})
    assert not cache_complete(directory, other)  # a manifest of another dtype
    path = tmp_path / "cache" / "shard_00001.parquet"
    path.write_bytes(path.read_bytes()[:-10])
    assert not cache_complete(directory, layout)


def test_a_refused_rounding_cache_is_recomputed_and_rounded_as_the_cache_would_store_it():
    """plan.CachePlan.rounds: a phase whose bfloat16 cache of a float32 trunk is refused
    trains on the recomputed stream rounded to bfloat16 (phase.rounding_hook), which is what
    its phase id says; evaluations see the stream as it is."""
    from stackwise_ray.phase import rounding_hook

    config = tiny_config(data={"max_examples": 40})
    builder, train, masking = grown(config, 2)
    rack = builder.build_rack().eval()
    cache = compute_cache(rack, train, masking, 1, 0, 1, dtype="bfloat16")
    batch = masking.generate_masks_for_stack({"input_ids": train.input_ids[:8], "example_ids": train.example_ids[:8]}, 1)
    x, t = batch["input_ids"], batch["time_step"]
    cached, _ = rack(x, t, hidden=cache.lookup(batch["example_ids"], x), start=1)
    exact, _ = rack(x, t)
    hook = rounding_hook(rack, 1, "bfloat16")
    rounded, _ = rack(x, t)  # a training forward: grad enabled
    with torch.no_grad():
        evaluated, _ = rack(x, t)
    hook.remove()
    assert torch.equal(rounded, cached) and not torch.equal(rounded, exact) and torch.equal(evaluated, exact)
