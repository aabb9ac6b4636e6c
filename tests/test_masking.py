import importlib

import pytest
import torch

from stackwise_ray.config import StackWiseConfig
from stackwise_ray.masking import TimeStepMasking, mask_rate
from stackwise_ray.time_mapping import time_step_for_stack

PAD, MASK, BOS, EOS = 256, 257, 258, 259


class TinyTokenizer:
    # same attributes as data.ByteTokenizer, so these tests do not depend on data/tokenizer.py
    pad_id, mask_id, bos_id, eos_id, vocab_size = PAD, MASK, BOS, EOS, 260
    special_ids = (PAD, MASK, BOS, EOS)


def make(tok=TinyTokenizer(), **progressive):
    cfg = StackWiseConfig.from_dict({"training": {"seed": 3, "progressive": progressive}})
    return TimeStepMasking(cfg, tokenizer=tok)


def make_batch(B=8, T=64, n_pad=10, start_id=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (B, T), generator=g)
    ids[:, T - n_pad:] = PAD
    return {"input_ids": ids, "example_ids": torch.arange(start_id, start_id + B), "lengths": torch.full((B,), T - n_pad)}


def test_mlm_masks_inputs_and_targets():
    m = make()
    batch = make_batch()
    before = {k: v.clone() for k, v in batch.items()}
    out = m.generate_masks_for_stack(batch, 0)
    ids, x, masks = batch["input_ids"], out["input_ids"], out["masks"]
    assert out is not batch and all(torch.equal(batch[k], before[k]) for k in batch)
    assert set(out) >= {"input_ids", "targets", "masks", "clm_mask", "combined_masks", "time_step",
                        "training_objective", "example_ids", "lengths"}
    assert x.dtype == out["targets"].dtype == torch.long and masks.dtype == torch.bool
    assert out["time_step"].shape == (8,) and out["training_objective"] == "mlm"
    assert (x == MASK).any()
    assert masks[x == MASK].all()  # the mask token only where the objective predicts
    assert torch.equal(x[~masks], ids[~masks])
    assert torch.equal(out["targets"], ids)
    assert torch.equal(out["combined_masks"], masks)
    assert masks.any(1).all()
    assert not out["clm_mask"][:, -1].any() and out["clm_mask"][:, :-1].all()


def test_mlm_split_is_near_80_10_10_and_random_tokens_are_regular():
    m = make(min_mask_rate=0.5, max_mask_rate=0.5)
    batch = make_batch(B=256, T=128, n_pad=0)
    out = m.generate_masks_for_stack(batch, 0)
    ids, x, masks = batch["input_ids"], out["input_ids"], out["masks"]
    n = masks.sum().item()
    assert abs(n / masks.numel() - 0.5) < 0.02
    masked = (x == MASK) & masks
    changed = (x != ids) & ~masked & masks
    assert abs(masked.sum().item() / n - 0.8) < 0.02
    assert abs(changed.sum().item() / n - 0.1) < 0.02  # a random token equals the original 1/256 of the time
    assert not torch.isin(x[changed], torch.tensor([PAD, MASK, BOS, EOS])).any()


def test_one_position_always_corrupted():
    m = make(min_mask_rate=0.0, max_mask_rate=0.0)
    batch = make_batch(B=16, T=32, n_pad=30)
    batch["input_ids"][0] = PAD  # an all-pad row has nothing to predict
    masks = m.generate_masks_for_stack(batch, 0)["masks"]
    assert not masks[0].any()
    assert (masks[1:].sum(1) == 1).all()


@pytest.mark.parametrize("objective", ["mlm", "clm"])
def test_pads_never_corrupted_nor_in_loss(objective):
    m = make(min_mask_rate=0.9, max_mask_rate=0.9, training_objective=objective)
    batch = make_batch(B=32, n_pad=20)
    out = m.generate_masks_for_stack(batch, 0)
    pad = batch["input_ids"] == PAD
    assert (out["input_ids"][pad] == PAD).all()
    assert not (out["input_ids"][~pad] == PAD).any()
    assert not out["masks"][pad].any() and not out["combined_masks"][pad].any()


