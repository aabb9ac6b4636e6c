"""val_bpb: the validation loss in bits per byte of the scored text, counted by hand on a
tiny text for the byte tokenizer and for a byte-level BPE tokenizer file."""

import math

import pytest
import torch
import torch.nn.functional as F

from stackwise_ray.builder import ProgressiveRackBuilder
from stackwise_ray.data import load_tokenizer
from stackwise_ray.masking import TimeStepMasking
from stackwise_ray.phase import evaluate

from .conftest import tiny_config

TEXT = "Bits per byte: caf\u00e9 \u2014 na\u00efve r\u00e9sum\u00e9s, counted by hand."


def bpe_file(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["[PAD]", "[MASK]"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT * 3, "bytes and bits and bytes"], trainer)
    path = tmp_path / "bpe.json"
    tok.save(str(path))
    return str(path)


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_val_bpb_is_the_summed_loss_in_bits_over_the_scored_bytes(kind, tmp_path):
    spec = "byte" if kind == "byte" else bpe_file(tmp_path)
    tokenizer = load_tokenizer(spec)
    ids = tokenizer.encode(TEXT)
    config = tiny_config(data={"tokenizer": spec, "seq_len": len(ids)}, training_objective="clm",
                         model={"max_seq_len": 64})
    builder = ProgressiveRackBuilder(config)
    builder.add_stack()
    batch = TimeStepMasking(config, tokenizer).generate_masks_for_stack(
        {"input_ids": torch.tensor([ids]), "example_ids": torch.tensor([0])}, 0)
    metrics = evaluate(builder.rack, [batch], token_bytes=torch.from_numpy(tokenizer.token_bytes()))

    # by hand: clm scores every token after the first; their bytes are the text without the first token's
    logits, _ = builder.rack.eval()(batch["input_ids"], batch["time_step"])
    nats = F.cross_entropy(logits[0, :-1], torch.tensor(ids[1:]), reduction="sum").item()
    scored_bytes = len(tokenizer.decode(ids[1:]).encode("utf-8"))
    if kind == "byte":
        assert scored_bytes == len(TEXT.encode("utf-8")) - 1
    else:
        assert len(ids) < scored_bytes  # tokens of several bytes, multi-byte characters among them
    assert metrics["val_bytes"] == scored_bytes
    assert metrics["val_bpb"] == pytest.approx(nats / math.log(2) / scored_bytes, rel=1e-6)
    assert metrics["val_loss"] == pytest.approx(nats / (len(ids) - 1), rel=1e-6)


def test_byte_tokenizer_bpb_is_its_loss_in_bits():
    tokenizer = load_tokenizer("byte")
    assert tokenizer.token_bytes().tolist() == [1] * 256 + [0] * 4


def test_val_bpb_reaches_phase_metrics_curves_and_the_comparison_table():
    import pandas as pd

    from stackwise_ray.data import ProgressiveDataLoader
    from stackwise_ray.phase import train_stack
    from stackwise_ray.report import COMPARE_HEADER, comparison, comparison_rows
    from stackwise_ray.tune import trial_curve

    from .test_phase import setup

    config = tiny_config(data={"max_examples": 60}, training={"steps_per_stack": 4, "eval_every": 2})
    builder, masking, train_loader, val_loader = setup(config)
    builder.add_stack()
    builder.prepare_phase()
    m = train_stack(builder.rack, ProgressiveDataLoader(train_loader, masking, 0), config.training, 4,
                    ProgressiveDataLoader(val_loader, masking, 0), token_bytes=torch.from_numpy(
                        load_tokenizer("byte").token_bytes()))
    # the byte tokenizer: one byte per scored token, so bits per byte = nats per token / ln 2
    assert m["val_bpb"] == pytest.approx(m["val_loss"] / math.log(2))
    assert [p["val_bpb"] for p in m["val_curve"]] == pytest.approx([p["val_loss"] / math.log(2) for p in m["val_curve"]])
    phase = {**m, "stack": 0, "flops": 10.0, "train_flops": 10.0,
             "val_curve": [{**p, "global_step": p["step"], "phase_flops": 5.0 * p["step"] / 2} for p in m["val_curve"]]}
    assert [p["val_bpb"] for p in trial_curve([phase])] == [p["val_bpb"] for p in m["val_curve"]]
    results = pd.DataFrame([{"trial_id": "a", "kind": "progressive", "arm": "x", "status": "TERMINATED",
                             "val_loss": 2.0, "val_bpb": 2.5, "flops": 1.0, "budget": 1.0}])
    rows = comparison(results, pd.DataFrame(columns=["trial_id", "global_step", "flops", "val_loss"]))
    assert comparison_rows(rows)[0][COMPARE_HEADER.index("val_bpb (mean)")] == "2.5000"
