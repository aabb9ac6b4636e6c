"""The phase metrics record: every field documented where the reader looks, and a dict
written by one version read back by it (a key it does not know is an error, not dropped)."""
import pytest

from stackwise_ray.phase_metrics import PhaseMetrics

DOCS = open("docs/results.md").read()


def test_every_metric_has_a_doc_and_a_row_in_the_results_doc():
    for name, doc in PhaseMetrics.docs().items():
        assert doc, name
        assert f"| `{name}` | {doc} |" in DOCS, f"docs/results.md: no row for {name}, or another text"


def test_a_record_goes_through_its_dict_and_leaves_out_what_does_not_apply():
    required = {name: i for i, name in enumerate(
        ["steps", "loss_curve", "train_loss", "train_time_s", "trainable_params", "total_params", "val_loss",
         "val_ppl", "val_accuracy", "val_tokens", "stack", "precision", "time_step", "resumed_from_step",
         "train_flops", "trunk_forwards", "cache_shards_loaded", "cold_start_s", "startup_s", "train_s",
         "checkpoint_s", "peak_memory_mb", "num_workers", "torch_threads", "node_id", "rack"])}
    m = PhaseMetrics(**required)
    d = m.to_dict()
    assert d == required and "val_curve" not in d and "cache" not in d
    m.cache, m.prestarted = {"kind": "none"}, False
    assert PhaseMetrics.from_dict(m.to_dict()) == m and m.to_dict()["prestarted"] is False
    with pytest.raises(TypeError):
        PhaseMetrics.from_dict({**required, "val_lss": 1.0})
    with pytest.raises(TypeError):
        PhaseMetrics.from_dict({k: v for k, v in required.items() if k != "val_loss"})