def test_same_example_same_corruption_across_calls_and_append_stacks():
    m = make(building_mode="append", time_interpretation="depth")
    a = m.generate_masks_for_stack(make_batch(B=8, start_id=100), 0)
    torch.manual_seed(1234)  # global RNG must not matter
    b = make(building_mode="append").generate_masks_for_stack(make_batch(B=8, start_id=100), 5)
    for k in ("input_ids", "masks", "combined_masks", "time_step"):
        assert torch.equal(a[k], b[k]), k
    # the corruption follows the example id, not its place in the batch
    batch = make_batch(B=8, start_id=100)
    perm = torch.randperm(8)
    c = m.generate_masks_for_stack({k: v[perm] for k, v in batch.items()}, 2)
    assert torch.equal(c["input_ids"], a["input_ids"][perm])
    # different ids -> different corruption
    other = make_batch(B=8, start_id=200)
    other["input_ids"] = batch["input_ids"]
    assert not torch.equal(m.generate_masks_for_stack(other, 0)["masks"], a["masks"])


def test_corruption_of_a_position_does_not_depend_on_padded_length():
    m = make(min_mask_rate=0.5, max_mask_rate=0.5)
    short = make_batch(B=4, T=32, n_pad=0)
    long_ids = torch.cat([short["input_ids"], torch.full((4, 32), PAD)], 1)
    a = m.generate_masks_for_stack(short, 0)
    b = m.generate_masks_for_stack({**short, "input_ids": long_ids}, 0)
    assert torch.equal(b["input_ids"][:, :32], a["input_ids"]) and torch.equal(b["masks"][:, :32], a["masks"])


def test_seed_changes_corruption():
    cfg = StackWiseConfig.from_dict({"training": {"seed": 4}})
    a = make().generate_masks_for_stack(make_batch(), 0)
    b = TimeStepMasking(cfg, tokenizer=TinyTokenizer()).generate_masks_for_stack(make_batch(), 0)
    assert not torch.equal(a["masks"], b["masks"])


def test_prepend_depth_rate_grows_with_stack():
    m = make(building_mode="prepend", time_interpretation="depth", time_per_stack=100)
    batch = make_batch(B=64, T=128, n_pad=0)
    fractions = []
    for k in (0, 3, 6, 9):
        out = m.generate_masks_for_stack(batch, k)
        assert (out["time_step"] == m.get_time_step_for_stack(k)).all()
        fractions.append(out["masks"].float().mean().item())
    assert fractions == sorted(fractions) and fractions[-1] - fractions[0] > 0.4
    # masks only grow: a noisier stack corrupts a superset of positions
    low, high = (m.generate_masks_for_stack(batch, k)["masks"] for k in (1, 8))
    assert (high | ~low).all()


def test_input_mode_time_steps():
    m = make(time_interpretation="input", num_time_steps=1000)
    ids = torch.arange(64)
    steps = m.sample_time_steps(ids)
    assert steps.dtype == torch.long and steps.shape == (64,)
    assert ((steps >= 0) & (steps < 1000)).all()
    assert len(steps.unique()) > 50
    assert torch.equal(steps, make(time_interpretation="input").sample_time_steps(ids))
    batch = make_batch(B=64, T=128, n_pad=0)
    out = m.generate_masks_for_stack(batch, 4)
    assert torch.equal(out["time_step"], steps)
    assert torch.equal(out["masks"], m.generate_masks_for_stack(batch, 0)["masks"])
    frac = out["masks"].float().mean(1)
    order = steps.argsort()
    assert frac[order[-16:]].mean() > frac[order[:16]].mean() + 0.3  # later steps are noisier


def test_clm_targets_and_masks():
    m = make(training_objective="clm")
    batch = make_batch(B=4, T=16, n_pad=3)
    out = m.generate_masks_for_stack(batch, 1)
    ids = batch["input_ids"]
    assert torch.equal(out["input_ids"], ids)
    assert torch.equal(out["targets"][:, :-1], ids[:, 1:])
    assert torch.equal(out["targets"][:, -1], ids[:, -1])
    assert not out["combined_masks"][:, -1].any()
    assert out["masks"][:, :12].all() and not out["masks"][:, 12:].any()  # last real token's target is a pad
    assert torch.equal(out["combined_masks"], out["masks"] & out["clm_mask"])
    assert out["time_step"].shape == (4,)


def test_clm_last_position_out_of_loss_without_padding():
    out = make(training_objective="clm").generate_masks_for_stack(make_batch(B=2, T=8, n_pad=0), 0)
    assert out["masks"].all() and out["combined_masks"][:, :-1].all() and not out["combined_masks"][:, -1].any()


