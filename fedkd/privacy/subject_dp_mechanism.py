"""Subject-level DP as a fedkd privacy mechanism: ``privacy.mechanism = "subject-dp"``.

The pieces (the math is in :mod:`fedkd.privacy.subject_dp`):

- the ``[subject_dp]`` config section: ``subjects_per_step`` (expected subjects Poisson-sampled per local
  step, default 4); ``privacy.max_grad_norm`` is the per-subject clip C, ``privacy.noise_multiplier``
  or ``privacy.target_epsilon`` (exactly one) the noise, ``privacy.delta`` the delta;
- the client logic ``"subject-dp"`` (:class:`SubjectDPClient`, registered in ``fedkd.clients.CLIENTS`` from
  here: it replaces the ``weights`` client of FedAvg/FedProx, whose files belong to the training loop). Each
  local step samples the silo's subjects with probability q = subjects_per_step / S, averages each sampled
  subject's per-example gradients (``torch.func``), clips every subject to C, adds N(0, sigma^2 C^2) and
  divides by q S; SGD (momentum, weight decay, FedProx's proximal term: data-independent, added after the
  noise) takes the step. One local epoch is ceil(S / subjects_per_step) steps. Sampling and noise come from
  OS entropy (:func:`fedkd.privacy.subject_dp.private_generator`), never from ``run.seed``;
- the server wrapper (``PRIVACY_WRAPPERS["subject-dp"]``): points the strategy at that client, and with a
  target epsilon calibrates one sigma for all silos (sent in the train config);
- the summary hook: epsilon of the federation from the accountant (RDP composed over local steps, the
  rounds and every silo that holds the subject, max over subjects; the holders are read off the partitions,
  which the simulation's server loads anyway), unit "subject", the neighbouring relation, the trust model.

Refused before anything starts (one line, exit 2): a strategy other than FedAvg/FedProx, a dataset
without subject ids, and not exactly one of noise_multiplier / target_epsilon.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message
from torch.nn import functional as F

from fedkd import keys
from fedkd.clients import CLIENTS
from fedkd.clients.base import ClientEnv, reply
from fedkd.clients.weights import WeightsClient
from fedkd.config import ConfigError, register_section
from fedkd.strategies import PRIVACY_WRAPPERS

from . import canaries  # noqa: F401  (the [audit] section and the canary ENV hook, in every process)
from . import subject_dp as sdp

MECHANISM = "subject-dp"
SUBJECT_DATASETS = ("synthetic-subjects", "femnist")
SUPPORTED_CLIENTS = ("weights",)  # FedAvg, FedProx
SIGMA_KEY = "fedkd.subject-dp.sigma"  # ConfigRecord key: the calibrated noise multiplier (target_epsilon runs)


@dataclass(frozen=True)
class SubjectDPConfig:
    subjects_per_step: float = 4.0

    def validate(self, cfg) -> None:
        if not self.subjects_per_step > 0:
            raise ConfigError("subject_dp.subjects_per_step", f"must be > 0 (got {self.subjects_per_step})")
        if cfg.privacy.mechanism != MECHANISM:
            return
        p = cfg.privacy
        if (p.noise_multiplier is None) == (p.target_epsilon is None):
            raise ConfigError("privacy.noise_multiplier", "subject-dp needs exactly one of privacy.noise_multiplier and privacy.target_epsilon")
        if cfg.data.dataset not in SUBJECT_DATASETS:
            raise ConfigError("privacy.mechanism", f"subject-dp needs records with subject ids ({', '.join(SUBJECT_DATASETS)}; got {cfg.data.dataset!r})")
        if cfg.strategy.name not in ("fedavg", "fedprox"):
            raise ConfigError("privacy.mechanism", f"subject-dp runs with fedavg or fedprox (got strategy {cfg.strategy.name!r})")


register_section("subject_dp")(SubjectDPConfig)


# ---------------------------------------------------------------- schedules and accounting
def silo_subjects(fed) -> list[np.ndarray]:
    """The subject ids in each silo's training split."""
    out = []
    for c in fed.clients:
        if c.train.subject is None:
            raise ConfigError("privacy.mechanism", f"subject-dp: client {c.partition_id}'s records carry no subject ids")
        out.append(np.unique(c.train.subject))
    return out


