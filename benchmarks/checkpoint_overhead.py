"""Per-round time with and without per-round checkpoints, in one process (in-process InlineGrid, no Ray).

Runs the same experiment ``--repeats`` times each way, alternating, and prints the mean per-round time
(``round_s`` of metrics.csv) and the mean time spent writing checkpoint.pt + summary.json per round.

    python benchmarks/checkpoint_overhead.py                       # digits, 10 clients, MLP, 5 rounds
    python benchmarks/checkpoint_overhead.py --set model.name=cnn  # a larger model
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import pandas as pd


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--set", dest="sets", action="append", default=[])
    args = ap.parse_args()

    from fedkd import checkpoint
    from fedkd.attacks.inline import run_inline
    from fedkd.config import load_config

    saves: list[float] = []
    orig = checkpoint.save_checkpoint

    def timed(*a, **k):
        t = time.perf_counter()
        try:
            return orig(*a, **k)
        finally:
            saves.append(time.perf_counter() - t)

    checkpoint.save_checkpoint = timed
    base = [f"run.rounds={args.rounds}", f"data.num_clients={args.clients}", "train.local_epochs=1", *args.sets]
    times: dict[bool, list[float]] = {True: [], False: []}
    size = 0
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for on in (False, True):
                cfg = load_config(None, base + [f"run.checkpoint={'true' if on else 'false'}"])
                out = Path(tmp) / f"{rep}-{on}"
                run_inline(cfg, out)
                df = pd.read_csv(out / "metrics.csv")
                times[on] += list(df[df["metric"] == "round_s"]["value"])
                if on:
                    size = (out / "checkpoint.pt").stat().st_size
    off, on = statistics.mean(times[False]), statistics.mean(times[True])
    print(f"rounds/run={args.rounds} clients={args.clients} repeats={args.repeats} extra={args.sets}")
    print(f"round_s without checkpoints: {off:.4f} (median {statistics.median(times[False]):.4f})")
    print(f"round_s with checkpoints:    {on:.4f} (median {statistics.median(times[True]):.4f})")
    print(f"save_checkpoint per round:   {statistics.mean(saves):.4f} s, checkpoint.pt {size / 1024:.1f} KiB")
    print(f"overhead: {100 * (on - off) / off:+.1f}% of a round")


if __name__ == "__main__":
    main()