def test_custom_objective():
    m = make(training_objective="custom")
    batch = make_batch(B=4, T=16, n_pad=0)
    with pytest.raises(ValueError, match="needs 'targets' in every batch"):
        m.generate_masks_for_stack(batch, 0)
    targets = torch.full((4, 16), -100)
    targets[:, 3] = 7
    out = m.generate_masks_for_stack({**batch, "targets": targets}, 0)
    assert torch.equal(out["input_ids"], batch["input_ids"])
    assert torch.equal(out["masks"], targets != -100) and torch.equal(out["combined_masks"], out["masks"])


def test_linear_and_exponential_mappings():
    lin = [time_step_for_stack(k, "linear", 100, 12, 1000) for k in range(5)]
    exp = [time_step_for_stack(k, "exponential", 100, 12, 1000) for k in range(5)]
    assert lin == [0, 100, 200, 300, 400]
    assert exp == [0, 100, 300, 700, 999]
    assert len(set(exp)) == 5
    assert time_step_for_stack(20, "linear", 100, 12, 1000) == 999
    assert time_step_for_stack(40, "exponential", 100, 12, 1000) == 999
    assert make(stack_time_mapping="exponential").get_time_step_for_stack(3) == 700
    assert mask_rate(0, 1000, 0.15, 0.9) == pytest.approx(0.15)
    assert mask_rate(999, 1000, 0.15, 0.9) == pytest.approx(0.9)
    assert mask_rate(333, 1000, 0.0, 1.0) == pytest.approx(1 / 3)


def test_custom_mapping_is_called():
    tm = importlib.import_module("tests.time_mappings")
    tm.CALLS.clear()
    m = make(stack_time_mapping="custom", custom_time_mapping="tests.time_mappings:my_mapping",
             max_stacks=6, num_time_steps=500)
    assert m.get_time_step_for_stack(2) == 17
    assert tm.CALLS == [(2, 6, 500)]
    batch = make_batch(B=2)
    m.generate_masks_for_stack(batch, 4)
    assert tm.CALLS[-1] == (0, 6, 500)  # append + depth: the input side is stack 0


def test_custom_mapping_shorthand_through_validate():
    tm = importlib.import_module("tests.time_mappings")
    cfg = StackWiseConfig.from_dict({"training": {"progressive": {
        "stack_time_mapping": "tests.time_mappings:my_mapping", "building_mode": "prepend", "max_stacks": 4}}})
    cfg.validate()
    tm.CALLS.clear()
    m = TimeStepMasking(cfg, tokenizer=TinyTokenizer())
    assert (m.generate_masks_for_stack(make_batch(B=2), 3)["time_step"] == 24).all()
    assert tm.CALLS == [(3, 4, 1000)]


def test_custom_mapping_out_of_range():
    with pytest.raises(ValueError, match="expected an int"):
        time_step_for_stack(0, "custom", 100, 12, 1000, importlib.import_module("tests.time_mappings").bad_mapping)


def test_stored_time_steps_replace_the_mapping():
    tm = importlib.import_module("tests.time_mappings")
    cfg = StackWiseConfig.from_dict({"training": {"progressive": {
        "stack_time_mapping": "custom", "custom_time_mapping": "tests.time_mappings:my_mapping",
        "building_mode": "prepend", "max_stacks": 4}}}).validate()
    tm.CALLS.clear()
    m = TimeStepMasking(cfg, tokenizer=TinyTokenizer(), time_steps={0: 5, 1: 40, 2: 9})
    assert m.custom_fn is None and m.get_time_step_for_stack(1) == 40
    assert (m.generate_masks_for_stack(make_batch(B=2), 2)["time_step"] == 9).all()  # prepend: the new stack's
    assert tm.CALLS == []
    with pytest.raises(ValueError, match="no stored time step for stack 3"):
        m.get_time_step_for_stack(3)


def test_depth_time_step_is_the_mapping_of_the_config():
    from stackwise_ray.time_mapping import depth_time_step

    tm = importlib.import_module("tests.time_mappings")
    shorthand = StackWiseConfig.from_dict({"training": {"progressive": {
        "stack_time_mapping": "tests.time_mappings:my_mapping", "max_stacks": 4}}})
    assert depth_time_step(shorthand, 3) == 24 and tm.CALLS[-1] == (3, 4, 1000)  # unvalidated: the shorthand too
    exponential = StackWiseConfig.from_dict({"training": {"progressive": {"stack_time_mapping": "exponential"}}})
    assert [depth_time_step(exponential, k) for k in range(4)] == [0, 100, 300, 700]
