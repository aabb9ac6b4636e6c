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


def test_custom_time_mapping_errors():
    msg = error_of(lambda: progressive(stack_time_mapping="no_such_module_xyz:f").validate())
    assert msg.startswith("training.progressive.custom_time_mapping: cannot import module 'no_such_module_xyz'")
    msg = error_of(lambda: progressive(stack_time_mapping="tests.time_mappings:wrong_signature").validate())
    assert "must accept (stack_idx, max_stacks, num_time_steps)" in msg


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  progressive: [unclosed\n")
    assert error_of(lambda: StackWiseConfig.from_yaml(bad)).startswith(f"{bad}: line")
    assert error_of(lambda: StackWiseConfig.from_yaml(tmp_path / "missing.yaml")).startswith(f"{tmp_path / 'missing.yaml'}: cannot read")


def test_missing_data_file_is_named():
    msg = error_of(lambda: StackWiseConfig.from_dict({"data": {"source": "/nonexistent/corpus.txt"}}).validate())
    assert msg == "data.source: no such file: /nonexistent/corpus.txt (use 'pydoc' for the bundled corpus)"
