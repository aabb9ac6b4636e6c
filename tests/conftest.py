import shutil
import tempfile

import pytest
import torch

from stackwise_ray.config import StackWiseConfig

# ray.storage_path of tiny configs: the token stores they build (one per corpus) are shared
# by the whole session and removed at its end
TOKEN_STORAGE = tempfile.mkdtemp(prefix="stackwise_ray-tests-")


def tiny_config(model=None, data=None, training=None, **progressive) -> StackWiseConfig:
    """A small, fast config; keyword arguments go to training.progressive."""
    raw = {
        "model": {"d_model": 32, "n_heads": 2, "blocks_per_stack": 1, "max_seq_len": 32, **(model or {})},
        "data": {"seq_len": 32, "batch_size": 8, **(data or {})},
        "training": {"steps_per_stack": 20, "eval_batches": 2, "warmup_steps": 2, **(training or {}),
                     "progressive": {"time_embedding_dim": 16, "max_stacks": 4, **progressive}},
        "ray": {"storage_path": TOKEN_STORAGE},
    }
    return StackWiseConfig.from_dict(raw).validate()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session", autouse=True)
def _token_storage():
    yield
    shutil.rmtree(TOKEN_STORAGE, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (starting Ray costs seconds)."""
    import os

    import ray

    from stackwise_ray.ray_runtime import start_local

    # credentials for the S3 stand-in of test_storage.py (moto accepts any); set before
    # Ray starts so that its workers have them too
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ.setdefault(key, "testing")
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    start_local(num_cpus=2, include_dashboard=False, log_to_driver=False, resources={"trial_slot": 2})
    yield ray
    ray.shutdown()


def ray_config(**overrides):
    """A config small enough that a Ray phase is dominated by Ray's own start-up."""
    training = {"steps_per_stack": 8, "eval_batches": 2, "log_every": 4, **overrides.pop("training", {})}
    ray_section = overrides.pop("ray", {})
    config = tiny_config(data={"max_examples": 120, **overrides.pop("data", {})}, training=training,
                         max_stacks=3, **overrides)
    for key, value in ray_section.items():
        setattr(config.ray, key, value)
    return config.validate()


@pytest.fixture(scope="session")
def arrow_run(tmp_path_factory, ray_session):
    """3 stacks, append, frozen trunk, Arrow cache, 1 worker (a run several test files read)."""
    from stackwise_ray.trainer import ProgressiveTrainer

    storage = tmp_path_factory.mktemp("runs")
    config = ray_config(ray={"cache_backend": "arrow"})
    config.tracking.mlflow, config.tracking.tensorboard = "local", True
    # a file:// URI is the local directory it names
    trainer = ProgressiveTrainer(config, storage_path=f"file://{storage}", name="arrow")
    history = trainer.train_progressively()
    assert trainer.run_dir == str(storage / "arrow") and (storage / "arrow" / "final" / "rack.json").is_file()
    return trainer, history


def rack_weights(path):
    from stackwise_ray.checkpoint import load_rack

    return {n: t.clone() for n, t in load_rack(path).rack.state_dict().items()}


RAY_FIXTURES = {"ray_session", "arrow_run"}


def pytest_collection_modifyitems(config, items):
    """A test that needs the session's Ray (ray_session, arrow_run) is slow: it starts Ray
    and runs phases; so is one on the S3 stand-in (test_storage.py's "s3" parameter starts
    a moto server). The fast tier, `pytest -m "not slow"`, is the rest."""
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())) or "s3" in params.values():
            item.add_marker(pytest.mark.slow)
