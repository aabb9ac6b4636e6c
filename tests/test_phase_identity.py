"""The phase identity, built from each setting's declaration (config.setting): every field
declares what it can do to a phase; every HASHED, TRUNK or PLANNED change gives another
phase id; every IGNORED change trains the same weights bit for bit (or, for cache against
recompute, within a stated bound); a sweep trains each distinct phase once."""

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from stackwise_ray.config import HASHED, IDENTITIES, IGNORED, PLANNED, TRUNK, StackWiseConfig, apply_overrides
from stackwise_ray.phase_store import IDENTITY_VERSION, PhaseStore, declared_settings, phase_identity
from stackwise_ray.plan import plan_phases

from .conftest import ray_config, tiny_config

MAPPING = "tests.time_mappings:my_mapping"
LORA = {"training.progressive.qlora_enabled": True}
# per setting that can change a phase: (settings of the base config, another value)
CHANGES = {
    "model.vocab_size": ({}, 300), "model.d_model": ({}, 64), "model.n_heads": ({}, 4), "model.n_kv_heads": ({}, 1),
    "model.d_ff": ({}, 64), "model.blocks_per_stack": ({}, 2), "model.max_seq_len": ({}, 64),
    "model.attention": ({}, "bidirectional"), "model.tie_embeddings": ({}, False), "model.rope_theta": ({}, 500.0),
    "model.norm_eps": ({}, 1e-6), "model.init_std": ({}, 0.01),
    "data.source": ({}, "corpus.txt"), "data.format": ({}, "text"), "data.text_field": ({}, "body"),
    "data.target_field": ({}, "y"), "data.tokenizer": ({}, "tokenizer.json"), "data.seq_len": ({}, 16),
    "data.val_fraction": ({}, 0.2), "data.batch_size": ({}, 4), "data.max_examples": ({}, 100),
    "data.split_seed": ({}, 1),
    "training.seed": ({}, 1), "training.steps_per_stack": ({}, 10), "training.epochs_per_stack": ({}, 1),
    "training.lr": ({}, 1e-3), "training.min_lr": ({}, 1e-4), "training.warmup_steps": ({}, 3),
    "training.weight_decay": ({}, 0.1), "training.grad_clip": ({}, 0.5), "training.eval_batches": ({}, 3),
    "training.eval_every": ({}, 5), "training.lr_schedule": ({}, "wsd"), "training.decay_fraction": ({}, 0.5),
    "training.progressive.trunk_strategy": ({}, "full"), "training.progressive.new_stack_init": ({}, "copy"),
    "training.progressive.new_stack_precision": ({}, "bfloat16"),
    "training.progressive.qlora_enabled": ({}, True), "training.progressive.qlora_rank": (LORA, 8),
    "training.progressive.qlora_alpha": (LORA, 8.0), "training.progressive.qlora_dropout": (LORA, 0.1),
    "training.progressive.qlora_strategy": ({**LORA, "training.progressive.qlora_rank_pattern": "increasing"},
                                            "progressive"),
    "training.progressive.qlora_rank_pattern": ({**LORA, "training.progressive.qlora_strategy": "progressive"},
                                                "increasing"),
    "training.progressive.qlora_alpha_pattern": ({**LORA, "training.progressive.qlora_strategy": "progressive"},
                                                 "linear"),
    "training.progressive.qlora_configs": (
        {**LORA, "training.progressive.qlora_strategy": "variable",
         "training.progressive.qlora_configs": {k: {"rank": 4, "alpha": 8} for k in range(4)}},
        {0: {"rank": 4, "alpha": 8}, 1: {"rank": 2, "alpha": 8}, 2: {"rank": 4, "alpha": 8}, 3: {"rank": 4, "alpha": 8}}),
    "training.progressive.progressive_qlora": (LORA, True), "training.progressive.progressive_qlora_rank": ({}, 4),
    "training.progressive.progressive_qlora_alpha": ({}, 4.0),
    "training.progressive.max_stacks": ({"training.progressive.stack_time_mapping": "tests.time_mappings:by_depth_fraction"}, 6),
    "training.progressive.blocks_per_stack": ({}, 2),
    "training.progressive.stack_precisions": ({}, {1: "bfloat16"}),
    "training.progressive.building_mode": ({}, "prepend"),
    "training.progressive.time_interpretation": ({}, "input"), "training.progressive.time_embedding_dim": ({}, 32),
    "training.progressive.time_encoding_type": ({}, "learned"),
    "training.progressive.stack_time_mapping": ({}, "exponential"),
    "training.progressive.custom_time_mapping": ({"training.progressive.stack_time_mapping": "custom",
                                                  "training.progressive.custom_time_mapping": MAPPING},
                                                 "tests.time_mappings:by_depth_fraction"),
    "training.progressive.time_per_stack": ({}, 50), "training.progressive.num_time_steps": ({}, 500),
    "training.progressive.training_objective": ({}, "clm"), "training.progressive.min_mask_rate": ({}, 0.2),
    "training.progressive.max_mask_rate": ({}, 0.8), "training.progressive.mask_token_fraction": ({}, 0.7),
    "training.progressive.random_token_fraction": ({}, 0.05),
    "ray.num_workers": ({}, 2), "ray.use_gpu": ({}, True), "ray.cache_dtype": ({}, "bfloat16"),
}
# per setting declared IGNORED: another value, or (settings of the base config, another value);
# enabled has no other valid value
UNCHANGING = {
    "training.log_every": 3, "training.checkpoint_every": 4, "training.progressive.cache_activations": False,
    "training.progressive.target_stacks": 2, "ray.cpus_per_worker": 2, "ray.cache_backend": "arrow",
    "ray.storage_path": "/elsewhere", "ray.address": "auto", "ray.max_failures": 0, "ray.cache_max_bytes": 0,
    "ray.cache_shard_mb": 1, "ray.inject_worker_failure": "1:4",
    "tune.num_samples": ({"tune.search_space": {"training.seed": {"randint": [0, 9]}}}, 2), "tune.metric": "val_ppl", "tune.mode": "max", "tune.max_concurrent_trials": 1,
    "tune.scheduler": "asha", "tune.grace_period": 2, "tune.reduction_factor": 3.0, "tune.searcher": "optuna",
    "tune.baseline": "end_to_end", "tune.baseline_match": ({"tune.baseline": "end_to_end"}, "flops_and_steps"), "tune.lrs": [1e-3], "tune.seeds": [1],
    "tune.share_phases": False, "tune.search_space": {"training.lr": {"choice": [1e-3]}},
    "tracking.mlflow": "local", "tracking.tensorboard": True, "tracking.wandb": "offline", "tracking.experiment": "x",
}


