"""Shared fixtures: a randomly initialised tiny open_clip model (no weights needed) and its tower."""

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see fpl_bench/process.py
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")

import pytest
import torch

CONFIG = Path(__file__).resolve().parents[1] / "fpl_bench" / "model_configs" / "fpl-tiny-vit.json"


@pytest.fixture(scope="session")
def tiny_model():
    import open_clip

    open_clip.add_model_config(CONFIG)
    torch.manual_seed(0)
    model = open_clip.create_model("fpl-tiny-vit", pretrained=None).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, open_clip.get_tokenizer("fpl-tiny-vit")


@pytest.fixture(scope="session")
def tiny_tower(tiny_model):
    from fpl_bench.text_tower import TextTower

    model, tokenizer = tiny_model
    names = [
        "red circle",
        "blue square",
        "green triangle",
        "yellow star",
        "purple heart",
        "orange cross",
    ]
    return TextTower.build(model, tokenizer, names, n_ctx=4)


@pytest.fixture(scope="session")
def tiny_vision(tiny_model):
    """The tiny model's image tower, for learners that prompt it (MaPLe)."""
    from fpl_bench.vision import VisionTower

    return VisionTower.of(tiny_model[0])


@pytest.fixture(autouse=True)
def _tracking_uri_as_given():
    """Each test starts from the MLFLOW_TRACKING_URI the session was given: a command run in
    this process with --tracking-uri, or a cluster cell run in it, exports its store (as a
    one-command process should), and a later test's subprocess would otherwise inherit it
    (test files share worker processes under pytest-xdist)."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before
