"""FedAvg's weighted mean on hand-written tensors (Flower's aggregate_test idea)."""

import pytest
import torch

from fpl_bench.schemes.aggregate import weighted_mean


def test_weighted_mean_weights_by_sample_count():
    a = {"prompt": torch.tensor([1.0, 2.0]), "x": torch.tensor([0.0])}
    b = {"prompt": torch.tensor([4.0, 8.0]), "x": torch.tensor([3.0])}
    out = weighted_mean([(a, 1), (b, 3)])
    # (1*[1,2] + 3*[4,8]) / 4 = [13/4, 26/4]
    torch.testing.assert_close(out["prompt"], torch.tensor([3.25, 6.5]))
    torch.testing.assert_close(out["x"], torch.tensor([2.25]))


def test_weighted_mean_is_not_the_last_client_and_does_not_alias():
    """PromptFL's official code averaged aliased state dicts: the 'average' was the last client."""
    a = {"prompt": torch.zeros(3)}
    b = {"prompt": torch.ones(3)}
    out = weighted_mean([(a, 5), (b, 5)])
    torch.testing.assert_close(out["prompt"], torch.full((3,), 0.5))
    out["prompt"] += 1
    assert a["prompt"].sum() == 0 and b["prompt"].sum() == 3


def test_weighted_mean_rejects_empty_and_zero_weight():
    with pytest.raises(ValueError):
        weighted_mean([])
    with pytest.raises(ValueError):
        weighted_mean([({"p": torch.ones(1)}, 0)])
