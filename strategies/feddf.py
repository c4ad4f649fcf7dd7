"""FedDF: ensemble distillation for robust model fusion (Lin, Kong, Stich, Jaggi, NeurIPS 2020, arXiv 2006.07242).

Each round, per architecture group (``model.name`` as a list: clients ``i`` run ``name[i % len(name)]``):

1. every sampled client trains its group's model on its private data (plain local SGD, as FedAvg);
2. the server averages the returned weights inside each group (FedAvg, weighted by examples);
3. the server distils the *ensemble of all received client models* (every architecture) into each
   group's averaged model on unlabelled proxy data: the student minimises
   ``T^2 * KL(softmax(mean_k z_k / T) || softmax(z_s / T))`` (averaged teacher logits ``z_k``) with Adam,
   evaluating the same loss on a held-out validation part of the proxy data every ``eval_every``
   steps and keeping the best student; it stops after ``patience`` steps without improvement or
   ``max_steps`` steps.

Our reading where the paper leaves room (also in strategies/README.md):

- Proxy data: ``feddf.proxy_fraction`` of the training pool is held out (stratified, seeded) *before*
  partitioning, exactly as FedMD's public split (``load_federation(..., public_fraction)``), so it is in
  no client's data and is not the server's test set; its labels are dropped. Clients train on the rest
  (an ``ENV_HOOKS`` entry below swaps their federation for :func:`feddf_federation`), so a FedDF client
  holds ``proxy_fraction`` less private data than a FedAvg client on the same data config. Central
  evaluation uses the whole server test set, the same samples as every other strategy's ``accuracy``.
- Validation: the paper early-stops on a validation split; with unlabelled proxy data we use the
  distillation loss on ``feddf.val_fraction`` of the proxy data (no labels needed).
- Wire format: the global state is one ArrayRecord holding every group's weights under
  ``"<model name>/<parameter>"``. A node whose architecture the server has seen (from its previous
  reply's ``keys.NODE`` record) receives only its group's weights; a node never seen before (round 1)
  receives every group's weights and picks its own. bytes_down counts exactly that.

Defaults follow the paper's setup as we read it (Adam lr 1e-3, batch 64, temperature 1, at most
10^4 steps, patience 10^3 steps); benchmarks use fewer steps on CPU.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords, validate_message_reply_consistency
from torch.nn import functional as F

from fedkd import keys
from fedkd.config import ConfigError, _require, register_section
from fedkd.data import ArrayDataset, Federation, load_federation
from fedkd.models import build_model
from fedkd.training import evaluate, predict_logits, resolve_device

from . import STRATEGIES
from .base import StrategyEntry, StrategySpec
from .fedavg import sampling


@register_section("feddf")
@dataclass(frozen=True)
class FedDFConfig:
    temperature: float = 1.0  # softmax temperature of the distillation KL
    lr: float = 1e-3  # Adam learning rate on the server
    batch_size: int = 64  # proxy batch size
    max_steps: int = 10_000  # distillation steps per group per round, at most
    eval_every: int = 100  # steps between validation checks
    patience: int = 1_000  # stop after this many steps without a better validation loss
    proxy_fraction: float = 0.1  # share of the training pool held out (before partitioning) as unlabelled proxy data
    val_fraction: float = 0.2  # part of the proxy data kept for early stopping

    def validate(self, cfg) -> None:
        _require(self.temperature > 0, "feddf.temperature", f"must be > 0 (got {self.temperature})")
        _require(self.lr > 0, "feddf.lr", f"must be > 0 (got {self.lr})")
        for key in ("batch_size", "max_steps", "eval_every"):
            v = getattr(self, key)
            _require(v >= 1, f"feddf.{key}", f"must be >= 1 (got {v})")
        _require(self.patience >= 0, "feddf.patience", f"must be >= 0 (got {self.patience})")
        for key in ("proxy_fraction", "val_fraction"):
            v = getattr(self, key)
            _require(0 < v < 1, f"feddf.{key}", f"must be in (0, 1) (got {v}); 0 leaves an empty proxy split")


# --------------------------------------------------------------------------- pure pieces
def distill_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher/T) || softmax(student/T))``, mean over the batch. Both (B, K) logits."""
    t = temperature
    return F.kl_div(F.log_softmax(student / t, dim=1), F.log_softmax(teacher / t, dim=1), log_target=True, reduction="batchmean") * t * t


def feddf_federation(cfg) -> Federation:
    """The federation FedDF's clients train on: ``feddf.proxy_fraction`` of the pool held out as ``public``."""
    return load_federation(cfg.data, cfg.run.seed, cfg.feddf.proxy_fraction)


