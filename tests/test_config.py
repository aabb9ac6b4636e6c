import pathlib

import pytest

from stackwise_ray.config import ConfigError, StackWiseConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]


def progressive(**kw):
    return StackWiseConfig.from_dict({"training": {"progressive": kw}})


def error_of(fn):
    with pytest.raises(ConfigError) as e:
        fn()
    return str(e.value)


@pytest.mark.parametrize("path", sorted((ROOT / "tests" / "seed_snippets").glob("*.yaml")), ids=lambda p: p.name)
def test_source_document_yaml_snippets_load_and_validate(path):
    config = StackWiseConfig.from_yaml(path).validate()
    assert config.training.progressive.qlora_rank == 16
    assert config.training.progressive.qlora_enabled is True


def test_dual_lora_snippet_values():
    p = StackWiseConfig.from_yaml(ROOT / "tests/seed_snippets/dual_lora.yaml").validate().training.progressive
    assert (p.qlora_rank, p.qlora_alpha, p.progressive_qlora, p.progressive_qlora_rank, p.progressive_qlora_alpha) == (16, 32, True, 8, 16)


def test_source_document_attribute_snippets_validate():
    config = StackWiseConfig.from_yaml(ROOT / "tests/seed_snippets/progressive_training.yaml")
    config.training.progressive.time_interpretation = "input"
    config.training.progressive.time_embedding_dim = 512
    config.training.progressive.time_encoding_type = "learned"
    config.validate()
    config.training.progressive.time_interpretation = "depth"
    config.training.progressive.stack_time_mapping = "exponential"
    config.training.progressive.time_per_stack = 100
    config.training.progressive.trunk_strategy = "qlora"
    config.training.progressive.new_stack_precision = "full"
    config.training.progressive.cache_activations = True
    config.training.progressive.qlora_strategy = "progressive"
    config.training.progressive.qlora_rank_pattern = "increasing"
    config.training.progressive.qlora_alpha_pattern = "constant"
    config.validate()
    config.training.progressive.qlora_strategy = "variable"
    config.training.progressive.target_stacks = 4
    config.training.progressive.qlora_configs = {
        0: {"rank": 8, "alpha": 16}, 1: {"rank": 16, "alpha": 32},
        2: {"rank": 32, "alpha": 64}, 3: {"rank": 64, "alpha": 128}}
    config.validate()
    for objective in ("mlm", "clm"):
        config.training.progressive.training_objective = objective
        config.validate()
    assert config.causal  # clm with attention: auto


