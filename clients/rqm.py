"""Client half of the Randomized Quantization Mechanism (RQM, arXiv 2306.11913): a Flower client mod.

After the client logic has trained, the mod replaces the model in the reply by the update
(trained - received global model), clipped per coordinate to [-clip, clip] and randomly quantized
to level indices in the smallest unsigned integer dtype (uint8 for m <= 256). Only float arrays are
sent; the server keeps its own value of any other array (e.g. integer buffers). The reply also gets
this client's local (epsilon, delta) after the rounds it has taken part in so far.

Pass-through for every message unless the experiment says ``privacy.mechanism = "rqm"`` (or
``"pbm"``: the Poisson Binomial Mechanism baseline, same plumbing, binomial counts instead of
level indices). The server half is ``fedkd.strategies.rqm`` (``PRIVACY_WRAPPERS["rqm"/"pbm"]``).
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message

from fedkd import keys
from fedkd.privacy import pbm, rqm
from fedkd.privacy.entropy import torch_generator

from . import MODS
from .base import _config, client_env


QUANTIZERS = ("rqm", "pbm")


def codec(cfg, conf):
    """The mechanism in force (RQMParams or PBMParams): the experiment's, with the extend / theta the
    server calibrated when it sent one."""
    p = cfg.privacy
    conf = conf if conf is not None else {}
    if p.mechanism == "pbm":
        return pbm.PBMParams(p.clip, float(conf.get(keys.PBM_THETA, p.theta)), p.trials)
    return rqm.RQMParams(p.clip, float(conf.get(keys.RQM_EXTEND, p.extend)), p.levels, p.keep_prob)


def quantize_update(global_arrays: dict[str, np.ndarray], trained: ArrayRecord, params, seed: int | None = None) -> tuple[ArrayRecord, int]:
    """Symbols (level indices / counts) of (trained - global) per float array, and the number of coordinates.
    The draws come from OS entropy (``seed=None``); a seed only for tests and ``privacy.reproducible_noise``."""
    gen = torch_generator("cpu", seed)
    dtype = params.wire_dtype()
    out, coords = {}, 0
    for name, arr in trained.items():
        w = arr.numpy()
        if not np.issubdtype(w.dtype, np.floating):
            continue
        delta = torch.from_numpy(np.asarray(w, np.float64) - np.asarray(global_arrays[name], np.float64))
        z = params.encode(delta, gen).numpy().astype(dtype)  # same shape as the array
        out[name] = Array(z)
        coords += z.size
    return ArrayRecord(out), coords


def rqm_mod(msg: Message, context: Context, call_next) -> Message:
    if msg.metadata.message_type != "train" or not msg.has_content():
        return call_next(msg, context)
    conf = msg.content.config_records.get(keys.CONFIG)
    if conf is None or keys.EXPERIMENT not in conf:
        return call_next(msg, context)
    cfg = _config(str(conf[keys.EXPERIMENT]))
    if cfg.privacy.mechanism not in QUANTIZERS:
        return call_next(msg, context)

    params = codec(cfg, conf)
    global_arrays = {k: np.array(v.numpy(), copy=True) for k, v in msg.content[keys.ARRAYS].items()}
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    env = client_env(msg, context)
    record, coords = quantize_update(global_arrays, reply.content[keys.ARRAYS], params, env.noise_seed(0x52514D))
    reply.content[keys.ARRAYS] = record

    # Local accounting: this client's released updates so far (RDP adds up over rounds and coordinates).
    state = context.state.get(keys.STATE_RQM_ROUNDS)
    rounds = (int(state["rounds"]) if state is not None else 0) + 1
    context.state[keys.STATE_RQM_ROUNDS] = ConfigRecord({"rounds": rounds})
    metrics = reply.content[keys.METRICS]
    metrics[keys.EPSILON] = float(params.epsilon(coords, rounds, cfg.privacy.delta))
    metrics[keys.RQM_LEVELS] = int(params.symbols)
    metrics[keys.RQM_COORDS] = int(coords)
    return reply


MODS.append(rqm_mod)
