"""FedCLIP's attention adapter against its equation, written here with torch.nn's own modules
as the reference builds it (Linear -> Tanh -> Linear -> Softmax(dim=1), times the feature,
scored against open_clip's features of "a photo of a {}."); exact per-sample gradients of the
adapter under DP (float64, one backward per sample); the scheme's prompt is unread; runs
through the driver and by name through the CLI, without DP and under both trust models."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from fpl_bench.learners._base import EncodeContext, InitContext
from fpl_bench.learners.fedclip_adapter import OWN
from fpl_bench.method import method_from_name
from tests.test_driver import make_federation
from tests.test_ivlp import assert_per_sample_rows_exact, encoded, hand_written, start, trained
from tests.test_maple import build


@pytest.fixture(scope="module")
def towers64():
    return build(torch.float64)


def reference_logits(model, tower, params, feats, classes):
    """The reference's `img_adap` (torch.nn modules, run on `params`), f * img_adap(f),
    normalised, against the hand-written prompt's normalised features, times logit_scale."""
    dim = feats.shape[-1]
    img_adap = nn.Sequential(
        nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, dim), nn.Softmax(dim=1)
    ).to(feats.dtype)
    names = ("0.weight", "0.bias", "2.weight", "2.bias")
    weights = {name: params[key] for name, key in zip(names, OWN, strict=True)}
    adapted = functional_call(img_adap, weights, (feats,)) * feats
    adapted = adapted / adapted.norm(dim=1, keepdim=True)
    return tower.logit_scale * adapted @ hand_written(model, tower, classes).T


def features(n, dim, seed):
    """Cached image features: L2-normalised, as `fpl_bench/features.py` stores them."""
    gen = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, dim, generator=gen, dtype=torch.float64), dim=-1)


def test_adapter_is_two_square_linear_layers_with_torch_init(tiny_tower):
    params, consts = method_from_name("fedclip").init(
        InitContext(tiny_tower, torch.Generator().manual_seed(0))
    )
    dim = tiny_tower.feature_dim
    shapes = {k: tuple(params[k].shape) for k in OWN}
    assert shapes == {OWN[0]: (dim, dim), OWN[1]: (dim,), OWN[2]: (dim, dim), OWN[3]: (dim,)}
    assert all(params[k].abs().max() <= 1 / dim**0.5 for k in OWN)  # nn.Linear's bound
    assert set(consts) == {"fedclip_adapter_text"}


def test_logits_are_the_references_adapter_and_cosine(towers64):
    model, tower, _ = towers64
    method = method_from_name("fedclip")
    params, consts = start(method, tower)
    classes = torch.tensor([0, 2, 3, 5])
    ctx = EncodeContext(tower, classes, consts)
    text, feats = encoded(method, params, ctx), features(5, tower.feature_dim, 1)
    want = reference_logits(model, tower, params, feats, classes)
    torch.testing.assert_close(method.logits(text, feats, None, ctx), want)
    torch.testing.assert_close(method.logits(text, feats[2], None, ctx), want[2])


def test_per_sample_gradients_equal_a_backward_per_sample_in_float64(towers64):
    model, tower, _ = towers64
    method = method_from_name("fedclip")
    params, consts = start(method, tower)
    classes, labels = torch.arange(4), torch.tensor([0, 3, 1, 1])
    feats = features(4, tower.feature_dim, 2)

    def reference_loss(leaves, i):
        logits = reference_logits(model, tower, leaves, feats[i : i + 1], classes)
        return F.cross_entropy(logits, labels[i : i + 1])

    ctx = EncodeContext(tower, classes, consts)
    batch = (feats, torch.zeros(4, 0, 1, dtype=torch.float64), labels)
    rows = assert_per_sample_rows_exact(method, params, ctx, batch, reference_loss)
    assert torch.equal(rows["prompt"], torch.zeros_like(rows["prompt"]))  # the prompt: unread
    assert all(rows[k].abs().sum(dim=tuple(range(1, rows[k].dim()))).min() > 0 for k in OWN)


@pytest.mark.parametrize("name", ["fedclip", "fedclip_adapter@local"])
@pytest.mark.parametrize("mode", ["none", "server", "client"])
def test_runs_through_the_driver_training_only_the_adapter(tiny_tower, name, mode):
    run, before, out = trained(name, tiny_tower, make_federation(tiny_tower), mode, rounds=2)
    assert all(0.0 <= out.history[-1][k] <= 1.0 for k in ("local_acc", "base_acc", "novel_acc"))
    after = run.view(0, evaluation=True)
    assert all(not torch.equal(before[k], after[k]) for k in OWN)  # the adapter trained
    # the prompt has zero gradient: only DP noise moves it
    assert torch.equal(before["prompt"], after["prompt"]) == (mode == "none")
    shared = set(run.method.shared)
    assert shared == ({"prompt", *OWN} if name == "fedclip" else set())


def test_training_lowers_the_loss(tiny_tower):
    fed = make_federation(tiny_tower)
    _, _, out = trained("fedclip", tiny_tower, fed, "none", rounds=10, batch_size=8, lr=0.5)
    losses = [h["train_loss"] for h in out.history]
    assert losses[-1] < losses[0] - 0.01, losses
