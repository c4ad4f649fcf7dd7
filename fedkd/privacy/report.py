"""summary.json fields for any DP run: what each epsilon protects, against whom, and what it leaves out.

Registered in ``fedkd.server.SUMMARY_HOOKS`` by ``fedkd.strategies.rqm``. Fields (DP runs only):

- ``epsilon``, ``delta``: the run's guarantee (null when there is none, e.g. ``privacy.reproducible_noise``).
- ``privacy_unit``: ``"record"`` (one training record of a client) or ``"client"`` (all of one client's
  updates over the run).
- ``privacy_relation``: the neighbouring relation the accountant assumes: ``"add/remove"``,
  ``"replace"`` (any two inputs of one client) or ``"zero-out"`` (one client's update replaced by zeros;
  the cohort size is fixed and public).
- ``privacy_trust_model``: ``"local"`` (noise added on the client: holds against the server) or
  ``"central"`` (a trusted server adds the noise: holds only against those who see its outputs).
- ``privacy_guarantee``: the same in one sentence.
- ``privacy_noise_source``: ``"os-entropy"`` or ``"run.seed (reproducible_noise: no guarantee)"``.
- ``privacy_outside_guarantee``: ``"split:metric"`` names that clients sent in the clear and that the
  epsilon does not cover (exact example counts, losses, accuracies, ...).
- ``privacy_figures``: one entry per epsilon the run reports (name, epsilon, delta, unit, relation,
  trust_model, hypothetical); a hypothetical figure (``epsilon_hypothetical_secure_aggregation``,
  RQM: what secure aggregation, which fedkd does not run, would give) is never the run's ``epsilon``.
"""

from __future__ import annotations

import math

from fedkd import keys
from fedkd.privacy import gaussian, rqm

# Client metrics that depend on no record: the mechanism's public parameters and bookkeeping.
DATA_INDEPENDENT = {keys.RQM_LEVELS, keys.RQM_COORDS, "resumed", "alignment_size", "shared_layers"}

LOCAL = "local"
CENTRAL = "central"


def _coords(recorder) -> int | None:
    """Coordinates per RQM update, as the clients reported them."""
    df = recorder.frame()
    v = df[(df["metric"] == keys.RQM_COORDS)]["value"]
    return int(v.max()) if len(v) else None


def outside_guarantee(cfg, recorder) -> list[str]:
    """``split:metric`` of every client-sent metric that the run's epsilon does not cover."""
    covered = set(DATA_INDEPENDENT)
    if cfg.privacy.mechanism in ("rqm", "pbm", "gaussian"):
        covered.add(keys.EPSILON)  # a function of the rounds taken part in and public parameters only
    names = {(r["split"], r["metric"]) for r in recorder.rows if r["node"] != "server"}
    return sorted(f"{split}:{metric}" for split, metric in names if metric not in covered)


def _figure(name, epsilon, delta, unit, relation, trust, hypothetical=False) -> dict:
    return {"name": name, "epsilon": epsilon, "delta": delta, "unit": unit, "relation": relation,
            "trust_model": trust, "hypothetical": hypothetical}