def steps_per_epoch(subjects: int, subjects_per_step: float) -> int:
    return max(1, math.ceil(subjects / subjects_per_step))


def schedules(cfg, fed, sigma: float) -> list[sdp.SiloSchedule]:
    sps = cfg.subject_dp.subjects_per_step
    return [
        sdp.SiloSchedule(sdp.subject_sample_rate(sps, len(s)), sigma, cfg.train.local_epochs * steps_per_epoch(len(s), sps))
        for s in silo_subjects(fed)
    ]


def holders(fed) -> list[list[int]]:
    """For every subject (sorted ids), the silos whose training split holds some of its records."""
    per = silo_subjects(fed)
    ids = np.unique(np.concatenate(per)) if per else np.zeros(0, int)
    return [[c for c, s in enumerate(per) if sid in set(s.tolist())] for sid in ids]


def noise_multiplier(cfg, fed) -> float:
    """sigma: the configured one, or the smallest whose federation epsilon after ``run.rounds`` is <= the target."""
    p = cfg.privacy
    if p.noise_multiplier is not None:
        return float(p.noise_multiplier)
    key = (cfg.to_json(), id(fed))
    if key not in _SIGMAS:
        _SIGMAS[key] = _calibrate(cfg, fed)
    return _SIGMAS[key]


_SIGMAS: dict = {}


def _calibrate(cfg, fed) -> float:
    import warnings

    p = cfg.privacy
    warnings.filterwarnings("ignore", message="Optimal order is the (smallest|largest) alpha")  # the search visits extreme sigmas
    hold = holders(fed)
    eps = lambda s: sdp.federation_epsilon(schedules(cfg, fed, s), cfg.run.rounds, p.delta, hold)[0]  # noqa: E731
    lo, hi = 1e-2, 1.0
    while eps(hi) > p.target_epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e5:
            raise ConfigError("privacy.target_epsilon", f"{p.target_epsilon} is out of reach")
    while hi / lo > 1.001:
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if eps(mid) > p.target_epsilon else (lo, mid)
    return hi


def federation_for(cfg):
    """The federation the mechanism accounts for: the partitions plus any audit canaries."""
    from fedkd.data import load_federation
    from fedkd.privacy.canaries import with_canaries

    return with_canaries(load_federation(cfg.data, cfg.run.seed), cfg)


def summary(cfg, recorder) -> dict:
    if cfg.privacy.mechanism != MECHANISM:
        return {}
    fed = federation_for(cfg)
    sigma = noise_multiplier(cfg, fed)
    rounds = len(recorder.round_times)
    out = sdp.summary_fields(schedules(cfg, fed, sigma), rounds, cfg.privacy.delta, cfg.privacy.max_grad_norm, holders(fed))
    out["subjects_per_step"] = cfg.subject_dp.subjects_per_step
    out["bits_per_coordinate"] = 32
    if rounds == 0:
        out["epsilon"] = 0.0
    return out


# fedkd.privacy.report.privacy_summary reads summary() (one place writes every mechanism's privacy fields).


def wrap(spec, cfg, fed):
    if spec.client not in SUPPORTED_CLIENTS:
        raise ConfigError("privacy.mechanism", f"subject-dp replaces the 'weights' client; strategy {cfg.strategy.name!r} uses {spec.client!r}")
    spec.client = MECHANISM
    if cfg.privacy.target_epsilon is not None:
        spec.extra_config = {**(spec.extra_config or {}), SIGMA_KEY: noise_multiplier(cfg, federation_for(cfg))}
    return spec


PRIVACY_WRAPPERS[MECHANISM] = wrap


# ---------------------------------------------------------------- the client
def _per_example_grads(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """Per-example gradients of the cross-entropy, one (B, *shape) tensor per trainable parameter."""
    from torch.func import functional_call, grad, vmap

    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n: b.detach() for n, b in model.named_buffers()}

    def loss(p, xi, yi):
        out = functional_call(model, (p, buffers), (xi[None],))
        return F.cross_entropy(out, yi[None])

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return [g[n] for n in names]


