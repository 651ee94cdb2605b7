"""The report command on run directories written here: table cells and PNG files."""

import json

import numpy as np
import pytest

from utils import report


def _write_run(path, trainer, dataset, accs, up=4_000_000, cohort=10):
    path.mkdir(parents=True)
    flags = {"trainer": trainer, "dataset": dataset, "model": "m", "num_clients": 100,
             "clients_per_round": cohort / 100}
    (path / "flags.json").write_text(json.dumps(flags))
    lines = [json.dumps({"round": r, "test_acc": a, "train_acc": None,
                         "up_bytes": up * cohort, "down_bytes": up * cohort})
             for r, a in enumerate(accs)]
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_table_and_plots_from_run_directories(tmp_path):
    _write_run(tmp_path / "fedeq", "fedeq_resnet", "femnist", [0.1, 0.3, 0.5])
    for k, final in enumerate([0.6, 0.8]):          # a two-repeat run
        _write_run(tmp_path / "fedavg" / f"run{k}", "fedavg_resnet", "femnist",
                   [0.2, final], up=12_000_000)
    _write_run(tmp_path / "cifar", "fedeq_resnet", "cifar10", [0.4])
    _write_run(tmp_path / "text", "fedeq_seq", "shakespeare", [0.05, 0.09])
    (tmp_path / "fedavg" / "flags.json").write_text("{}")
    out = tmp_path / "report"
    assert report.main([str(tmp_path / d) for d in ("fedeq", "fedavg", "cifar", "text")]
                       + ["--out", str(out)]) == 0
    text = (out / "table.md").read_text()
    assert "| algorithm | femnist | cifar10 | shakespeare |" in text
    assert "70.00 ± 10.00" in text and "2 run(s)" in text and "12.00 MB up" in text
    # One row per algorithm: the vision and text trainers of FeDEQ share it.
    fedeq_rows = [line for line in text.splitlines() if line.startswith("| fedeq")]
    assert len(fedeq_rows) == 1 and fedeq_rows[0].startswith("| fedeq |")
    assert all(cell in fedeq_rows[0] for cell in ("50.00 ± 0.00", "40.00 ± 0.00", "9.00 ± 0.00"))
    for name in ("accuracy_vs_rounds.png", "accuracy_vs_megabytes.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    rounds = (out / "rounds_fedeq.md").read_text().splitlines()
    assert len(rounds) == 2 + 3 and rounds[-1].startswith("| 2 | 0.5000 | — |")
    assert (out / "rounds_fedavg_run1.md").is_file()


def test_megabytes_accumulate_per_client(tmp_path):
    _write_run(tmp_path / "a", "fedeq", "femnist", [0.1, 0.2, 0.3], up=2_000_000)
    run = report.read_run(tmp_path / "a")
    np.testing.assert_allclose(run.mb_per_client(), [4.0, 8.0, 12.0])


def test_not_a_run_directory_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        report.main([str(tmp_path)])
    assert "flags.json" in capsys.readouterr().err


def test_inco_runs_get_the_table2_layout_and_per_group_curves(tmp_path):
    for trainer, finals in (("heteroavg", (0.5, 0.7)), ("incoavg", (0.6, 0.8))):
        path = tmp_path / trainer
        path.mkdir()
        (path / "flags.json").write_text(json.dumps(
            {"trainer": trainer, "dataset": "cifar10", "alpha": 0.5, "model": "resnet26",
             "num_clients": 100, "clients_per_round": 0.1}))
        records = [{"round": r, "test_acc": float(np.mean(accs)), "up_bytes": 1, "down_bytes": 1,
                    "test_acc_tiers": {"resnet10": accs[0], "resnet26": accs[1]}}
                   for r, accs in enumerate([(0.1, 0.2), finals])]
        (path / "metrics.jsonl").write_text("\n".join(map(json.dumps, records)) + "\n")
    out = tmp_path / "report"
    assert report.main([str(tmp_path / "heteroavg"), str(tmp_path / "incoavg"),
                        "--out", str(out)]) == 0
    rows = (out / "table2.md").read_text().splitlines()
    assert rows[0] == "| method | cifar10 0.5 (resnet26) |"
    assert rows[2].startswith("| HeteroAvg | 60.0 ± 0.0") and rows[3].startswith("| InCoAvg | 70.0")
    assert (out / "accuracy_per_group.png").read_bytes()[:4] == b"\x89PNG"


def test_tiered_runs_get_a_per_tier_table_with_bytes_and_macs(tmp_path):
    path = tmp_path / "mixed"
    path.mkdir()
    (path / "flags.json").write_text(json.dumps(
        {"trainer": "heteroavg", "dataset": "cifar10", "model": "mobilenet_v2",
         "budgets": "26300000:720000,inf:inf", "num_clients": 4, "clients_per_round": 0.5}))
    records = [{"round": 0, "test_acc": 0.3, "up_bytes": 3, "down_bytes": 3,
                "test_acc_tiers": {"dac_26.2M": 0.2, "dac_94.6M": 0.4},
                "up_bytes_tiers": {"dac_26.2M": 2e6}, "down_bytes_tiers": {"dac_26.2M": 2e6},
                "macs_per_image_tiers": {"dac_26.2M": 26.2e6}},
               {"round": 1, "up_bytes": 3, "down_bytes": 3,
                "up_bytes_tiers": {"dac_26.2M": 4e6, "dac_94.6M": 9e6},
                "down_bytes_tiers": {"dac_26.2M": 4e6, "dac_94.6M": 9e6},
                "macs_per_image_tiers": {"dac_26.2M": 26.2e6, "dac_94.6M": 94.6e6}}]
    (path / "metrics.jsonl").write_text("\n".join(map(json.dumps, records)) + "\n")
    out = tmp_path / "report"
    assert report.main([str(path), "--out", str(out)]) == 0
    rows = (out / "tiers.md").read_text().splitlines()
    assert rows[2] == "| mixed | dac_26.2M | 20.00 | 3.00 | 3.00 | 26.20 M |"
    assert rows[3] == "| mixed | dac_94.6M | 40.00 | 9.00 | 9.00 | 94.60 M |"
    assert not (out / "table2.md").exists()
