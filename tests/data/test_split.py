"""Tests of the base-to-novel class split (CoOp's subsample_classes)."""

import numpy as np
import pytest

from fpl_bench.data.split import base_novel_split
from fpl_bench.errors import UsageError


def test_even_class_count_splits_in_halves() -> None:
    base, novel = base_novel_split(64)
    assert base.tolist() == list(range(32))
    assert novel.tolist() == list(range(32, 64))


def test_odd_class_count_gives_base_the_extra_class() -> None:
    base, novel = base_novel_split(5)  # ceil(5 / 2) = 3
    assert base.tolist() == [0, 1, 2]
    assert novel.tolist() == [3, 4]


def test_single_class_is_base_and_novel_is_empty() -> None:
    base, novel = base_novel_split(1)
    assert base.tolist() == [0]
    assert novel.tolist() == []


def test_halves_are_int64_disjoint_and_cover_all_classes() -> None:
    base, novel = base_novel_split(7)
    assert base.dtype == np.int64 and novel.dtype == np.int64
    assert np.array_equal(np.concatenate([base, novel]), np.arange(7))


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_class_count_is_a_usage_error(bad: object) -> None:
    with pytest.raises(UsageError, match="n_classes"):
        base_novel_split(bad)  # type: ignore[arg-type]