def settings(identities=IDENTITIES) -> dict:
    return declared_settings(StackWiseConfig(), identities)


def ids(config: StackWiseConfig) -> list[str]:
    config = config.validate()
    plans = plan_phases(config)
    return [phase_identity(config, plans, k, "data") for k in range(len(plans))]


def with_values(values: dict) -> StackWiseConfig:
    config = tiny_config(target_stacks=3)
    for path, value in values.items():  # tune keys too (apply_overrides leaves the tune section out)
        *parents, last = path.split(".")
        obj = config
        for part in parents:
            obj = getattr(obj, part)
        setattr(obj, last, value)
    return config


def test_every_setting_declares_its_identity_and_meaning():
    def walk(section, prefix=""):
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if dataclasses.is_dataclass(value):
                yield from walk(value, f"{prefix}{f.name}.")
            else:
                yield prefix + f.name, f.metadata
    fields = dict(walk(StackWiseConfig()))
    undeclared = [path for path, meta in fields.items() if meta.get("identity") not in IDENTITIES or not meta.get("doc")]
    assert undeclared == []
    # and this file names another value for each one, so the tests below cover every setting
    assert set(CHANGES) == set(settings((HASHED, TRUNK, PLANNED)))
    assert set(UNCHANGING) | {"training.progressive.enabled"} == set(settings((IGNORED,)))


@pytest.mark.parametrize("path", sorted(CHANGES))
def test_a_setting_that_can_change_a_phase_changes_its_id(path):
    base, value = CHANGES[path]
    before, after = ids(with_values(base)), ids(with_values({**base, path: value}))
    declared = next(i for i in IDENTITIES if path in settings((i,)))
    assert before != after
    if declared == TRUNK:  # phase 0 has no trunk: it stays shared
        assert before[0] == after[0]
    if declared == HASHED:
        assert before[0] != after[0]


@pytest.mark.parametrize("path", sorted(UNCHANGING))
def test_a_setting_that_cannot_change_a_phase_leaves_its_id(path):
    base, value = UNCHANGING[path] if isinstance(UNCHANGING[path], tuple) else ({}, UNCHANGING[path])
    changed = ids(with_values({**base, path: value}))
    assert changed == ids(with_values(base))[:len(changed)]


