"""preflight.py: what a run needs from this machine and the outside world, checked after
the schema and before Ray starts."""

import pytest

from stackwise_ray import preflight
from stackwise_ray.config import ConfigError, StackWiseConfig


def progressive(**kw):
    return StackWiseConfig.from_dict({"training": {"progressive": kw}})


def checked(config: StackWiseConfig) -> StackWiseConfig:
    preflight.check(config)
    return config


def error_of(fn):
    with pytest.raises(ConfigError) as e:
        fn()
    return str(e.value)


def test_custom_time_mapping_errors():
    msg = error_of(lambda: checked(progressive(stack_time_mapping="no_such_module_xyz:f").validate()))
    assert msg.startswith("training.progressive.custom_time_mapping: cannot import module 'no_such_module_xyz'")
    msg = error_of(lambda: checked(progressive(stack_time_mapping="tests.time_mappings:wrong_signature").validate()))
    assert "must accept (stack_idx, max_stacks, num_time_steps)" in msg


def test_missing_data_file_is_named():
    msg = error_of(lambda: checked(StackWiseConfig.from_dict({"data": {"source": "/nonexistent/corpus.txt"}}).validate()))
    assert msg == "data.source: no such file: /nonexistent/corpus.txt (use 'pydoc' for the bundled corpus)"


def test_the_memory_estimate_is_a_lower_bound_of_a_built_rack():
    from stackwise_ray.builder import ProgressiveRackBuilder
    from stackwise_ray.preflight import footprint

    for model in ({}, {"d_ff": 96, "n_kv_heads": 1, "tie_embeddings": False}):
        config = StackWiseConfig.from_dict({
            "model": {"d_model": 32, "n_heads": 2, "blocks_per_stack": 2, "max_seq_len": 64, **model},
            "data": {"seq_len": 32, "batch_size": 4},
            "training": {"progressive": {"max_stacks": 3, "time_embedding_dim": 16, "time_encoding_type": "learned",
                                         "num_time_steps": 50}}}).validate()
        builder = ProgressiveRackBuilder(config)
        for _ in range(3):
            builder.add_stack()
        rack = builder.build_rack()
        actual = sum(t.numel() * t.element_size() for t in [*rack.parameters(), *rack.buffers()])
        estimate = sum(n for _, n in footprint(config, 260)[0])
        assert 0.9 * actual <= estimate <= actual  # a lower bound, and not a loose one


def test_a_rack_that_cannot_fit_is_refused_with_its_estimate(monkeypatch):
    msg = error_of(lambda: checked(StackWiseConfig.from_dict({"model": {"d_model": 10**12},
                                                      "training": {"progressive": {"max_stacks": 3}}}).validate()))
    assert msg.startswith("model.d_model: a rack of 3 stacks needs at least ") and "more than this machine's" in msg
    msg = error_of(lambda: checked(StackWiseConfig.from_dict({"model": {"max_seq_len": 10**12}}).validate()))
    assert msg.startswith("model.max_seq_len: a rack of 12 stacks needs at least 116.4 TiB (weights and buffers 116.4 TiB")  # 4 bytes x 10**12 x head size 32
    monkeypatch.setattr(preflight, "_machine_memory", lambda: 2**20)
    msg = error_of(lambda: checked(StackWiseConfig.from_dict({}).validate()))
    assert msg.endswith("more than this machine's 1.0 MiB")