def proxy_split(proxy: ArrayDataset, hp: FedDFConfig, seed: int) -> tuple[ArrayDataset, ArrayDataset]:
    """(proxy train inputs, proxy validation inputs): disjoint parts of the held-out proxy pool.

    They keep their labels in the dataset object only so the types match; FedDF never reads them.
    """
    n = len(proxy) if proxy is not None else 0
    perm = np.random.default_rng([seed, 0xDF]).permutation(n)
    n_val = int(round(n * hp.val_fraction))
    if n - n_val < 1 or n_val < 1:
        raise ConfigError("feddf.proxy_fraction", f"leaves an empty proxy split ({n} held-out samples, {n_val} for validation); raise it")
    val, train = perm[:n_val], perm[n_val:]
    return proxy.take(np.sort(train)), proxy.take(np.sort(val))


def ensemble_distill(student: torch.nn.Module, teacher_train: torch.Tensor, teacher_val: torch.Tensor,
                     x_train: np.ndarray, x_val: np.ndarray, hp: FedDFConfig, device, seed: int) -> dict:
    """Distil averaged teacher logits into ``student`` in place (Adam, early stopping). Returns stats."""
    device = torch.device(device)
    student.to(device).train()
    opt = torch.optim.Adam(student.parameters(), lr=hp.lr)
    xt, xv = torch.as_tensor(x_train).to(device), torch.as_tensor(x_val).to(device)  # (P, C, H, W), (V, C, H, W)
    tt, tv = teacher_train.to(device), teacher_val.to(device)  # (P, K), (V, K)

    def val_loss() -> float:
        student.eval()
        with torch.no_grad():
            v = distill_kl(student(xv), tv, hp.temperature).item()
        student.train()
        return v

    g = torch.Generator().manual_seed(seed)
    best, best_state, best_step = val_loss(), copy.deepcopy(student.state_dict()), 0
    start_loss, step = best, 0
    while step < hp.max_steps and step - best_step <= hp.patience:
        idx = torch.randint(len(xt), (min(hp.batch_size, len(xt)),), generator=g).to(device)
        loss = distill_kl(student(xt[idx]), tt[idx], hp.temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % hp.eval_every == 0 or step == hp.max_steps:
            v = val_loss()
            if v < best:
                best, best_state, best_step = v, copy.deepcopy(student.state_dict()), step
    student.load_state_dict(best_state)
    student.eval()
    return {"steps": step, "best_step": best_step, "val_kl_before": start_loss, "val_kl_after": best}


def pack(groups: dict[str, ArrayRecord]) -> ArrayRecord:
    """Every group's weights in one record, under ``"<model name>/<parameter>"``."""
    return ArrayRecord({f"{name}/{k}": arr for name, rec in groups.items() for k, arr in rec.items()})


def unpack(packed: ArrayRecord) -> dict[str, ArrayRecord]:
    out: dict[str, dict] = {}
    for key, arr in packed.items():
        name, _, param = key.partition("/")
        out.setdefault(name, {})[param] = arr
    return {name: ArrayRecord(d) for name, d in out.items()}


def group_model(cfg, fed: Federation, name: str) -> torch.nn.Module:
    return build_model(name, fed.input_shape, fed.num_classes, hidden=cfg.model.hidden if name == "mlp" else None, dropout=cfg.model.dropout)


def model_name_of(reply: Message) -> str:
    return str(reply.content[keys.NODE][keys.MODEL_NAME])


# --------------------------------------------------------------------------- strategy
class FedDF(FedAvg):
    """FedAvg per architecture group, then server-side ensemble distillation into each group's model."""

    def __init__(self, cfg, fed: Federation, proxy: tuple[ArrayDataset, ArrayDataset], **kwargs) -> None:
        super().__init__(**kwargs)
        self.cfg, self.fed, self.hp = cfg, fed, cfg.feddf
        self.proxy_train, self.proxy_val = proxy
        self.device = resolve_device(cfg.run.device)
        self.arch_of_node: dict[int, str] = {}  # learnt from replies' keys.NODE record
        self.current: ArrayRecord | None = None  # packed global state sent this round
        self.last_distill: dict[str, dict] = {}

    # -- per-node messages: a known node gets its group's weights only
    def _per_node(self, messages, arrays: ArrayRecord) -> list[Message]:
        groups = unpack(arrays)
        out = []
        for m in messages:
            name = self.arch_of_node.get(m.metadata.dst_node_id)
            payload = groups[name] if name in groups else arrays
            content = RecordDict({self.arrayrecord_key: payload, self.configrecord_key: m.content[self.configrecord_key]})
            out.append(Message(content=content, message_type=m.metadata.message_type, dst_node_id=m.metadata.dst_node_id))
        return out

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        self.current = arrays
        return self._per_node(super().configure_train(server_round, arrays, config, grid), arrays)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        return self._per_node(super().configure_evaluate(server_round, arrays, config, grid), arrays)

    def _learn_archs(self, replies: list[Message]) -> None:
        for r in replies:
            if not r.has_error() and keys.NODE in r.content:
                self.arch_of_node[r.metadata.src_node_id] = model_name_of(r)

    def aggregate_evaluate(self, server_round: int, replies):
        replies = list(replies)
        self._learn_archs(replies)
        return super().aggregate_evaluate(server_round, replies)

    def aggregate_train(self, server_round: int, replies):
        replies = list(replies)
        self._learn_archs(replies)
        valid, _ = self._check_and_log_replies(replies, is_train=True, validate=False)
        if not valid:
            return None, None
        groups = unpack(self.current) if self.current is not None else {}
        by_group: dict[str, list[RecordDict]] = {}
        for r in valid:
            by_group.setdefault(model_name_of(r), []).append(r.content)
        # 1. FedAvg inside each architecture group (groups nobody trained this round keep their weights)
        for name, contents in by_group.items():
            validate_message_reply_consistency(contents, self.weighted_by_key, check_arrayrecord=True)
            groups[name] = aggregate_arrayrecords(contents, self.weighted_by_key)
        # 2. the teacher ensemble: every received client model, any architecture; averaged logits
        x_tr, x_va = self.proxy_train.x, self.proxy_val.x
        logits_tr, logits_va = [], []
        for r in valid:
            teacher = group_model(self.cfg, self.fed, model_name_of(r))
            teacher.load_state_dict(r.content[self.arrayrecord_key].to_torch_state_dict())
            logits_tr.append(predict_logits(teacher, x_tr, self.device))  # (P, K)
            logits_va.append(predict_logits(teacher, x_va, self.device))  # (V, K)
        t_tr, t_va = torch.stack(logits_tr).mean(0), torch.stack(logits_va).mean(0)
        # 3. distil the ensemble into every group's averaged model
        metrics = dict(self.train_metrics_aggr_fn([r.content for r in valid], self.weighted_by_key))
        for gi, (name, rec) in enumerate(sorted(groups.items())):
            student = group_model(self.cfg, self.fed, name)
            student.load_state_dict(rec.to_torch_state_dict())
            stats = ensemble_distill(student, t_tr, t_va, x_tr, x_va, self.hp, self.device, seed=self.cfg.run.seed * 1000 + server_round * 10 + gi)
            groups[name] = ArrayRecord(student.cpu().state_dict())
            self.last_distill[name] = stats
            metrics[f"distill_steps_{name}"] = float(stats["steps"])
            metrics[f"distill_val_kl_{name}"] = float(stats["val_kl_after"])
        return pack(groups), MetricRecord(metrics)


def build_feddf(cfg, fed: Federation) -> StrategySpec:
    own = feddf_federation(cfg)
    proxy_tr, proxy_va = proxy_split(own.public, cfg.feddf, cfg.run.seed)
    test = own.server_test  # the same server test set as every strategy's (split off before the proxy pool)
    names = sorted(set(cfg.model.name))
    initial = {}
    for gi, name in enumerate(names):
        torch.manual_seed(cfg.run.seed * 100 + gi)
        initial[name] = ArrayRecord(group_model(cfg, fed, name).state_dict())
    strategy = FedDF(cfg, fed, (proxy_tr, proxy_va), **sampling(cfg))
    device = resolve_device(cfg.run.device)
    models = {name: group_model(cfg, fed, name) for name in names}

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """Each group's model on the server test set; 'accuracy' = their mean."""
        out, accs, losses = {}, [], []
        for name, rec in unpack(arrays).items():
            models[name].load_state_dict(rec.to_torch_state_dict())
            loss, acc = evaluate(models[name], test, device)
            out[f"accuracy_{name}"], out[f"loss_{name}"] = acc, loss
            accs.append(acc)
            losses.append(loss)
        out[keys.ACCURACY], out[keys.LOSS] = float(np.mean(accs)), float(np.mean(losses))
        for name, stats in strategy.last_distill.items():  # this round's server-side distillation
            out[f"distill_steps_{name}"] = float(stats["steps"])
            out[f"distill_val_kl_before_{name}"] = float(stats["val_kl_before"])
            out[f"distill_val_kl_{name}"] = float(stats["val_kl_after"])
        strategy.last_distill = {}
        return MetricRecord(out)

    return StrategySpec(strategy, pack(initial), evaluate_fn, client="feddf")


def _client_data(msg, env):
    """Client side (an ``ENV_HOOKS`` entry): a FedDF client trains on the federation without the proxy pool."""
    if env.cfg.strategy.name != "feddf":
        return env
    return dataclasses.replace(env, federation=feddf_federation(env.cfg))


def _register_hooks() -> None:
    from fedkd.attacks.runner import CLIENT_FEDERATIONS
    from fedkd.clients.base import ENV_HOOKS

    if _client_data not in ENV_HOOKS:
        ENV_HOOKS.insert(0, _client_data)  # before the attacks' threat setting, which reads the federation
    CLIENT_FEDERATIONS["feddf"] = feddf_federation


_register_hooks()

STRATEGIES.add("feddf", StrategyEntry(build_feddf, heterogeneous=True, mechanisms=("none", "dp-sgd"),
                                      description="FedDF: FedAvg per architecture + server ensemble distillation on unlabelled proxy data"))
