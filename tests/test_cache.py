"""Activation caches without Ray: what is cached, incremental builds, staleness, Parquet."""

import numpy as np
import pytest
import pyarrow.parquet as pq
import torch

from stackwise_ray.builder import ProgressiveRackBuilder
from stackwise_ray.cache import StaleCacheError, compute_cache, from_arrow, plan_cache, write_parquet
from stackwise_ray.data import GlobalBatches, ProgressiveDataLoader, build_datasets
from stackwise_ray.masking import TimeStepMasking
from stackwise_ray.phase import train_stack

from .conftest import tiny_config


def grown(config, n):
    torch.manual_seed(0)
    builder = ProgressiveRackBuilder(config)
    for _ in range(n):
        builder.add_stack()
    train, _, tok = build_datasets(config)
    return builder, train, TimeStepMasking(config, tok)


def test_plan_says_what_each_case_caches():
    assert plan_cache(tiny_config(), 0).kind == "none"
    assert (plan_cache(tiny_config(), 2).kind, plan_cache(tiny_config(), 2).position) == ("trunk_outputs", 2)
    qlora = plan_cache(tiny_config(trunk_strategy="qlora", qlora_enabled=True), 2)
    assert (qlora.kind, qlora.position) == ("trunk_inputs", 0)
    assert "prepend" in plan_cache(tiny_config(building_mode="prepend"), 1).reason
    assert plan_cache(tiny_config(cache_activations=False), 1).kind == "none"


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
    write_parquet(cache, str(tmp_path / "c.parquet"))
    back = from_arrow(pq.read_table(tmp_path / "c.parquet"), 32)
    for name, array in cache.arrays().items():
        assert np.array_equal(getattr(back, name), array), name


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
