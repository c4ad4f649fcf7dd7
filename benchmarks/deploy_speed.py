"""Seconds per deployed round: Flower's floor, fedkd before, fedkd after (issue 15, item 4).

    .venv/bin/python benchmarks/deploy_speed.py                 # 2 SuperNodes, 3 rounds (reduced), all phases
    .venv/bin/python benchmarks/deploy_speed.py --rounds 5 --skip before
    .venv/bin/python benchmarks/deploy_speed.py --quick         # 2 rounds, floor and after only

Every phase is a real deployment on 127.0.0.1 (one SuperLink, N SuperNodes, ``flwr run``), the way
``fedkd deploy local`` runs it:

- ``floor``: Flower's own cost of fedkd's exchange pattern. ``fedkd.deploy.floor``: FedAvg over every node, a
  train and an evaluate exchange per round, a ClientApp that does nothing, Flower's default settings.
- ``before``: fedkd as it was at ``--before-rev`` (default: main before this work), its own
  ``fedkd deploy local`` run from a copy of that revision's tree (``git archive``), on the default experiment
  with ``data.num_clients = N``.
- ``after``: this tree's ``fedkd deploy local``, same experiment, default settings.
- ``compute``: the round's compute, measured in this process: per node, evaluating the received model on its
  test split plus training it (the slowest node counts, nodes run in parallel), plus the server's evaluation.
  It is measured before the first phase and again after every phase (torch's threads slow down by large factors
  when other jobs load the cores, so one figure taken at the start can be far from the one a phase met); each
  phase is compared against the mean of the two measurements that bracket it.

Seconds per round are the mean of rounds 2..R (round 1 also installs the app and warms the SuperNodes); the
first round and the whole command are reported too. Ratios: ``before``/``after`` against ``floor`` and
against ``floor + compute``. Writes ``benchmarks/results/deploy_speed.csv``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
BEFORE_REV = "409d205"  # main before issue 15's deployment work
RESULTS = ROOT / "benchmarks" / "results" / "deploy_speed.csv"


def steady(round_s: list[float]) -> float:
    return statistics.mean(round_s[1:] if len(round_s) > 1 else round_s)


# --------------------------------------------------------------------------- phases
def run_floor(nodes: int, rounds: int, scratch: Path) -> dict:
    from fedkd.deploy import floor
    from fedkd.deploy.local import LocalDeployment

    out = scratch / "floor.json"
    t0 = time.perf_counter()
    with LocalDeployment(nodes, log_dir=scratch / "floor-logs", echo=lambda s: None) as dep:
        rc = dep.submit({"rounds": str(rounds), "nodes": str(nodes), "out": str(out)}, app=floor.stage(scratch / "floor-app"), staged=True, timeout=1800)
    wall = time.perf_counter() - t0
    if rc != 0 or not out.is_file():
        raise SystemExit(f"floor run failed (exit {rc}); logs in {scratch / 'floor-logs'}")
    round_s = json.loads(out.read_text())["round_s"]
    return {"round_s": round_s, "wall_s": wall}


def source_tree(rev: str, dest: Path) -> Path:
    """``rev``'s tree laid out as the installed package (strategies/ -> fedkd/strategies, ...), for PYTHONPATH."""
    src = dest / "src"
    src.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    pkg = dest / "pkg"
    mapping = tomllib.loads((src / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    shutil.copytree(src / mapping.get("fedkd", "fedkd"), pkg / "fedkd")
    for name, folder in mapping.items():
        if name != "fedkd":
            shutil.copytree(src / folder, pkg / name.replace(".", "/"))
    shutil.copy(src / "pyproject.toml", pkg / "pyproject.toml")
    shutil.copytree(src / "configs", pkg / "configs")
    return pkg


def run_fedkd(tree: Path | None, nodes: int, rounds: int, out: Path, extra: list[str]) -> dict:
    """``fedkd deploy local`` from ``tree`` (a copy of another revision) or from this checkout."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    root = tree or ROOT
    if tree is not None:
        env["PYTHONPATH"] = str(tree)  # ahead of the editable install, for this process and every child
    cmd = [sys.executable, "-m", "fedkd", "deploy", "local", str(root / "configs" / "default.toml"), "--nodes", str(nodes),
           "--set", f"run.rounds={rounds}", *extra, "--out", str(out)]  # fmt: skip
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
    if tree is not None:
        import fedkd

        assert str(tree) not in fedkd.__file__  # this process measured; the child ran the other tree
    df = pd.read_csv(out / "metrics.csv")
    rs = df[(df["node"] == "server") & (df["split"] == "time") & (df["metric"] == "round_s")].sort_values("round")
    summary = json.loads((out / "summary.json").read_text())
    return {"round_s": [float(v) for v in rs["value"]], "wall_s": wall, "accuracy": summary["accuracy"]}


def round_compute(nodes: int, rounds: int, reps: int = 3) -> float:
    """One round's compute on this machine: max over nodes of (evaluate + train), plus the server's evaluation."""
    import torch

    from fedkd.config import load_config
    from fedkd.data import load_federation
    from fedkd.models import model_from_config
    from fedkd.strategies import build_strategy
    from fedkd.training import evaluate, resolve_device, train

    cfg = load_config(ROOT / "configs" / "default.toml", [f"data.num_clients={nodes}", f"run.rounds={rounds}"])
    fed = load_federation(cfg.data, cfg.run.seed)
    spec = build_strategy(cfg, fed)
    state = spec.initial_arrays.to_torch_state_dict()
    device = resolve_device(cfg.run.device)
    t = cfg.train
    samples = []
    for _ in range(reps):
        per_node = []
        for pid in range(nodes):
            model = model_from_config(cfg.model, pid, fed.input_shape, fed.num_classes)
            model.load_state_dict(state)
            t0 = time.perf_counter()
            evaluate(model, fed.clients[pid].test, device)
            train(model, fed.clients[pid].train, epochs=t.local_epochs, batch_size=t.batch_size, lr=t.lr,
                  momentum=t.momentum, weight_decay=t.weight_decay, device=device, seed=pid)  # fmt: skip
            per_node.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        spec.evaluate_fn(1, spec.initial_arrays)
        samples.append(max(per_node) + time.perf_counter() - t0)
    del torch
    return statistics.median(samples)


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="rounds per deployed run (default 3: reduced)")
    p.add_argument("--before-rev", default=BEFORE_REV, help=f"git revision measured as 'before' (default {BEFORE_REV})")
    p.add_argument("--skip", action="append", default=[], choices=["floor", "before", "after"], help="leave a phase out")
    p.add_argument("--after-args", default="", help="extra arguments for the 'after' run, e.g. \"--set deploy.one_exchange=off\"")
    p.add_argument("--csv", default=str(RESULTS))
    p.add_argument("--quick", action="store_true", help="2 rounds, no 'before' run")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.skip = 2, sorted(set(args.skip) | {"before"})
    if args.rounds < 2:
        p.error("--rounds must be >= 2 (round 1 is reported apart)")

    rows = []
    computes = [round_compute(args.nodes, args.rounds)]
    print(f"compute: {computes[0]:.3f} s/round (max over {args.nodes} nodes of evaluate+train, plus the server's evaluation; load {os.getloadavg()[0]:.1f})", flush=True)
    bracket: dict[str, float] = {}

    def measured(name: str) -> None:  # compute again after each phase: the phase gets the mean of its two brackets
        computes.append(round_compute(args.nodes, args.rounds))
        bracket[name] = (computes[-2] + computes[-1]) / 2
        print(f"compute: {computes[-1]:.3f} s/round (load {os.getloadavg()[0]:.1f})", flush=True)
    with tempfile.TemporaryDirectory(prefix="fedkd-deploy-speed-") as tmp:
        scratch = Path(tmp)
        results: dict[str, dict] = {}
        if "floor" not in args.skip:
            results["floor"] = run_floor(args.nodes, args.rounds, scratch)
            print(f"floor:   {steady(results['floor']['round_s']):.2f} s/round  {results['floor']['round_s']}", flush=True)
            measured("floor")
        if "before" not in args.skip:
            tree = source_tree(args.before_rev, scratch / "before-tree")
            results["before"] = run_fedkd(tree, args.nodes, args.rounds, scratch / "before-run", [])
            print(f"before:  {steady(results['before']['round_s']):.2f} s/round  {results['before']['round_s']}", flush=True)
            measured("before")
        if "after" not in args.skip:
            import shlex

            results["after"] = run_fedkd(None, args.nodes, args.rounds, scratch / "after-run", shlex.split(args.after_args))
            print(f"after:   {steady(results['after']['round_s']):.2f} s/round  {results['after']['round_s']}", flush=True)
            measured("after")

    floor = steady(results["floor"]["round_s"]) if "floor" in results else None
    print()
    print(f"reduced: {args.nodes} SuperNodes on 127.0.0.1, {args.rounds} rounds; s/round = mean of rounds 2..{args.rounds}")
    print(f"{'phase':<8} {'s/round':>8} {'round 1':>8} {'command s':>9} {'compute':>8} {'x floor':>8} {'x (floor+compute)':>17} {'accuracy':>8}")
    print(f"{'compute':<8} {statistics.median(computes):>8.3f}   (median; measured {', '.join(f'{c:.3f}' for c in computes)})")
    for name, r in results.items():
        s = steady(r["round_s"])
        compute = bracket[name]  # the compute measured around this phase
        x_floor = s / floor if floor else float("nan")
        # the floor's phase ran at another time: floor + this phase's compute
        x_fc = s / (floor + compute) if floor else float("nan")
        acc = r.get("accuracy")
        acc_s = "-" if acc is None else f"{acc:.4f}"
        print(f"{name:<8} {s:>8.2f} {r['round_s'][0]:>8.2f} {r['wall_s']:>9.1f} {compute:>8.3f} {x_floor:>8.2f} {x_fc:>17.2f} {acc_s:>8}")
        rows.append({"phase": name, "nodes": args.nodes, "rounds": args.rounds, "s_per_round": s, "round1_s": r["round_s"][0],
                     "command_s": r["wall_s"], "compute_s": compute, "x_floor": x_floor, "x_floor_plus_compute": x_fc,
                     "accuracy": acc})  # fmt: skip
    if "before" in results and "after" in results:
        print(f"after / before: {steady(results['after']['round_s']) / steady(results['before']['round_s']):.3f}")
    Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
    with open(args.csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