def test_the_cache_dtype_enters_the_id_only_where_it_rounds():
    full, bf16 = tiny_config(target_stacks=2), tiny_config(target_stacks=2, new_stack_precision="bfloat16")
    for config, lossless in ((full, "float32"), (bf16, "bfloat16")):
        for dtype in (None, "float32", lossless):  # the default, and what loses nothing
            assert ids(apply_overrides(config, {"ray.cache_dtype": dtype})) == ids(config)
    assert ids(apply_overrides(full, {"ray.cache_dtype": "bfloat16"}))[1] != ids(full)[1]
    assert ids(apply_overrides(bf16, {"ray.cache_dtype": "float16"}))[1] != ids(bf16)[1]
    # no cache read (prepend): nothing is rounded, nothing changes
    prepend = apply_overrides(full, {"training.progressive.building_mode": "prepend"})
    assert ids(apply_overrides(prepend, {"ray.cache_dtype": "bfloat16"})) == ids(prepend)


def test_identical_stack_plans_share_a_phase_whatever_the_raw_keys():
    a = tiny_config(target_stacks=2, stack_precisions={0: "full"}, new_stack_precision="full")
    b = tiny_config(target_stacks=2, stack_precisions={0: "full"}, new_stack_precision="bfloat16")
    assert ids(a)[0] == ids(b)[0] and ids(a)[1] != ids(b)[1]


def test_a_store_of_another_identity_version_warns_once_and_reuses_nothing(tmp_path):
    store = PhaseStore(str(tmp_path))
    (tmp_path / "s00-0123456789abcdef").mkdir()
    (tmp_path / "s00-0123456789abcdef" / "done.json").write_text('{"checkpoint": "x", "metrics": {}}')
    with pytest.warns(UserWarning, match=f"version 1, this is version {IDENTITY_VERSION}: none is reused"):
        store.check_version()
    (tmp_path / "identity.json").write_text(f'{{"version": {IDENTITY_VERSION}}}')
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        store.check_version()


# ---------------------------------------------------------------- trained both ways

def stack_weights(checkpoint: str) -> dict:
    return load_file(f"{checkpoint}/model.safetensors")


def run(tmp_path, name, **ray_and_training):
    from stackwise_ray.trainer import ProgressiveTrainer

    config = ray_config(ray=ray_and_training.pop("ray", {}), training=ray_and_training.pop("training", {}),
                        **ray_and_training)
    return ProgressiveTrainer(config, storage_path=str(tmp_path), name=name).train_progressively()


@pytest.mark.slow
def test_ignored_settings_train_bit_identical_weights(arrow_run, tmp_path):
    """arrow_run (conftest): arrow cache backend, MLflow and TensorBoard on, 3 stacks. Here:
    the object store, every other IGNORED setting a run reads changed, 2 stacks; a worker
    dies in phase 1 and its group resumes from an in-phase checkpoint."""
    _, reference = arrow_run
    history = run(tmp_path, "ignored", target_stacks=2,
                  training={"log_every": 3, "checkpoint_every": 2},
                  ray={"cache_shard_mb": 1, "cpus_per_worker": 2, "max_failures": 1, "inject_worker_failure": "1:4",
                       "cache_max_bytes": 10**12, "address": "auto"})
    # the in-phase checkpoint Ray Train registered before the worker died (2 or 4)
    assert history[1]["resumed_from_step"] in (2, 4) and history[1]["trunk_forwards"] == 0
    for mine, theirs in zip(history, reference):
        a, b = stack_weights(mine["checkpoint"]), stack_weights(theirs["checkpoint"])
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert mine["val_loss"] == theirs["val_loss"]


@pytest.mark.slow
def test_a_recomputed_trunk_trains_what_its_cache_would_within_float_rounding(arrow_run, tmp_path):
    """Cache against recompute cannot be bitwise: the cache is built in batches of 64 in eval
    mode, the recomputed trunk runs on each training batch, and a matmul's rounding depends
    on its shape. cache_activations false and a cache refused for its size (cache_max_bytes
    0) recompute alike (bitwise), and stay within 1e-4 of the cached run's weights."""
    _, reference = arrow_run
    off = run(tmp_path, "off", target_stacks=2, cache_activations=False)
    refused = run(tmp_path, "refused", target_stacks=2, ray={"cache_max_bytes": 0})
    assert off[1]["cache"]["kind"] == refused[1]["cache"]["kind"] == "none" and off[1]["trunk_forwards"] > 0
    for a, b, cached in zip(off, refused, reference[:2]):
        wa, wb, wc = stack_weights(a["checkpoint"]), stack_weights(b["checkpoint"]), stack_weights(cached["checkpoint"])
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
        assert max((wa[k] - wc[k]).abs().max().item() for k in wa) < 1e-4
