"""Real open_clip architectures end to end: ViT-B-16 and RN50 with random weights, saved to disk
(a state dict, and an OpenAI-style TorchScript archive), loaded by path through fpl-bench, and
one federated round of CoOp on a tiny CoOp-layout EuroSAT folder encoded with each backbone's own
preprocess (224 px). No download: the weights are made here."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import open_clip
import pytest
import torch

from fpl_bench.backbone import load_backbone, quiet_random_init
from fpl_bench.catalog import resolve_method
from fpl_bench.experiment import run_experiment
from fpl_bench.spec import build_spec
from tests.data.helpers import coop_folder

pytestmark = pytest.mark.slow  # each test builds a 224-px model and runs a round on it

EUROSAT = ("AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial")
EUROSAT += ("Pasture", "PermanentCrop", "Residential", "River", "SeaLake")


@pytest.fixture(scope="module")
def eurosat_root(tmp_path_factory) -> Path:
    """EuroSAT in CoOp's layout (`eurosat/2750/<class>/`, `split_zhou_EuroSAT.json`): its ten
    classes with one train, one val and one test image each (the fewest classes of a CoOp
    card, so the fewest 224 px images to encode)."""
    root = tmp_path_factory.mktemp("data")
    split = coop_folder(root, per_class=3, classes=EUROSAT, with_json=False)
    parts = ("train", "val", "test")
    by_part: dict[str, list] = {part: [] for part in parts}
    for entry in split["train"] + split["val"]:
        index = int(Path(entry[0]).stem.rsplit("_", 1)[1])  # image i of its class -> parts[i]
        by_part[parts[index]].append(entry)
    (root / "tiny").rename(root / "eurosat")
    (root / "eurosat" / "images").rename(root / "eurosat" / "2750")
    (root / "eurosat" / "split_zhou_EuroSAT.json").write_text(json.dumps(by_part))
    return root


def _random_model(name: str, *, quick_gelu: bool) -> torch.nn.Module:
    with quiet_random_init():
        torch.manual_seed(0)
        return open_clip.create_model(name, pretrained=None, force_quick_gelu=quick_gelu).eval()


def _one_round(backbone: str, weights: Path, root: Path, out: Path) -> dict:
    spec = build_spec(
        methods=(resolve_method("coop"),),
        dataset="eurosat",
        data_root=root,
        protocol="personalized",
        partition="pathological",
        clients=2,
        shots=1,
        rounds=1,
        local_epochs=1,
        batch_size=4,
        n_ctx=4,
        eval_every=1,
        last_k=1,
        backbone=backbone,
        pretrained=str(weights),
        device="cpu",
        out=out / "out",
        cache_dir=out / "cache",
    )
    frame = run_experiment(spec, log=lambda line: None)
    assert len(frame) == 1
    return frame.iloc[0].to_dict()


def _check_row(row: dict) -> None:
    assert row["status"] == "finished"
    for metric in ("local_acc", "neighbor_acc"):
        assert 0.0 <= row[metric] <= 1.0 and not math.isnan(row[metric])


def test_vit_b16_state_dict_runs_one_round(eurosat_root, tmp_path):
    model = _random_model("ViT-B-16", quick_gelu=False)
    path = tmp_path / "vit_b16.pt"
    torch.save({k: v.half() for k, v in model.state_dict().items()}, path)
    del model
    row = _one_round("ViT-B-16", path, eurosat_root, tmp_path)
    _check_row(row)
    assert len(list((tmp_path / "cache" / "features").glob("*.pt"))) == 2  # train + test


def test_rn50_openai_archive_loads_and_runs_one_round(eurosat_root, tmp_path):
    model = _random_model("RN50", quick_gelu=True).half()
    path = tmp_path / "RN50.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script/save are deprecated
        torch.jit.save(torch.jit.script(model), str(path))
    loaded = load_backbone("RN50", pretrained=str(path))
    assert type(loaded.model.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    expected = model.state_dict()
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(value.half(), expected[key]), key
    del model, loaded, expected
    row = _one_round("RN50", path, eurosat_root, tmp_path)
    _check_row(row)
