"""A run directory: config.toml (resolved), metrics.csv (tidy, written as the run goes), summary.json.

metrics.csv columns: round, node, split, metric, value. ``node`` is ``server`` or a partition id;
``split`` is ``train`` (client training), ``test`` (a client's test split, or the server's test set
for node ``server``) or another name a strategy chooses.
"""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pandas is imported where a frame is made: a deployed ClientApp process never needs it
    import pandas as pd

COLUMNS = ["round", "node", "split", "metric", "value"]


@dataclass
class RunRecorder:
    """Collects metrics and traffic; writes each round's rows to disk as soon as the round ends."""

    out_dir: Path | None = None
    rows: list[dict] = field(default_factory=list)
    bytes_up: int = 0
    bytes_down: int = 0
    messages: int = 0
    failures: list[str] = field(default_factory=list)
    t_start: float = field(default_factory=time.perf_counter)
    t_rounds_start: float | None = None
    t_rounds_end: float | None = None
    round_times: dict[int, float] = field(default_factory=dict)
    _flushed: int = 0
    _t_round: float | None = None

    def __post_init__(self) -> None:
        if self.out_dir is not None:
            self.out_dir = Path(self.out_dir)
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with open(self.out_dir / "metrics.csv", "w", newline="") as f:
                csv.writer(f).writerow(COLUMNS)

    # -- recording
    def add(self, server_round: int, node: Any, split: str, metric: str, value: float) -> None:
        self.rows.append({"round": int(server_round), "node": str(node), "split": split, "metric": metric, "value": float(value)})

    def add_many(self, server_round: int, node: Any, split: str, metrics: dict) -> None:
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.add(server_round, node, split, k, v)

    def start_rounds(self) -> None:
        self.t_rounds_start = self._t_round = time.perf_counter()

    def end_round(self, server_round: int) -> None:
        now = time.perf_counter()
        if server_round > 0 and self._t_round is not None:
            self.round_times[server_round] = now - self._t_round
            self.add(server_round, "server", "time", "round_s", now - self._t_round)
            self.t_rounds_end = now
        self._t_round = now
        self.flush()

    def flush(self) -> None:
        if self.out_dir is None or self._flushed == len(self.rows):
            return
        with open(self.out_dir / "metrics.csv", "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            w.writerows(self.rows[self._flushed :])
        self._flushed = len(self.rows)

    # -- reading
    def frame(self) -> pd.DataFrame:
        import pandas as pd

        return pd.DataFrame(self.rows, columns=COLUMNS)

    def value(self, server_round: int, node: str, split: str, metric: str) -> float | None:
        for r in reversed(self.rows):
            if r["round"] == server_round and r["node"] == node and r["split"] == split and r["metric"] == metric:
                return r["value"]
        return None

    def round_table(self, server_round: int) -> dict[str, float]:
        """The per-round line: server test metrics and client means."""
        df = self.frame()
        df = df[df["round"] == server_round]
        out: dict[str, float] = {}
        srv = df[(df["node"] == "server") & (df["split"] == "test")]
        for m in ("accuracy", "loss"):
            v = srv[srv["metric"] == m]["value"]
            if len(v):
                out[f"test_{m}"] = float(v.iloc[-1])
        cl = df[df["node"] != "server"]
        for split in ("train", "test"):
            for m in ("loss", "accuracy"):
                v = cl[(cl["split"] == split) & (cl["metric"] == m)]["value"]
                if len(v):
                    out[f"client_{split}_{m}"] = float(v.mean())
        eps = cl[cl["metric"] == "epsilon"]["value"]
        if len(eps):
            out["epsilon"] = float(eps.max())
        if server_round in self.round_times:
            out["round_s"] = self.round_times[server_round]
        return out


def write_summary(out_dir: Path | None, summary: dict) -> dict:
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in summary.items()}
    if out_dir is not None:
        Path(out_dir, "summary.json").write_text(json.dumps(clean, indent=2) + "\n")
    return clean


def read_run(run_dir: str | Path) -> tuple[dict, pd.DataFrame]:
    import pandas as pd

    run_dir = Path(run_dir)
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no summary.json)")
    return json.loads(summary_path.read_text()), pd.read_csv(run_dir / "metrics.csv", dtype={"node": str})


def plot_run(run_dir: str | Path) -> list[Path]:
    """PNG plots of accuracy and loss per round (server test set, and client means)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    _, df = read_run(run_dir)
    paths = []
    for metric in ("accuracy", "loss"):
        fig, ax = plt.subplots(figsize=(6, 4))
        srv = df[(df["node"] == "server") & (df["split"] == "test") & (df["metric"] == metric)]
        if len(srv):
            ax.plot(srv["round"], srv["value"], marker="o", label="global model, server test set")
        cl = df[(df["node"] != "server") & (df["metric"] == metric)]
        for split, g in cl.groupby("split"):
            m = g.groupby("round")["value"].agg(["mean", "min", "max"])
            ax.plot(m.index, m["mean"], marker=".", label=f"clients ({split}), mean")
            ax.fill_between(m.index, m["min"], m["max"], alpha=0.15)
        ax.set_xlabel("round")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = run_dir / f"{metric}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths
