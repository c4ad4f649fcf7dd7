"""``fedkd privacy``: privacy accounting from the command line, printed as JSON.

    fedkd privacy rqm --clip C --extend E --levels M --keep-prob Q [--alpha A ...]
                      [--coords D --rounds R [--delta d]] [--target-epsilon T]
    fedkd privacy pbm --clip C --theta T --trials M [--alpha A ...] [--coords D --rounds R [--delta d]]
    fedkd privacy gaussian (--noise-multiplier S | --target-epsilon T) --rounds R [--delta d]

``rqm`` prints the exact per-coordinate RDP at each alpha (``"rdp": {"<alpha>": value}``) and the
input pair attaining it; with ``--coords``/``--rounds`` the (epsilon, delta) of one client after R
rounds of a D-coordinate update; with ``--target-epsilon`` (instead of ``--extend``) the smallest
extend that reaches it.
"""

from __future__ import annotations

import argparse
import json

from fedkd.cli import command
from fedkd.config import ConfigError

REPORT_ALPHAS = (2.0, 4.0, 8.0, 16.0, 32.0, 64.0)


def _args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="mechanism", required=True)
    r = sub.add_parser("rqm", help="Randomized Quantization Mechanism: exact RDP and epsilon")
    r.add_argument("--clip", type=float, required=True, help="per-coordinate clip c")
    r.add_argument("--extend", type=float, help="the paper's Delta > 0 (X = c + Delta)")
    r.add_argument("--levels", type=int, required=True, help="number of levels m >= 2")
    r.add_argument("--keep-prob", type=float, required=True, help="keep probability q of interior levels, in (0, 1]")
    r.add_argument("--alpha", type=float, action="append", help="Renyi order > 1 (repeatable; default 2 4 8 16 32 64)")
    _composition_args(r)
    r.add_argument("--target-epsilon", type=float, help="calibrate --extend to this epsilon (needs --coords and --rounds)")
    r.add_argument("--clients", type=int, help="also the exact RDP of the sum of this many clients (secure aggregation)")
    b = sub.add_parser("pbm", help="Poisson Binomial Mechanism (local): exact RDP and epsilon")
    b.add_argument("--clip", type=float, required=True)
    b.add_argument("--theta", type=float, help="in (0, 0.25]")
    b.add_argument("--trials", type=int, required=True, help="binomial trials m >= 1")
    b.add_argument("--alpha", type=float, action="append")
    _composition_args(b)
    b.add_argument("--target-epsilon", type=float, help="calibrate --theta to this epsilon (needs --coords and --rounds)")
    g = sub.add_parser("gaussian", help="central Gaussian DP-FedAvg: epsilon or calibrated noise multiplier")
    g.add_argument("--noise-multiplier", type=float)
    g.add_argument("--target-epsilon", type=float)
    g.add_argument("--rounds", type=int, required=True)
    g.add_argument("--delta", type=float, default=1e-5)


def _composition_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--coords", type=int, help="coordinates per update (d)")
    p.add_argument("--rounds", type=int, help="rounds the client takes part in")
    p.add_argument("--delta", type=float, default=1e-5, help="delta of (epsilon, delta) (default 1e-5)")


def _check_composition(args) -> bool:
    if (args.coords is None) != (args.rounds is None):
        raise ConfigError("--coords", "--coords and --rounds go together")
    if args.coords is None:
        return False
    if args.coords < 1:
        raise ConfigError("--coords", f"must be >= 1 (got {args.coords})")
    if args.rounds < 1:
        raise ConfigError("--rounds", f"must be >= 1 (got {args.rounds})")
    if not 0 < args.delta < 1:
        raise ConfigError("--delta", f"must be in (0, 1) (got {args.delta})")
    return True


@command("privacy", "privacy accounting (RQM, Gaussian DP-FedAvg), printed as JSON", _args)
def cmd_privacy(args: argparse.Namespace) -> int:
    out = {"rqm": _rqm, "pbm": _pbm, "gaussian": _gaussian}[args.mechanism](args)
    print(json.dumps(out, indent=2))
    return 0


def _parameter(args, composed: bool, name: str, given, check, calibrate):
    """The mechanism's noise parameter: ``--<name>`` as given, or calibrated to ``--target-epsilon``."""
    if args.target_epsilon is None:
        if given is None:
            raise ConfigError(f"--{name}", "required (or --target-epsilon with --coords and --rounds)")
        return given
    if not composed:
        raise ConfigError("--target-epsilon", "needs --coords and --rounds")
    if args.target_epsilon <= 0:
        raise ConfigError("--target-epsilon", f"must be > 0 (got {args.target_epsilon})")
    check()  # the other parameters, before the (costly) calibration
    return calibrate()


