"""The phase metrics record: every field documented where the reader looks, and a dict
written by one version read back by it (a key it does not know is an error, not dropped)."""
import dataclasses

import pytest

from stackwise_ray.phase_metrics import PhaseMetrics

DOCS = open("docs/results.md").read()


def test_every_metric_has_a_doc_and_a_row_in_the_results_doc():
    for name, doc in PhaseMetrics.docs().items():
        assert doc, name
        assert f"| `{name}` | {doc} |" in DOCS, f"docs/results.md: no row for {name}, or another text"


def test_a_record_goes_through_its_dict_and_leaves_out_what_does_not_apply():
    required = {f.name: i for i, f in enumerate(dataclasses.fields(PhaseMetrics))
                if f.default is dataclasses.MISSING}
    assert {"val_loss", "val_bpb", "stack", "train_s", "rack"} <= required.keys() and "cache" not in required
    m = PhaseMetrics(**required)
    d = m.to_dict()
    assert d == required and "val_curve" not in d and "cache" not in d
    m.cache, m.prestarted = {"kind": "none"}, False
    assert PhaseMetrics.from_dict(m.to_dict()) == m and m.to_dict()["prestarted"] is False
    with pytest.raises(TypeError):
        PhaseMetrics.from_dict({**required, "val_lss": 1.0})
    with pytest.raises(TypeError):
        PhaseMetrics.from_dict({k: v for k, v in required.items() if k != "val_loss"})