NOISE_SCALE = 1.0  # tests only: a deliberately broken mechanism scales its noise (the accountant does not know)


def train_subject_dp(model, data, *, epochs: int, lr: float, momentum: float, weight_decay: float, clip: float, sigma: float,
                     subjects_per_step: float, device, proximal_mu: float = 0.0, generator: torch.Generator | None = None) -> dict:
    """Subject-level DP-SGD on one silo's records (``data.subject`` gives each record's subject)."""
    device = torch.device(device)
    model.to(device).train()
    gen = generator or sdp.private_generator("cpu")
    x, y = torch.from_numpy(data.x).to(device), torch.from_numpy(data.y).to(device)
    subj = torch.from_numpy(np.asarray(data.subject, np.int64))
    subjects = torch.unique(subj)
    q = sdp.subject_sample_rate(subjects_per_step, len(subjects))
    steps = epochs * steps_per_epoch(len(subjects), subjects_per_step)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    trainable = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in trainable] if proximal_mu > 0 else None
    losses, sampled = [], 0
    for _ in range(steps):
        keep = sdp.poisson_sample_subjects(subjects, q, gen)
        rows = torch.isin(subj, keep).nonzero().flatten()
        sampled += len(keep)
        if len(rows):
            per = _per_example_grads(model, x[rows.to(device)], y[rows.to(device)])
            with torch.no_grad():
                losses.append(float(F.cross_entropy(model(x[rows.to(device)]), y[rows.to(device)])))
        else:
            per = [torch.zeros((0,) + p.shape, device=device) for p in trainable]
        ids = subj[rows].to(device)
        noisy = sdp.subject_dp_gradient(per, ids, clip=clip, noise_multiplier=sigma * NOISE_SCALE, expected_subjects=q * len(subjects), generator=gen)
        opt.zero_grad(set_to_none=True)
        for i, (p, g) in enumerate(zip(trainable, noisy)):
            p.grad = g.to(p.device, p.dtype)
            if anchor is not None:  # FedProx's term: data-independent, so it costs no privacy
                p.grad = p.grad + proximal_mu * (p.detach() - anchor[i])
        opt.step()
    return {"loss": float(np.mean(losses)) if losses else float("nan"), "steps": steps, "sample_rate": q,
            "subjects": len(subjects), "mean_sampled": sampled / max(steps, 1)}


@CLIENTS.register(MECHANISM)
class SubjectDPClient(WeightsClient):
    """FedAvg/FedProx's client with subject-level DP-SGD as its local training."""

    def train(self, msg: Message, context: Context, env: ClientEnv) -> Message:
        model = self.model(msg, env)
        cfg, t = env.cfg, env.cfg.train
        conf = msg.content[keys.CONFIG]
        sigma = float(conf[SIGMA_KEY]) if SIGMA_KEY in conf else float(cfg.privacy.noise_multiplier)
        data = env.data.train
        if data.subject is None:
            raise ValueError("subject-dp: this client's records carry no subject ids")
        res = train_subject_dp(
            model, data, epochs=t.local_epochs, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay,
            clip=cfg.privacy.max_grad_norm, sigma=sigma, subjects_per_step=cfg.subject_dp.subjects_per_step,
            device=env.device, proximal_mu=float(conf.get(keys.PROXIMAL_MU, 0.0)),
        )
        # this silo's own subject-level epsilon so far (the summary composes over the silos holding each subject)
        rounds = int(env.server_round)
        eps = sdp.subject_epsilon([sdp.SiloSchedule(res["sample_rate"], sigma, res["steps"])], max(rounds, 1), cfg.privacy.delta)
        metrics = {keys.NUM_EXAMPLES: len(data), keys.LOSS: res["loss"], keys.EPSILON: float(eps) if math.isfinite(eps) else 1e308}
        return reply(msg, env, metrics, **{keys.ARRAYS: ArrayRecord(model.cpu().state_dict())})
