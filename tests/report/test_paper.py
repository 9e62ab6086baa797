"""paper: the DP-FPL paper's numbers, keyed by (dataset, method, eps, metric, clients)."""

import pandas as pd
import pytest

from fpl_bench.report.paper import PAPER_CSV, applies, paper_number, paper_table


def test_csv_holds_tables_2_to_4():
    table = paper_table()
    assert len(table) == 4 * 6 * 4 * 2 + 2 * 6 * 4  # Tables 2 and 3; Table 4 at 25 and 50
    assert set(table["dataset"]) == {
        "caltech101",
        "oxford_pets",
        "oxford_flowers",
        "food101",
        "cifar100",
    }
    assert set(table["method"]) == {"promptfl", "fedotp", "fedpgp", "dpfpl"}
    assert table["eps"].tolist()[:24:4] == ["none", "0.4", "0.2", "0.1", "0.05", "0.01"]
    assert not table.duplicated(["dataset", "method", "eps", "metric", "clients"]).any()
    assert pd.read_csv(PAPER_CSV)["accuracy_pct"].between(0, 100).all()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("caltech101", "promptfl", "none", "local_acc"), 0.9445),  # Table 2, first cell
        (("food101", "dpfpl", 0.01, "local_acc", 10), 0.7745),  # Table 2, last cell
        (("oxford_flowers", "fedpgp", "0.05", "neighbor_acc"), 0.3527),  # Table 3
        (("oxford_pets", "fedotp", 0.2, "neighbor_acc"), 0.5974),
        (("cifar100", "fedotp", 0.4, "local_acc", 25), 0.4722),  # Table 4, 25 clients
        (("cifar100", "fedotp", 0.4, "local_acc", 50), 0.5823),  # Table 4, 50 clients
    ],
)
def test_paper_number_reads_the_published_cell(args, expected):
    assert paper_number(*args) == pytest.approx(expected)


@pytest.mark.parametrize(
    "args",
    [
        ("cifar100", "fedotp", 0.4, "local_acc"),  # 25 or 50 clients: ambiguous
        ("cifar100", "fedotp", 0.4, "local_acc", 10),  # not a setting of the paper
        ("caltech101", "dpfpl", 0.4, "local_acc", 20),
        ("caltech101", "dpfpl", 0.5, "local_acc"),  # eps not in the paper
        ("caltech101", "coop", "none", "local_acc"),  # method not in the paper
        ("synthetic", "dpfpl", "none", "local_acc"),
        ("caltech101", "dpfpl", "none", "hm"),
    ],
)
def test_paper_number_none_where_not_published(args):
    assert paper_number(*args) is None


def test_paper_setting_is_personalized_and_server_trust_under_dp():
    assert applies("personalized", "server", "0.4")
    assert applies("personalized", "client", "none")
    assert not applies("personalized", "client", "0.4")
    assert not applies("base2novel", "server", "none")