def privacy_summary(cfg, recorder) -> dict:
    p = cfg.privacy
    if p.mechanism == "none":  # no guarantee; say only where the clients' shuffles and dropout masks came from
        return {"privacy_noise_source": "run.seed (reproducible_noise)" if p.reproducible_noise else "os-entropy"}
    out: dict = {"privacy_mechanism": p.mechanism, "delta": p.delta}
    unit = relation = trust = None
    eps = None
    hypothetical: list[dict] = []
    if p.mechanism == "rqm":
        from fedkd.strategies.dp_fedavg import sample_size
        from fedkd.strategies.rqm import IN_FORCE

        params = IN_FORCE.get(cfg.to_json()) or rqm.RQMParams(p.clip, p.extend, p.levels, p.keep_prob)
        unit, relation, trust = "client", "replace", LOCAL
        out.update(
            privacy_guarantee="local: Renyi DP of each client's quantized updates (any two updates in [-clip, clip]^d are "
            "neighbours), composed over its rounds; holds against the server (our reading of the paper's guarantee)",
            bits_per_coordinate=params.bits,
            wire_bits_per_coordinate=8 * rqm.index_dtype(params.levels).itemsize,
            rqm={"clip": params.clip, "extend": params.extend, "levels": params.levels, "keep_prob": params.keep_prob},
        )
        eps = out_eps(recorder)
        # What secure aggregation would give instead. fedkd does NOT run secure aggregation: hypothetical.
        coords = _coords(recorder)
        rounds = len(recorder.round_times)
        hyp = rqm.aggregate_epsilon(params, sample_size(cfg), coords, rounds, p.delta) if coords and rounds else None
        out["epsilon_hypothetical_secure_aggregation"] = hyp
        hypothetical.append(_figure("epsilon_hypothetical_secure_aggregation", hyp, p.delta, "client", "replace",
                                    "hypothetical: secure aggregation (not run by fedkd) would show the server only the sum", True))
    elif p.mechanism == "pbm":
        from fedkd.privacy import pbm
        from fedkd.strategies.rqm import IN_FORCE

        params = IN_FORCE.get(cfg.to_json()) or pbm.PBMParams(p.clip, p.theta, p.trials)
        unit, relation, trust = "client", "replace", LOCAL
        out.update(
            privacy_guarantee="local: Renyi DP of each client's binomial counts (any two updates in [-clip, clip]^d are "
            "neighbours), composed over its rounds; holds against the server (the PBM paper's secure-aggregate bound is not used)",
            bits_per_coordinate=params.bits,
            wire_bits_per_coordinate=8 * params.wire_dtype().itemsize,
            pbm={"clip": params.clip, "theta": params.theta, "trials": params.trials},
        )
        eps = out_eps(recorder)
    elif p.mechanism == "gaussian":
        from fedkd.strategies.dp_fedavg import REFUSED_ROUNDS, noise_multiplier, sample_size

        sigma = noise_multiplier(cfg)
        rounds = len(recorder.round_times)
        e = gaussian.epsilon(sigma, rounds, p.delta) if rounds else 0.0
        eps = e if math.isfinite(e) else None
        unit, relation, trust = "client", "zero-out", CENTRAL
        out.update(
            privacy_guarantee=f"central: a trusted server clips each update to L2 {p.max_grad_norm} and adds Gaussian noise to the "
            f"mean of a fixed, public cohort of {sample_size(cfg)} clients per round (zero-out: one client's update replaced by "
            "zeros); holds against those who see the global models, NOT against the server",
            bits_per_coordinate=32,
            noise_multiplier=sigma,
            clipping_norm=p.max_grad_norm,
            cohort_size=sample_size(cfg),
            rounds_refused=list(REFUSED_ROUNDS.get(cfg.to_json(), [])),
        )
    elif p.mechanism == "dp-sgd":
        unit, relation, trust = "record", "add/remove", LOCAL
        out.update(
            privacy_guarantee="local: DP-SGD (Opacus, Poisson sampling, RDP) on each client for every training on its private "
            "records, add/remove one record, max over clients; covers the model and what is computed from it on public data; "
            "holds against the server",
            bits_per_coordinate=32,
        )
        eps = out_eps(recorder)
    elif p.mechanism == "subject-dp":
        from fedkd.privacy import subject_dp_mechanism

        fields = subject_dp_mechanism.summary(cfg, recorder)
        unit, relation, trust = "subject", "add/remove", LOCAL
        eps = fields.pop("epsilon", None)
        out.update(fields)
    out.update(privacy_unit=unit, privacy_relation=relation, privacy_trust_model=trust)
    if p.reproducible_noise:
        eps = None
        out["privacy_guarantee"] = ("NONE: privacy.reproducible_noise = true draws the noise from run.seed, which the server knows "
                                    "(debugging only). Would-be guarantee: " + out.get("privacy_guarantee", ""))
        for h in hypothetical:
            h["epsilon"] = None
        if "epsilon_hypothetical_secure_aggregation" in out:
            out["epsilon_hypothetical_secure_aggregation"] = None
        out["privacy_noise_source"] = "run.seed (reproducible_noise: no guarantee)"
    else:
        out["privacy_noise_source"] = "os-entropy"
    out["epsilon"] = eps
    out["privacy_outside_guarantee"] = outside_guarantee(cfg, recorder)
    out["privacy_figures"] = [_figure("epsilon", eps, p.delta, unit, relation, trust)] + hypothetical
    return out


def out_eps(recorder) -> float | None:
    """The clients' own accounting: the largest epsilon any client reported (local mechanisms)."""
    vals = [r["value"] for r in recorder.rows if r["metric"] == keys.EPSILON and r["node"] != "server"]
    return float(max(vals)) if vals else None


def wire_summary(cfg, recorder) -> dict:
    """bytes_up_arrays: the arrays-only part of bytes_up (bytes_up counts every record a client sends)."""
    return {"bytes_up_arrays": int(getattr(recorder, "bytes_up_arrays", 0))}
