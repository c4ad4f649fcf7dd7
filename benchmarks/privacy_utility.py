"""Accuracy against epsilon: RQM, central Gaussian DP-FedAvg and DP-SGD on the same federation.

Every private run is calibrated by its own accountant to the same (epsilon, delta):
- ``rqm``: the smallest extend (Delta) whose local per-client epsilon after all rounds is the target
  (``fedkd.privacy.rqm.calibrate_extend``), levels/keep_prob/clip fixed;
- ``pbm``: the Poisson Binomial Mechanism at the same bits per coordinate, the largest theta whose
  local epsilon is the target (``fedkd.privacy.pbm.calibrate_theta``);
- ``gaussian``: the noise multiplier of DP-FedAvg (``fedkd.privacy.gaussian.calibrate_noise``);
- ``dp-sgd``: Opacus' noise multiplier for each client's local DP-SGD over all rounds.
The privacy units differ (see the README): RQM and DP-FedAvg protect a client's whole update
(RQM and PBM without trusting the server, DP-FedAvg with a trusted server), DP-SGD one training record.
Each row carries the run's unit, neighbouring relation and trust model from summary.json; bytes up
count every record a client sends (arrays and metrics). All noise comes from OS entropy, so a rerun
gives a different draw (one run per row: single draws).

    python benchmarks/privacy_utility.py --quick            # digits (see below for the time it takes)
    python benchmarks/privacy_utility.py --mnist            # MNIST from ../shared/data/mnist when present

Writes ``<out>/privacy_utility_<dataset>.csv`` (after every run), ``<out>/privacy_utility_<dataset>.png``
and prints a Markdown table. ``--quick`` runs the defaults (digits, 10 clients, 10 rounds, 2 local epochs,
a 64-16-10 MLP, 5 epsilons x 4 mechanisms + a non-private run = 21 runs; on our shared 2-core machine a
run took 45-70 s, DP-SGD 100-650 s, under a load average near 18).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

ROOT = Path(__file__).resolve().parents[1]
MNIST_DIR = ROOT.parent / "shared" / "data" / "mnist"


def base_overrides(args) -> list[str]:
    o = [
        f"data.num_clients={args.clients}", f"run.rounds={args.rounds}", f"train.local_epochs={args.epochs}",
        "data.partitioner=iid", "model.name=mlp", f"model.hidden=[{args.hidden}]", "train.lr=0.05", "train.momentum=0.9",
        "strategy.fraction_evaluate=0.0", "run.device=cpu", f"run.seed={args.seed}",
    ]
    if args.mnist:
        o += ["data.dataset=mnist", f"data.data_dir={MNIST_DIR}", f"data.max_samples={args.max_samples}"]
    return o


def mechanism_overrides(mech: str, eps: float | None, args) -> list[str]:
    if mech == "none":
        return []
    if mech == "rqm":
        return ["privacy.mechanism=rqm", f"privacy.target_epsilon={eps}", f"privacy.clip={args.clip}",
                f"privacy.levels={args.levels}", f"privacy.keep_prob={args.keep_prob}", f"privacy.delta={args.delta}"]
    if mech == "pbm":
        return ["privacy.mechanism=pbm", f"privacy.target_epsilon={eps}", f"privacy.clip={args.clip}",
                f"privacy.trials={args.trials}", f"privacy.delta={args.delta}"]
    if mech == "gaussian":
        return ["privacy.mechanism=gaussian", f"privacy.target_epsilon={eps}", f"privacy.max_grad_norm={args.update_norm}",
                f"privacy.delta={args.delta}"]
    if mech == "dp-sgd":
        return ["privacy.mechanism=dp-sgd", f"privacy.target_epsilon={eps}", "privacy.max_grad_norm=1.0", f"privacy.delta={args.delta}"]
    raise ValueError(mech)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the defaults: digits, 10 clients, 10 rounds, 5 epsilons")
    ap.add_argument("--mnist", action="store_true", help="MNIST test split from ../shared/data/mnist (10k images)")
    ap.add_argument("--eps", type=float, nargs="+", default=[1.0, 8.0, 64.0, 512.0, 4096.0])
    ap.add_argument("--mechanisms", nargs="+", default=["rqm", "pbm", "gaussian", "dp-sgd"])
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=16, help="hidden units of the MLP (fewer coordinates = less composition)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--clip", type=float, default=0.05, help="RQM per-coordinate clip")
    ap.add_argument("--levels", type=int, default=16)
    ap.add_argument("--keep-prob", type=float, default=0.95, help="RQM keep probability (0.95: least variance at a fixed epsilon in our sweep)")
    ap.add_argument("--trials", type=int, default=15, help="PBM binomial trials (15 = 4 bits, like RQM's 16 levels)")
    ap.add_argument("--update-norm", type=float, default=1.0, help="DP-FedAvg L2 clipping norm of an update")
    ap.add_argument("--max-samples", type=int, default=10000)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    if args.mnist and not MNIST_DIR.is_dir():
        print(f"no MNIST at {MNIST_DIR}", file=sys.stderr)
        return 2

    from fedkd.config import load_config
    from fedkd.experiment import run_experiment

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dataset = "mnist" if args.mnist else "digits"
    import ray

    # one local Ray for every run (each run still starts its own client actors)
    ray.init(include_dashboard=False, logging_level="ERROR", num_cpus=os.cpu_count() or 1)
    rows = []
    plan = [("none", None)] + [(m, e) for m in args.mechanisms for e in args.eps]
    for mech, eps in plan:
        cfg = load_config(None, base_overrides(args) + mechanism_overrides(mech, eps, args))
        t0 = time.perf_counter()
        s = run_experiment(cfg, write=False, progress=False, echo=lambda *_: None)
        rounds = max(s["rounds_completed"], 1)
        row = {
            "dataset": dataset, "mechanism": mech, "target_epsilon": eps, "epsilon": s.get("epsilon"),
            "delta": s.get("delta"), "privacy_unit": s.get("privacy_unit"), "relation": s.get("privacy_relation"),
            "trust_model": s.get("privacy_trust_model"), "noise_source": s.get("privacy_noise_source"), "accuracy": s["accuracy"],
            "bits_per_coordinate": s.get("bits_per_coordinate", 32),
            "bytes_up_per_round": s["bytes_up"] / rounds,  # every record a client sends (arrays + metrics)
            "bytes_up_arrays_per_round": s.get("bytes_up_arrays", s["bytes_up"]) / rounds,
            "extend": (s.get("rqm") or {}).get("extend"), "theta": (s.get("pbm") or {}).get("theta"),
            "noise_multiplier": s.get("noise_multiplier"),
            "wall_s": round(time.perf_counter() - t0, 1),
        }
        rows.append(row)
        write_csv(rows, out / f"privacy_utility_{dataset}.csv")  # after every run: a long sweep keeps what finished
        print(f"{mech:9s} eps={eps!s:6s} -> acc {row['accuracy']:.4f}  eps_reported {row['epsilon']}  up/round {row['bytes_up_per_round']:.0f} B  ({row['wall_s']} s)", flush=True)

    ray.shutdown()
    stem = f"privacy_utility_{dataset}"
    plot(rows, out / f"{stem}.png", dataset)
    print(table(rows))
    print(f"\nwrote {out / f'{stem}.csv'} and {out / f'{stem}.png'}")
    return 0


def write_csv(rows, path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def plot(rows, path, dataset) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for mech in sorted({r["mechanism"] for r in rows} - {"none"}):
        pts = sorted((r["target_epsilon"], r["accuracy"]) for r in rows if r["mechanism"] == mech)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=mech)
    for r in rows:
        if r["mechanism"] == "none":
            ax.axhline(r["accuracy"], color="grey", ls="--", label="no privacy")
    ax.set_xscale("log")
    ax.set_xlabel("epsilon (delta = %g)" % rows[-1]["delta"] if rows[-1]["delta"] else "epsilon")
    ax.set_ylabel("server test accuracy")
    ax.set_title(f"privacy vs accuracy, FedAvg on {dataset}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(rows) -> str:
    lines = ["| mechanism | unit | relation | trust model | target eps | reported eps | accuracy | bits/coord | bytes up/round | setting |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        setting = (f"extend={r['extend']:.3g}" if r["extend"] else f"theta={r['theta']:.3g}" if r["theta"]
                   else f"sigma={r['noise_multiplier']:.3g}" if r["noise_multiplier"] else "")
        eps = "-" if r["epsilon"] is None else f"{r['epsilon']:.3g}"
        tgt = "-" if r["target_epsilon"] is None else f"{r['target_epsilon']:g}"
        lines.append(f"| {r['mechanism']} | {r['privacy_unit'] or '-'} | {r.get('relation') or '-'} | {r.get('trust_model') or '-'} | {tgt} | {eps} | {r['accuracy']:.4f} | {r['bits_per_coordinate']} | {r['bytes_up_per_round']:.0f} | {setting} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
