"""A killed run (metrics.csv, no summary.json) is still reportable."""

import pandas as pd

from fedkd.cli import main


def test_report_without_summary(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text('[run]\nname = "killed"\nrounds = 5\n[strategy]\nname = "fedavg"\n')
    rows = [(0, "server", "test", "accuracy", 0.1), (0, "server", "test", "loss", 2.3)]
    for r in (1, 2):
        rows += [(r, "server", "test", "accuracy", 0.5 + r / 10), (r, "server", "test", "loss", 1.0 / r), (r, "server", "time", "round_s", 0.4),
                 (r, "0", "train", "loss", 1.5)]
    pd.DataFrame(rows, columns=["round", "node", "split", "metric", "value"]).to_csv(run / "metrics.csv", index=False)
    assert main(["report", str(run)]) == 0
    out = capsys.readouterr().out
    assert "no summary.json" in out and "0.7000" in out  # round 2's accuracy, the last finished round
    assert (run / "accuracy.png").is_file()