def _rqm(args) -> dict:
    from fedkd.privacy import rqm

    composed = _check_composition(args)
    extend = _parameter(
        args, composed, "extend", args.extend,
        check=lambda: rqm.check_params(args.clip, 1.0, args.levels, args.keep_prob, prefix="--"),
        calibrate=lambda: rqm.calibrate_extend(args.target_epsilon, args.clip, args.levels, args.keep_prob, args.coords, args.rounds, args.delta),
    )
    rqm.check_params(args.clip, extend, args.levels, args.keep_prob, prefix="--")
    p = rqm.RQMParams(args.clip, extend, args.levels, args.keep_prob)
    alphas = tuple(args.alpha) if args.alpha else REPORT_ALPHAS
    for a in alphas:
        if not a > 1:
            raise ConfigError("--alpha", f"must be > 1 (got {a})")
    values, pairs = {}, {}
    for a in alphas:
        v, pair = rqm.worst_case_rdp(p, a)
        values[f"{a:g}"] = v
        pairs[f"{a:g}"] = list(pair)
    out = {
        "mechanism": "rqm",
        "clip": p.clip, "extend": p.extend, "levels": p.levels, "keep_prob": p.keep_prob,
        "bits_per_coordinate": p.bits,
        "rdp": values,
        "worst_pair": pairs,
        "guarantee": "local (per-client output; also bounds the secure-aggregate sum)", "hypothetical_note": "*_hypothetical_secure_aggregation: what secure aggregation (not run by fedkd) would give",
    }
    if composed:
        grid = tuple(sorted(set(rqm.DEFAULT_ALPHAS) | set(alphas)))
        eps, best = rqm.eps_from_rdp(grid, rqm.compose(rqm.rdp(p, grid), args.coords, args.rounds), args.delta)
        out.update(coords=args.coords, rounds=args.rounds, delta=args.delta, epsilon=eps, best_alpha=best)
    if args.clients is not None:
        if args.clients < 1:
            raise ConfigError("--clients", f"must be >= 1 (got {args.clients})")
        agg = rqm.aggregate_rdp(p, alphas, args.clients)
        if agg is None:
            raise ConfigError("--clients", f"too many clients for the exact sum accountant (got {args.clients})")
        out["rdp_hypothetical_secure_aggregation"] = {f"{a:g}": float(v) for a, v in zip(alphas, agg)}
        if composed:
            out["epsilon_hypothetical_secure_aggregation"] = rqm.aggregate_epsilon(p, args.clients, args.coords, args.rounds, args.delta)
    return out


def _pbm(args) -> dict:
    from fedkd.privacy import pbm, rqm

    composed = _check_composition(args)
    theta = _parameter(
        args, composed, "theta", args.theta,
        check=lambda: pbm.check_params(args.clip, 0.25, args.trials, prefix="--"),
        calibrate=lambda: pbm.calibrate_theta(args.target_epsilon, args.clip, args.trials, args.coords, args.rounds, args.delta),
    )
    pbm.check_params(args.clip, theta, args.trials, prefix="--")
    p = pbm.PBMParams(args.clip, theta, args.trials)
    alphas = tuple(args.alpha) if args.alpha else REPORT_ALPHAS
    for a in alphas:
        if not a > 1:
            raise ConfigError("--alpha", f"must be > 1 (got {a})")
    out = {
        "mechanism": "pbm", "clip": p.clip, "theta": p.theta, "trials": p.trials, "bits_per_coordinate": p.bits,
        "rdp": {f"{a:g}": float(v) for a, v in zip(alphas, p.rdp(alphas))},
        "guarantee": "local (per-client counts)",
    }
    if composed:
        grid = tuple(sorted(set(rqm.DEFAULT_ALPHAS) | set(alphas)))
        eps, best = rqm.eps_from_rdp(grid, rqm.compose(p.rdp(grid), args.coords, args.rounds), args.delta)
        out.update(coords=args.coords, rounds=args.rounds, delta=args.delta, epsilon=eps, best_alpha=best)
    return out


def _gaussian(args) -> dict:
    from fedkd.privacy import gaussian

    if (args.noise_multiplier is None) == (args.target_epsilon is None):
        raise ConfigError("--noise-multiplier", "give exactly one of --noise-multiplier and --target-epsilon")
    if args.rounds < 1:
        raise ConfigError("--rounds", f"must be >= 1 (got {args.rounds})")
    if not 0 < args.delta < 1:
        raise ConfigError("--delta", f"must be in (0, 1) (got {args.delta})")
    if args.target_epsilon is not None and args.target_epsilon <= 0:
        raise ConfigError("--target-epsilon", f"must be > 0 (got {args.target_epsilon})")
    if args.noise_multiplier is not None and args.noise_multiplier <= 0:
        raise ConfigError("--noise-multiplier", f"must be > 0 (got {args.noise_multiplier})")
    sigma = args.noise_multiplier if args.noise_multiplier is not None else gaussian.calibrate_noise(args.target_epsilon, args.rounds, args.delta)
    return {
        "mechanism": "gaussian", "noise_multiplier": sigma, "rounds": args.rounds, "delta": args.delta,
        "epsilon": gaussian.epsilon(sigma, args.rounds, args.delta),
        "guarantee": "central, client-level (add/remove one client), no subsampling amplification",
    }
