"""summary.json fields for any DP run: mechanism, epsilon, delta, privacy unit, guarantee, bits per coordinate.

Registered in ``fedkd.server.SUMMARY_HOOKS`` by ``fedkd.strategies.rqm``.
"""

from __future__ import annotations

import math

from fedkd import keys
from fedkd.privacy import gaussian, rqm


def _coords(recorder) -> int | None:
    """Coordinates per RQM update, as the clients reported them."""
    df = recorder.frame()
    v = df[(df["metric"] == keys.RQM_COORDS)]["value"]
    return int(v.max()) if len(v) else None


def privacy_summary(cfg, recorder) -> dict:
    p = cfg.privacy
    if p.mechanism == "none":
        return {}
    out: dict = {"privacy_mechanism": p.mechanism, "delta": p.delta}
    if p.mechanism == "rqm":
        from fedkd.strategies.rqm import IN_FORCE

        params = IN_FORCE.get(cfg.to_json()) or rqm.RQMParams(p.clip, p.extend, p.levels, p.keep_prob)
        out.update(
            privacy_unit="client",
            privacy_guarantee="local: Renyi DP of each client's quantized output (our reading of the paper's guarantee); "
            "it also bounds the sum seen under secure aggregation (post-processing), no aggregation amplification claimed",
            bits_per_coordinate=params.bits,
            wire_bits_per_coordinate=8 * rqm.index_dtype(params.levels).itemsize,
            rqm={"clip": params.clip, "extend": params.extend, "levels": params.levels, "keep_prob": params.keep_prob},
        )
        # epsilon: the clients' own accounting (max over clients), already in the base summary.
        # What secure aggregation would give instead (fedkd itself does not run it): exact for small n.
        from fedkd.strategies.dp_fedavg import sample_size

        coords = _coords(recorder)
        rounds = len(recorder.round_times)
        out["epsilon_secure_aggregate"] = (
            rqm.aggregate_epsilon(params, sample_size(cfg), coords, rounds, p.delta) if coords and rounds else None
        )
    elif p.mechanism == "pbm":
        from fedkd.strategies.rqm import IN_FORCE

        from fedkd.privacy import pbm

        params = IN_FORCE.get(cfg.to_json()) or pbm.PBMParams(p.clip, p.theta, p.trials)
        out.update(
            privacy_unit="client",
            privacy_guarantee="local: Renyi DP of each client's binomial counts (the PBM paper's secure-aggregate bound is not used)",
            bits_per_coordinate=params.bits,
            wire_bits_per_coordinate=8 * params.wire_dtype().itemsize,
            pbm={"clip": params.clip, "theta": params.theta, "trials": params.trials},
        )
    elif p.mechanism == "gaussian":
        from fedkd.strategies.dp_fedavg import noise_multiplier

        sigma = noise_multiplier(cfg)
        rounds = len(recorder.round_times)
        eps = gaussian.epsilon(sigma, rounds, p.delta) if rounds else 0.0
        out.update(
            epsilon=eps if math.isfinite(eps) else None,
            privacy_unit="client",
            privacy_guarantee="central: Gaussian noise added by a trusted server to the clipped mean (add/remove one client)",
            bits_per_coordinate=32,
            noise_multiplier=sigma,
            clipping_norm=p.max_grad_norm,
        )
    elif p.mechanism == "dp-sgd":
        out.update(
            privacy_unit="record",
            privacy_guarantee="local training: DP-SGD on each client (add/remove one record), max over clients",
            bits_per_coordinate=32,
        )
    return out
