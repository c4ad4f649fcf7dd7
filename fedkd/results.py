"""A run directory: config.toml (resolved), metrics.csv (tidy, written as the run goes), summary.json
(rewritten atomically after every round, status ``running`` until the run ends), checkpoint.pt (the
state after the last finished round, see fedkd.checkpoint) and model.pt (the final global model).

metrics.csv columns: round, node, split, metric, value. ``node`` is ``server`` or a partition id;
``split`` is ``train`` (client training), ``test`` (a client's test split, or the server's test set
for node ``server``) or another name a strategy chooses.
"""

from __future__ import annotations

import csv
import json
import math
import os
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
    faults: list[dict] = field(default_factory=list)  # {round, node, kind: rejected|error|missing, reason}
    status: str | None = None  # set where a run fails (e.g. "diverged"); summarize() prefers it
    error: str | None = None
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

    def add_fault(self, server_round: int, node: Any, kind: str, reason: str) -> None:
        """A reply that was rejected, an error reply, or a missing one: a metrics.csv row and a summary entry."""
        self.faults.append({"round": int(server_round), "node": str(node), "kind": kind, "reason": reason})
        self.add(server_round, node, "faults", kind, 1.0)

    # -- checkpointing (fedkd.checkpoint)
    STATE_FIELDS = ("rows", "bytes_up", "bytes_down", "messages", "failures", "faults", "round_times")

    def state(self) -> dict:
        return {k: getattr(self, k) for k in self.STATE_FIELDS}

    def restore(self, state: dict) -> None:
        """Continue from ``state``: metrics.csv is rewritten to hold exactly its rows."""
        for k in self.STATE_FIELDS:
            setattr(self, k, state[k])
        self._flushed = 0
        if self.out_dir is not None:
            tmp = self.out_dir / "metrics.csv.tmp"
            with open(tmp, "w", newline="") as f:
                csv.writer(f).writerow(COLUMNS)
            os.replace(tmp, self.out_dir / "metrics.csv")
        self.flush()

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


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write ``path`` so that a reader (or a kill -9) sees the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_summary(out_dir: Path | None, summary: dict) -> dict:
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in summary.items()}
    if out_dir is not None:
        atomic_write(Path(out_dir, "summary.json"), json.dumps(clean, indent=2) + "\n")
    return clean


def summary_from_metrics(run_dir: Path, df: pd.DataFrame) -> dict:
    """What a run directory without summary.json (a run killed before it could write one) still tells."""
    import tomllib

    conf = {}
    if (run_dir / "config.toml").is_file():
        conf = tomllib.loads((run_dir / "config.toml").read_text())
    srv = df[(df["node"] == "server") & (df["split"] == "test")]
    done = df[(df["node"] == "server") & (df["metric"] == "round_s")]
    last = int(done["round"].max()) if len(done) else 0

    def metric(name):
        v = srv[(srv["round"] == last) & (srv["metric"] == name)]["value"]
        return float(v.iloc[-1]) if len(v) else None

    return {
        "status": "unknown (no summary.json: the run was killed; metrics.csv holds the finished rounds)",
        "run": conf.get("run", {}).get("name"),
        "strategy": conf.get("strategy", {}).get("name"),
        "dataset": conf.get("data", {}).get("dataset"),
        "rounds": conf.get("run", {}).get("rounds"),
        "rounds_completed": last,
        "accuracy": metric("accuracy"),
        "loss": metric("loss"),
    }


def read_run(run_dir: str | Path) -> tuple[dict, pd.DataFrame]:
    import pandas as pd

    run_dir = Path(run_dir)
    summary_path = run_dir / "summary.json"
    metrics_path = run_dir / "metrics.csv"
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no metrics.csv)")
    df = pd.read_csv(metrics_path, dtype={"node": str})
    if not summary_path.is_file():
        return summary_from_metrics(run_dir, df), df
    return json.loads(summary_path.read_text()), df


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
