import pytest
import torch

from stackwise_ray.config import StackWiseConfig


def tiny_config(model=None, data=None, training=None, **progressive) -> StackWiseConfig:
    """A small, fast config; keyword arguments go to training.progressive."""
    raw = {
        "model": {"d_model": 32, "n_heads": 2, "blocks_per_stack": 1, "max_seq_len": 32, **(model or {})},
        "data": {"seq_len": 32, "batch_size": 8, **(data or {})},
        "training": {"steps_per_stack": 20, "eval_batches": 2, "warmup_steps": 2, **(training or {}),
                     "progressive": {"time_embedding_dim": 16, "max_stacks": 4, **progressive}},
    }
    return StackWiseConfig.from_dict(raw).validate()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