@pytest.mark.parametrize("path", sorted((ROOT / "experiments").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_experiments_validate(path):
    config = StackWiseConfig.from_yaml(path).validate()
    assert path.read_text().startswith("# python -m stackwise_ray.")  # the first line is the command that runs it
    assert config.target_stacks >= 1


def test_error_names_full_key_path():
    assert error_of(lambda: progressive(qlora_rank=0).validate()) == "training.progressive.qlora_rank: must be > 0, got 0"


def test_unknown_key_suggests_spelling():
    msg = error_of(lambda: progressive(qlora_rnak=8))
    assert msg.startswith("training.progressive.qlora_rnak: unknown key") and "did you mean 'qlora_rank'" in msg


def test_unknown_choice_suggests_spelling():
    msg = error_of(lambda: progressive(building_mode="apend"))
    assert msg.startswith("training.progressive.building_mode:") and "'append'" in msg


def test_wrong_type_is_named():
    assert error_of(lambda: StackWiseConfig.from_dict({"model": {"d_model": "big"}})).startswith("model.d_model: must be an integer")
    assert error_of(lambda: progressive(cache_activations="yes")).startswith("training.progressive.cache_activations:")


def test_attribute_assignment_is_type_checked_by_validate():
    config = StackWiseConfig()
    config.training.progressive.max_stacks = "12"
    assert error_of(config.validate).startswith("training.progressive.max_stacks: must be an integer")


def test_contradictions_are_errors():
    assert error_of(lambda: StackWiseConfig.from_dict({"model": {"d_model": 100, "n_heads": 3}}).validate()).startswith("model.d_model:")
    assert error_of(lambda: progressive(max_stacks=2, target_stacks=3).validate()).startswith("training.progressive.target_stacks:")
    assert error_of(lambda: progressive(trunk_strategy="qlora").validate()).startswith("training.progressive.trunk_strategy:")
    assert error_of(lambda: progressive(new_stack_precision="qlora").validate()).startswith("training.progressive.new_stack_precision:")
    msg = error_of(lambda: progressive(qlora_enabled=True, qlora_strategy="variable", target_stacks=3,
                                       qlora_configs={0: {"rank": 4, "alpha": 8}, 2: {"rank": 4, "alpha": 8}}).validate())
    assert msg.startswith("training.progressive.qlora_configs:") and "[1]" in msg
    assert error_of(lambda: StackWiseConfig.from_dict({"model": {"attention": "causal"}}).validate()).startswith("model.attention:")
    assert error_of(lambda: progressive(training_objective="custom").validate()).startswith("training.progressive.training_objective:")


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  progressive: [unclosed\n")
    assert error_of(lambda: StackWiseConfig.from_yaml(bad)).startswith(f"{bad}: line")
    assert error_of(lambda: StackWiseConfig.from_yaml(tmp_path / "missing.yaml")).startswith(f"{tmp_path / 'missing.yaml'}: cannot read")


# ---------------------------------------------------------------- hostile and careless input

def nested_aliases(levels: int, leaf: str = "lol") -> str:
    """A flow list whose anchors nest `levels` deep, each repeating the last nine times:
    9**levels values once expanded."""
    names = [f"l{i}" for i in range(levels)]
    items = [f"&{names[0]} [{', '.join([leaf] * 9)}]"]
    items += [f"&{b} [{', '.join([f'*{a}'] * 9)}]" for a, b in zip(names, names[1:])]
    return f"[{', '.join(items)}]"


def load_error(tmp_path, text) -> str:
    path = tmp_path / "x.yaml"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    msg = error_of(lambda: StackWiseConfig.from_yaml(path))
    assert msg.startswith(f"{path}: ") and "\n" not in msg
    return msg[len(f"{path}: "):]


def test_alias_bomb_is_refused_while_loading(tmp_path):
    import time

    start = time.perf_counter()
    # the second key of the search space: validating it used to deep-copy the expansion
    msg = load_error(tmp_path, "tune:\n  search_space:\n    training.lr: {grid: [0.001]}\n"
                               f"    training.seed: {{grid: {nested_aliases(9, '0')}}}\n")
    assert msg == "line 4: aliases expand the document past 100,000 values"
    assert load_error(tmp_path, "model: &m {d_model: [*m]}\n") == "line 1: alias refers to a value that contains it"
    assert time.perf_counter() - start < 5


def test_an_error_message_shows_a_bounded_value(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text(f"model:\n  d_model: {nested_aliases(5)}\n")  # 59,049 values: under the limit
    msg = error_of(lambda: StackWiseConfig.from_yaml(path))
    assert msg.startswith("model.d_model: must be an integer, got list [[") and len(msg) < 200
    msg = error_of(lambda: StackWiseConfig.from_dict({"model": {"attention": "x" * 10**6}}))
    assert msg.startswith("model.attention: must be one of auto, bidirectional, causal") and len(msg) < 300
    msg = error_of(lambda: StackWiseConfig.from_dict({"model": {"x" * 10**6: 1}}))
    assert msg.startswith("model.xxx") and "unknown key" in msg and len(msg) < 400


def test_nesting_deeper_than_a_config_is_refused_without_recursion(tmp_path):
    assert load_error(tmp_path, "model: " + "[" * 20_000 + "]" * 20_000 + "\n") == "line 1: nested deeper than 64 levels"
    block = "".join("  " * i + "a:\n" for i in range(500))
    assert load_error(tmp_path, block) == "line 64: nested deeper than 64 levels"


def test_duplicate_keys_are_named_with_their_lines(tmp_path):
    msg = load_error(tmp_path, "model:\n  d_model: 64\ntraining:\n  lr: 0.1\n  seed: 1\n  lr: 0.2\n")
    assert msg == "line 6: duplicate key 'lr' (first on line 4)"
    assert load_error(tmp_path, "model: {}\nmodel: {}\n") == "line 2: duplicate key 'model' (first on line 1)"


def test_merge_keys_still_work(tmp_path):
    from stackwise_ray.config import _Loader

    raw = _Loader("base: &b {d_model: 64, n_heads: 4}\nmodel: {<<: *b, d_model: 32}\n").get_single_data()
    assert raw["model"] == {"d_model": 32, "n_heads": 4}


@pytest.mark.parametrize("text, shown", [("false\n", "bool False"), ("0\n", "int 0"), ("[]\n", "list []"),
                                         ("''\n", "str ''"), ("", "an empty document"), ("# only a comment\n", "an empty document")])
def test_a_document_that_is_not_a_mapping_is_refused(tmp_path, text, shown):
    assert load_error(tmp_path, text) == (f"<top level>: must be a mapping of sections, got {shown} "
                                          "(a run with every default is written {})")


def test_an_all_defaults_run_is_written_as_an_empty_mapping(tmp_path):
    path = tmp_path / "defaults.yaml"
    path.write_text("{}\n")
    assert StackWiseConfig.from_yaml(path).validate() == StackWiseConfig().validate()


def test_a_nul_byte_or_bytes_that_are_not_utf8_name_their_line(tmp_path):
    assert load_error(tmp_path, b"model:\n  d_model: 6\x004\n").startswith("line 2: unacceptable character #x0000")
    assert load_error(tmp_path, b"model:\n  x: 1\n  d_model: \xff\n").startswith("line 3: unacceptable character #x00ff")


def test_every_float_key_refuses_nan_and_infinities():
    import dataclasses

    def float_keys(cls, prefix):
        for f in dataclasses.fields(cls):
            tp = cls.__dataclass_fields__[f.name].type
            if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
                yield from float_keys(f.default_factory, f"{prefix}{f.name}.")
            elif tp in ("float", float):
                yield f"{prefix}{f.name}"

    keys = list(float_keys(StackWiseConfig, ""))
    assert {"training.lr", "training.min_lr", "training.progressive.qlora_alpha", "ray.cpus_per_worker",
            "tune.reduction_factor", "model.rope_theta", "data.val_fraction"} <= set(keys)
    for key in keys:
        for bad in (float("nan"), float("inf"), -float("inf"), 10**400):
            raw: dict = {}
            *parents, last = key.split(".")
            node = raw
            for part in parents:
                node = node.setdefault(part, {})
            node[last] = bad
            assert error_of(lambda: StackWiseConfig.from_dict(raw)).startswith(f"{key}: must be a finite number, got ")


@pytest.mark.parametrize("raw, expected", [
    ({"training": {"grad_clip": -1}}, "training.grad_clip: must be >= 0, got -1.0"),
    ({"training": {"weight_decay": -0.5}}, "training.weight_decay: must be >= 0, got -0.5"),
    ({"model": {"norm_eps": 0}}, "model.norm_eps: must be > 0, got 0.0"),
    ({"model": {"init_std": -1}}, "model.init_std: must be > 0, got -1.0"),
    ({"model": {"rope_theta": 0}}, "model.rope_theta: must be > 0, got 0.0"),
    ({"model": {"vocab_size": 259}}, "model.vocab_size: must be >= the byte tokenizer's 260 ids, got 259"),
    ({"training": {"seed": 2**31}}, "training.seed: must be in [0, 2,147,483,647], got 2147483648"),
    ({"data": {"split_seed": -1}}, "data.split_seed: must be in [0, 2,147,483,647], got -1"),
    ({"training": {"progressive": {"max_stacks": 10**9, "target_stacks": 10**9}}}, "training.progressive.max_stacks: must be in [1, 1,024]"),
    ({"training": {"progressive": {"qlora_configs": {12: {"rank": 4, "alpha": 8}}}}}, "training.progressive.qlora_configs.12: no such stack"),
])
def test_every_number_has_a_range(raw, expected):
    assert error_of(lambda: StackWiseConfig.from_dict(raw).validate()).startswith(expected)


def test_largest_seeds_stay_inside_what_torch_accepts():
    import torch

    from stackwise_ray.config import MAX_SEED

    for seed in (MAX_SEED * 100_003 + 10**6, MAX_SEED * 1009 + 1023):  # per-epoch (a million epochs), per-stack
        assert torch.manual_seed(seed).initial_seed() == seed  # raises past what torch accepts
    config = StackWiseConfig.from_dict({"training": {"seed": MAX_SEED}, "data": {"split_seed": MAX_SEED}}).validate()
    assert (config.training.seed, config.data.split_seed) == (MAX_SEED, MAX_SEED)


def test_sampled_ranges_follow_the_rules_of_their_key():
    def space(spec):
        return StackWiseConfig.from_dict({"tune": {"search_space": spec}})

    assert error_of(lambda: space({"training.lr": {"uniform": [-1, -0.5]}}).validate()).startswith(
        "tune.search_space.training.lr.uniform: bound -1: training.lr: must be > 0")
    assert error_of(lambda: space({"data.val_fraction": {"uniform": [0.5, 2]}}).validate()).startswith(
        "tune.search_space.data.val_fraction.uniform: bound 2: data.val_fraction: must be between 0 and 1")
    assert error_of(lambda: space({"training.seed": {"randint": [0, 2**40]}}).validate()).startswith(
        "tune.search_space.training.seed.randint: bound 1099511627776: training.seed: must be in")
    assert error_of(lambda: space({"model.d_model": {"uniform": [32, 64]}}).validate()).endswith("use randint")
    space({"training.lr": {"loguniform": [1e-3, 1e-2]}, "training.seed": {"randint": [0, 9]}}).validate()


def test_a_grid_too_large_to_run_is_refused_before_its_values_are_checked():
    spec = {"training.seed": {"grid": list(range(40))}, "data.split_seed": {"grid": list(range(40))}}
    assert error_of(lambda: StackWiseConfig.from_dict({"tune": {"search_space": spec}}).validate()) == (
        "tune.search_space: the grid has 1,600 points; at most 1,000 trials")


def test_validate_imports_no_mapping_and_preflight_imports_it_and_catches_its_exit():
    import sys

    from stackwise_ray import preflight

    spec = "tests.bad_configs.mapping_exits_at_import:schedule"
    config = progressive(stack_time_mapping=spec).validate()  # the schema: the name's shape only
    progressive(stack_time_mapping="os:chown").validate()
    assert "tests.bad_configs.mapping_exits_at_import" not in sys.modules
    assert error_of(lambda: preflight.check(config)) == (
        "training.progressive.custom_time_mapping: cannot import module 'tests.bad_configs.mapping_exits_at_import': SystemExit: 0")
    assert error_of(lambda: progressive(stack_time_mapping="custom", custom_time_mapping="nocolon").validate(
        )).startswith("training.progressive.custom_time_mapping: must look like 'module:function'")


def test_growth_operator_combinations():
    progressive(trunk_strategy="full", qlora_enabled=True, new_stack_init="copy").validate()
    progressive(new_stack_init="copy", target_stacks=3, stack_precisions={0: "full", 1: "bfloat16", 2: "half"}).validate()
    progressive(new_stack_init="copy", qlora_enabled=True, target_stacks=2, new_stack_precision="qlora").validate()
    msg = error_of(lambda: progressive(trunk_strategy="full", progressive_qlora=True).validate())
    assert msg.startswith("training.progressive.progressive_qlora: trunk_strategy full trains the trunk's own weights")
    msg = error_of(lambda: progressive(new_stack_init="copy", qlora_enabled=True, target_stacks=3,
                                       stack_precisions={2: "nvfp4"}).validate())
    assert msg.startswith("training.progressive.new_stack_init: copy gives stack 2 (nvfp4) the weights of stack 1 (full)")
    msg = error_of(lambda: progressive(new_stack_init="copy", qlora_enabled=True, target_stacks=2,
                                       qlora_strategy="progressive", qlora_rank_pattern="increasing").validate())
    assert msg.startswith("training.progressive.new_stack_init: copy gives stack 1 the LoRA adapter of stack 0")
    assert error_of(lambda: progressive(new_stack_init="clone")).startswith("training.progressive.new_stack_init:")


def test_validate_returns_a_normalised_copy_and_leaves_its_input_as_it_was():
    raw = {"training": {"progressive": {"stack_time_mapping": "tests.time_mappings:my_mapping", "max_stacks": 4,
                                        "qlora_enabled": True, "stack_precisions": {"1": "qlora"}}}}
    config = StackWiseConfig.from_dict(raw)
    before = config.to_dict()
    valid = config.validate()
    assert config.to_dict() == before and valid is not config
    p = valid.training.progressive
    assert (p.stack_time_mapping, p.custom_time_mapping) == ("custom", "tests.time_mappings:my_mapping")
    assert p.stack_precisions == {1: "qlora"}


def test_a_validated_config_is_not_checked_again_until_it_changes(monkeypatch):
    valid = StackWiseConfig.from_dict({"model": {"d_model": 64}}).validate()
    checks = []
    monkeypatch.setattr(StackWiseConfig, "_check", lambda self: checks.append(1))
    assert valid.validate() is valid and valid.validate() is valid
    assert checks == []
    valid.model.d_model = 96  # an edit after validation is validated again
    assert valid.validate() is not valid and checks == [1]


def test_progressive_training_cannot_be_disabled():
    assert progressive(enabled=True).validate().training.progressive.enabled
    assert error_of(lambda: progressive(enabled=False).validate()).startswith("training.progressive.enabled: must be true")


# ---------------------------------------------------------------- sweeps that would report more than they measured

def sweep_error(**tune) -> str:
    return error_of(lambda: StackWiseConfig.from_dict({"tune": tune}).validate())


@pytest.mark.parametrize("key, values, distinct", [
    ("training.progressive.trunk_strategy", ["frozen", "full", "frozen"], ["frozen", "full"]),
    ("training.lr", [0.001, 1e-3], [0.001, 0.01]),
    ("training.lr", [1, 1.0], [1, 0.5]),  # an int for a float key is that float
])
def test_a_grid_value_listed_twice_is_refused_naming_the_key(key, values, distinct):
    for kind in ("grid", "choice"):
        msg = sweep_error(search_space={key: {kind: values}}, num_samples=1)
        assert msg.startswith(f"tune.search_space.{key}.{kind}: lists the value ") and "twice" in msg
    StackWiseConfig.from_dict({"tune": {"search_space": {key: {"grid": distinct}}}}).validate()


def test_repeats_of_a_sweep_that_draws_nothing_are_refused():
    grid = {"training.lr": {"grid": [1e-3, 2e-3]}}
    assert sweep_error(num_samples=3, search_space=grid).startswith(
        "tune.num_samples: 3 repeats of a sweep that draws nothing")
    assert sweep_error(num_samples=2).startswith("tune.num_samples: 2 repeats")
    # a drawn key makes each repeat a new measurement
    StackWiseConfig.from_dict({"tune": {"num_samples": 3, "search_space": {
        **grid, "training.seed": {"randint": [0, 100]}}}}).validate()


def test_tune_lrs_with_a_swept_min_lr_is_refused():
    msg = sweep_error(lrs=[1e-3, 3e-3], search_space={"training.min_lr": {"grid": [1e-5, 2e-4]}})
    assert msg.startswith("tune.lrs: sets each trial's training.min_lr") and "sweep one of them" in msg


@pytest.mark.parametrize("tune, expected", [
    ({"num_samples": 5_000_000, "search_space": {"training.lr": {"loguniform": [1e-4, 1e-2]}}},
     "tune.num_samples: 5,000,000 x 1 grid points = 5,000,000 trials; at most 10,000"),
    ({"num_samples": 20, "search_space": {"training.seed": {"grid": list(range(600))},
                                          "training.lr": {"loguniform": [1e-4, 1e-2]}}},
     "tune.num_samples: 20 x 600 grid points = 12,000 trials; at most 10,000"),
    ({"search_space": {"ray.storage_path": {"grid": ["/tmp/a", "/tmp/b"]}}},
     "tune.search_space.ray.storage_path: cannot differ between the trials of one sweep"),
    ({"search_space": {"ray.address": {"choice": ["127.0.0.1:1", "127.0.0.1:2"]}}},
     "tune.search_space.ray.address: cannot differ between the trials of one sweep"),
])
def test_sweeps_no_machine_can_run_are_refused_at_validation(tune, expected):
    assert sweep_error(**tune).startswith(expected)


@pytest.mark.timeout(30)
def test_a_fifo_as_config_or_a_directory_or_fifo_as_data_is_not_a_regular_file(tmp_path):
    import os

    from stackwise_ray import preflight

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)  # nothing writes to it: reading it would block forever
    assert error_of(lambda: StackWiseConfig.from_yaml(fifo)) == f"{fifo}: cannot read: not a regular file (a FIFO)"
    assert error_of(lambda: StackWiseConfig.from_yaml(tmp_path)) == (
        f"{tmp_path}: cannot read: not a regular file (a directory)")
    for path, what in ((tmp_path, "a directory"), (fifo, "a FIFO")):
        for key, extra in (("source", {}), ("tokenizer", {})):
            config = StackWiseConfig.from_dict({"data": {key: str(path), **extra}}).validate()  # the schema: no file read
            if key == "source" and path == tmp_path:  # a directory of shards: what it holds is the build's to check
                preflight.check_files(config)
                continue
            msg = error_of(lambda: preflight.check_files(config))  # what this machine holds
            assert msg.startswith(f"data.{key}: not a regular file ({what}): {path}"), msg
