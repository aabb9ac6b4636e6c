import torch

from stackwise_ray.builder import ProgressiveRackBuilder
from stackwise_ray.data import ProgressiveDataLoader, build_datasets, make_dataloader
from stackwise_ray.masking import TimeStepMasking
from stackwise_ray.phase import evaluate, get_lr, train_stack

from .conftest import tiny_config


def setup(config):
    torch.manual_seed(config.training.seed)
    train, val, tok = build_datasets(config)
    builder = ProgressiveRackBuilder(config)
    masking = TimeStepMasking(config, tok)
    bs = config.data.batch_size
    return builder, masking, make_dataloader(train, bs, True, 0), make_dataloader(val, bs, False, 0)


def run(config, stacks=2):
    builder, masking, train_loader, val_loader = setup(config)
    results = []
    for k in range(stacks):
        builder.add_stack()
        builder.prepare_phase()
        results.append(train_stack(builder.build_rack(), ProgressiveDataLoader(train_loader, masking, k), config.training,
                                   config.training.steps_per_stack, ProgressiveDataLoader(val_loader, masking, k)))
    return builder, results


def test_two_stack_model_learns_on_the_default_corpus():
    config = tiny_config(training_objective="clm", model={"d_model": 64, "n_heads": 4, "max_seq_len": 64},
                         data={"seq_len": 64, "batch_size": 16}, training={"steps_per_stack": 150, "eval_batches": 10})
    builder, masking, _, val_loader = setup(config)
    builder.add_stack()
    untrained = evaluate(builder.build_rack(), ProgressiveDataLoader(val_loader, masking, 0), 10)["val_loss"]
    _, results = run(config)
    assert untrained > 5.0
    assert results[0]["val_loss"] < untrained - 2.0
    assert results[1]["val_loss"] < results[0]["val_loss"] - 0.1  # the second stack adds something
    assert results[1]["trainable_params"] < results[1]["total_params"]


def test_seeded_runs_repeat_exactly():
    config = tiny_config(training={"steps_per_stack": 5})
    a, ra = run(config)
    b, rb = run(config)
    assert [r["val_loss"] for r in ra] == [r["val_loss"] for r in rb]
    for (n, p), (_, q) in zip(a.build_rack().state_dict().items(), b.build_rack().state_dict().items()):
        assert torch.equal(p, q), n


class DictCache:
    """Trunk outputs by example id, filled by one pass of the trunk."""

    def __init__(self, rack, loader, masking, trunk_end):
        self.rows = {}
        with torch.no_grad():
            for batch in ProgressiveDataLoader(loader, masking, 0):
                h = rack.run_stacks(rack.embed_tokens(batch["input_ids"]), batch["input_ids"], batch["time_step"], end=trunk_end)
                self.rows.update(zip(batch["example_ids"].tolist(), h))

    def lookup(self, example_ids, input_ids=None):
        return torch.stack([self.rows[i] for i in example_ids.tolist()])


def test_cached_phase_runs_no_trunk_forward_and_trains_the_same_stack():
    config = tiny_config(data={"max_examples": 64}, training={"steps_per_stack": 6})
    trained = {}
    for cached in (False, True):
        builder, masking, train_loader, _ = setup(config)
        builder.add_stack()
        builder.prepare_phase()
        train_stack(builder.build_rack(), ProgressiveDataLoader(train_loader, masking, 0), config.training, 6)
        builder.add_stack()
        builder.prepare_phase()
        rack = builder.build_rack()
        # a separate pass: iterating train_loader here would move its shuffle generator
        cache = DictCache(rack, make_dataloader(train_loader.dataset, 16, False, 0), masking, trunk_end=1) if cached else None
        calls = []
        hook = builder.stack(0).register_forward_hook(lambda *a: calls.append(1))
        batches = ProgressiveDataLoader(train_loader, masking, 1, trunk_activations=cache, cache_activations=cached)
        train_stack(rack, batches, config.training, 6, start=1)
        hook.remove()
        assert (len(calls) == 0) if cached else (len(calls) == 6)
        trained[cached] = {n: p.detach().clone() for n, p in builder.stack(1).named_parameters()}
    for name, p in trained[False].items():
        torch.testing.assert_close(trained[True][name], p, rtol=1e-4, atol=1e-5)


def test_lr_schedule_warms_up_then_decays_to_min():
    assert get_lr(0, 100, 1.0, 0.1, 10) == 0.1
    assert get_lr(9, 100, 1.0, 0.1, 10) == 1.0
    assert abs(get_lr(99, 100, 1.0, 0.1, 10) - 0.1) < 1e-3
    assert get_lr(50, 100, 1.0, 0.1, 10) < get_lr(20, 100, 1.0, 0.1, 10)


def test_eval_every_draws_a_whole_split_curve_and_leaves_training_bit_identical():
    # LoRA dropout draws from the global RNG in training mode: an evaluation that moved the
    # RNG, left the rack in eval mode or consumed training batches would change the weights
    config = tiny_config(data={"max_examples": 200}, training={"steps_per_stack": 10},
                         qlora_enabled=True, qlora_rank=4, qlora_dropout=0.1)
    trained = {}
    for every in (0, 3):
        config.training.eval_every = every
        builder, masking, train_loader, val_loader = setup(config)
        builder.add_stack()
        builder.prepare_phase()
        val = ProgressiveDataLoader(val_loader, masking, 0)
        metrics = train_stack(builder.build_rack(), ProgressiveDataLoader(train_loader, masking, 0), config.training,
                              10, val)
        trained[every] = (builder.build_rack().state_dict(), metrics)
    (plain, m0), (curved, m3) = trained[0], trained[3]
    for name, p in plain.items():
        assert torch.equal(p, curved[name]), name
    assert "val_curve" not in m0
    assert [p["step"] for p in m3["val_curve"]] == [3, 6, 9, 10]  # the last point is the final result
    whole = evaluate(builder.build_rack(), val)
    assert m3["val_curve"][-1]["val_loss"] == m3["val_loss"] == whole["val_loss"]
    assert whole["val_tokens"] > evaluate(builder.build_rack(), val, config.training.eval_batches)["val_tokens"]
    assert m3["val_curve"][0]["val_loss"] > m3["val_curve"][-1]["val_loss"]
