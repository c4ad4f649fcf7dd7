"""FedLGD: federated virtual learning with local-global dataset distillation, server side.

Huang, Jin, Zhao, Xu, Li, "Federated Virtual Learning on Heterogeneous Data with Local-Global Distillation"
(TMLR; arXiv 2303.02278; code ubc-tea/FedLGD, read for the details below, not copied). Clients never train on
real data: each distils *local virtual data* (``ipc`` images per class) from its private data by distribution
matching, and trains the global model on it together with the server's *global virtual data*
(``server_ipc`` per class), which the server distils by federated gradient matching. Building blocks:
:mod:`fedkd.distill`.

Schedule (Flower round ``r`` is the authors' ``a_iter = r - 1``; ``G = image_update_times``):

- round 1, before training: every available client sends its per-class, per-channel pixel statistics
  (:data:`keys.FEDLGD_STATS`); the server averages them and draws the global virtual data (version 0).
  These statistics are an upload beyond model weights: counted in bytes_up and named in summary.json
  under ``disclosures``.
- refresh rounds, ``(r - 1) % si_tgap == 0`` and ``r - 1 <= si_tgap * G`` (rounds 1, 6, ..., 51): clients
  train with plain CE; after aggregation the server runs ``gm_iterations`` steps of gradient matching of
  the global virtual data against the pseudo-gradient ``(w_old - w_new) / train.lr`` on ``w_old`` (the
  model it sent this round) and bumps the version.
- local DM rounds, ``r - 1 > 0``, ``(r - 1) % ci_tgap == 0`` and ``r - 1 <= ci_tgap * G`` (rounds 6, ..., 51):
  clients first run ``dm_iterations`` of distribution matching with the received global model.
- aggregation: the unweighted mean of the valid replies' weights (the authors' 1/|sampled clients|).

Client contract. Every message is a ``train`` message whose ConfigRecord carries ``keys.PHASE``:

- ``PHASE = "stats"`` (round 1 only, no arrays): reply with :func:`stats_record` of
  ``class_channel_stats(normalize(own train images), labels, K)`` under ``keys.FEDLGD_STATS``, nothing else.
- ``PHASE = "train"``: the ArrayRecord ``keys.ARRAYS`` is the global model; ``keys.FEDLGD_GLOBAL`` (images
  normalised, labels) is present only when this node has not yet received version ``keys.FEDLGD_VERSION``:
  keep it in ``Context.state`` and use the kept copy otherwise (a client lacking that version must fail
  the round with an error; the server then sends the data again). On the first training message, draw
  the local virtual data from the own statistics (``init_from_stats``) and warm it up with
  ``warmup_iterations`` of DM on fresh random ConvNets; if ``keys.FEDLGD_LOCAL_DM``, run ``dm_iterations``
  of DM with the received model. Then train ``train.local_epochs`` epochs (SGD, ``train.lr``,
  ``train.batch_size``) on local + global virtual data with CE, plus ``lambda_sim`` x SupCon between the
  batch's embeddings and the embeddings of all global virtual images unless ``keys.FEDLGD_REFRESH``.
  Reply with the weights under ``keys.ARRAYS`` and ``keys.NUM_EXAMPLES`` in ``keys.METRICS``: never
  images, virtual or real. All its random draws come from its private generator. It writes a grid of its
  local virtual data after the warm-up and each DM (``fedkd.distill.save_virtual_grid``) into
  ``fedlgd.local_image_dir`` on its own machine; with the default ``"run"``, into the run directory named by
  ``keys.FEDLGD_RUN_DIR`` (sent when the server records into one) where that directory exists on its machine.
  The client is clients/fedlgd.py.
- ``evaluate`` messages are FedAvg's (the global model only): evaluate it on the own test split, normalised.

``local_virtual_init``, ``local_dm`` and ``local_loss`` below are the client's pieces as pure functions.

Our readings and deviations (also in strategies/README.md): class statistics per class (the authors'
code divides by all of a client's pixels, fedkd.distill.class_stats); the server averages them over the
clients that hold each class; the stats exchange goes to every available node, not only the sampled
ones; the global virtual data goes down only to nodes that lack its current version (the authors'
simulation shares memory).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes
from torch.nn import functional as F

from fedkd import keys
from fedkd.config import ConfigError, _require, register_section
from fedkd.data import Federation
from fedkd.distill import (
    ClassStats, alignment_loss, average_stats, class_channel_stats, distribution_matching, gradient_match_distance, gradient_matching,
    init_from_stats, pseudo_gradient,
)
from fedkd.distill.diffaugment import FEDLGD_STRATEGY, parse_strategy
from fedkd.models import model_from_config
from fedkd.training import predict_logits, resolve_device

from . import STRATEGIES
from .base import StrategyEntry, StrategySpec, global_model
from .fedavg import sampling

STATS_BYTES = "fedlgd_stats_bytes_up"  # server metric (round 1): bytes of class statistics received
STATS_CLIENTS = "fedlgd_stats_clients"  # server metric (round 1): clients whose statistics were used
DISCLOSURE = "class_channel_statistics"  # name of the disclosure in summary.json
CONVNETS = ("convnet", "convnet-w32")  # model.name values FedLGD runs with: the paper's ConvNet, and the same at width 32 (reduced settings)


@register_section("fedlgd")
@dataclass(frozen=True)
class FedLGDConfig:
    ipc: int = 50  # local virtual images per class
    server_ipc: int = 10  # global virtual images per class
    lambda_sim: float = 10.0  # weight of the contrastive local-global alignment (the paper's DIGITS setting)
    temperature: float = 0.07  # SupCon temperature
    base_temperature: float = 0.07
    ci_tgap: int = 5  # rounds between local DM refreshes
    si_tgap: int = 5  # rounds between global GM refreshes
    image_update_times: int = 10  # refreshes stop after this many gaps (rounds 1 + gap * 0..10)
    warmup_iterations: int = 10_000  # DM warm-up iterations, a fresh random ConvNet each
    dm_iterations: int = 100  # iterative DM iterations with the global model (ci_iter)
    gm_iterations: int = 500  # server gradient-matching iterations per refresh (si_iter)
    image_lr: float = 1.0  # SGD on virtual images (DM and GM)
    image_momentum: float = 0.5
    real_batch: int = 256  # real images per class per DM iteration
    dsa_strategy: str = FEDLGD_STRATEGY  # DiffAugment groups for DM ("none" = off)
    image_mean: float = 0.5  # images are normalised (x - mean) / std before everything (all channels)
    image_std: float = 0.5
    # where a client writes PNG grids of its local virtual data: "run" = <run dir>/virtual where the client's machine has
    # the server's run directory (simulations), "" = nowhere, else a folder on the client's own machine
    local_image_dir: str = "run"

    def validate(self, cfg) -> None:
        for key in ("ipc", "server_ipc", "ci_tgap", "si_tgap", "real_batch"):
            v = getattr(self, key)
            _require(v >= 1, f"fedlgd.{key}", f"must be >= 1 (got {v})")
        for key in ("image_update_times", "warmup_iterations", "dm_iterations", "gm_iterations"):
            v = getattr(self, key)
            _require(v >= 0, f"fedlgd.{key}", f"must be >= 0 (got {v})")
        _require(self.lambda_sim >= 0 and math.isfinite(self.lambda_sim), "fedlgd.lambda_sim", f"must be >= 0 (got {self.lambda_sim})")
        for key in ("temperature", "base_temperature", "image_lr", "image_std"):
            v = getattr(self, key)
            _require(v > 0 and math.isfinite(v), f"fedlgd.{key}", f"must be > 0 (got {v})")
        _require(0 <= self.image_momentum < 1, "fedlgd.image_momentum", f"must be in [0, 1) (got {self.image_momentum})")
        _require(math.isfinite(self.image_mean), "fedlgd.image_mean", f"must be a finite number (got {self.image_mean})")
        try:
            parse_strategy(self.dsa_strategy)
        except ValueError as e:
            raise ConfigError("fedlgd.dsa_strategy", str(e)) from None
        if cfg.strategy.name == "fedlgd":
            bad = [n for n in cfg.model.name if n not in CONVNETS] or len(set(cfg.model.name)) > 1
            _require(not bad, "model.name", f"fedlgd needs one ConvNet for all clients, whose embedding it matches ({' or '.join(CONVNETS)}; got {list(cfg.model.name)})")
            _require(
                cfg.privacy.mechanism == "none",
                "privacy.mechanism",
                f"fedlgd runs with no privacy mechanism yet; {cfg.privacy.mechanism!r} would not protect its class statistics (got {cfg.privacy.mechanism!r})",
            )


# --------------------------------------------------------------------------- schedule and wire format
def is_refresh_round(server_round: int, hp: FedLGDConfig) -> bool:
    """Clients train with plain CE and the server refreshes its global virtual data after aggregation."""
    a = server_round - 1
    return a >= 0 and a % hp.si_tgap == 0 and a <= hp.si_tgap * hp.image_update_times


def is_local_dm_round(server_round: int, hp: FedLGDConfig) -> bool:
    """Clients re-run distribution matching with the received global model before training."""
    a = server_round - 1
    return a > 0 and a % hp.ci_tgap == 0 and a <= hp.ci_tgap * hp.image_update_times


def normalize(x, hp: FedLGDConfig):
    """Images in [0, 1] -> the space FedLGD works in: ``(x - image_mean) / image_std``."""
    return (x - hp.image_mean) / hp.image_std


def stats_record(stats: ClassStats) -> ArrayRecord:
    """A client's disclosure: mean (K, C) and std (K, C) float32, present (K,) bool."""
    return ArrayRecord({
        "mean": Array(np.ascontiguousarray(stats.mean, dtype=np.float32)),
        "std": Array(np.ascontiguousarray(stats.std, dtype=np.float32)),
        "present": Array(np.ascontiguousarray(stats.present, dtype=bool)),
    })


def stats_from_record(rec: ArrayRecord, num_classes: int, channels: int) -> ClassStats:
    """Parse and check a client's statistics; ValueError names what is wrong."""
    if set(rec.keys()) != {"mean", "std", "present"}:
        raise ValueError(f"class statistics must hold mean, std and present (got {sorted(rec.keys())})")
    mean, std, present = rec["mean"].numpy(), rec["std"].numpy(), rec["present"].numpy()
    if mean.shape != (num_classes, channels) or std.shape != (num_classes, channels) or present.shape != (num_classes,):
        raise ValueError(f"class statistics of shapes {mean.shape}, {std.shape}, {present.shape}; expected ({num_classes}, {channels}) and ({num_classes},)")
    if not (np.isfinite(mean).all() and np.isfinite(std).all()) or (std < 0).any():
        raise ValueError("class statistics must be finite with std >= 0")
    if present.dtype != np.bool_ or not present.any():
        raise ValueError("class statistics must mark the classes present (bool) and hold at least one")
    return ClassStats(mean.astype(np.float32), std.astype(np.float32), present.copy())


def global_record(images: torch.Tensor, labels: torch.Tensor) -> ArrayRecord:
    """The global virtual data as sent down: images (N, C, H, W) float32 (normalised), labels (N,) int64."""
    return ArrayRecord({"images": Array(images.detach().cpu().numpy().astype(np.float32)), "labels": Array(labels.cpu().numpy().astype(np.int64))})


def global_from_record(rec: ArrayRecord) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(rec["images"].numpy().copy()), torch.from_numpy(rec["labels"].numpy().copy())


def _payload(rec: ArrayRecord) -> int:
    return sum(len(arr.data) for arr in rec.values())


# --------------------------------------------------------------------------- client-side pieces (pure, for the client logic)
def local_virtual_init(x, y, num_classes: int, hp: FedLGDConfig, generator: torch.Generator, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """A client's local virtual data before warm-up: ``ipc`` Gaussian images per class it holds, drawn with
    its own per-class channel statistics (``x`` already normalised). Returns (images, labels) grouped by class."""
    stats = class_channel_stats(x, y, num_classes)
    _, _, h, w = x.shape
    return init_from_stats(stats, hp.ipc, (h, w), generator, classes=np.flatnonzero(stats.present), device=device)


def local_dm(images: torch.Tensor, labels: torch.Tensor, x: torch.Tensor, y: torch.Tensor, hp: FedLGDConfig, generator: torch.Generator,
             *, embedder: torch.nn.Module | None = None, net_factory=None, iterations: int | None = None, progress=None) -> list[float]:
    """Warm-up (``net_factory``: fresh random ConvNets, ``warmup_iterations``) or iterative DM (``embedder``: the
    received global model, ``dm_iterations``) of the local virtual ``images`` in place, with FedLGD's settings."""
    if iterations is None:
        iterations = hp.dm_iterations if embedder is not None else hp.warmup_iterations
    return distribution_matching(images, labels, x, y, iterations=iterations, generator=generator, embedder=embedder, net_factory=net_factory,
                                 batch_real=hp.real_batch, lr=hp.image_lr, momentum=hp.image_momentum, strategy=hp.dsa_strategy, progress=progress)


def local_loss(model, xb: torch.Tensor, yb: torch.Tensor, global_images: torch.Tensor, global_labels: torch.Tensor, hp: FedLGDConfig,
               refresh: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, CE, alignment) of one batch: ``CE + lambda_sim * SupCon(embed(batch), embed(all global images))``,
    plain CE in refresh rounds (alignment 0). ``model`` is a ConvNet; the global embeddings are recomputed with
    the current weights, so the alignment's gradient flows through both."""
    emb, logits = model.embed_and_logits(xb)  # (B, D), (B, K)
    ce = F.cross_entropy(logits, yb)
    if refresh or hp.lambda_sim == 0:
        return ce, ce, ce.new_zeros(())
    align = alignment_loss(emb, yb, model.embed(global_images), global_labels, hp.temperature, hp.base_temperature)
    return ce + hp.lambda_sim * align, ce, align


# --------------------------------------------------------------------------- strategy
class FedLGD(FedAvg):
    """FedAvg's sampling; round 1 collects class statistics; uniform averaging; server gradient matching.

    See the module docstring for the schedule and for exactly what a client must do with each message.
    """

    def __init__(self, cfg, fed: Federation, timeout: float = 3600.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.cfg, self.hp, self.fed, self.timeout = cfg, cfg.fedlgd, fed, timeout
        self.device = resolve_device(cfg.run.device)
        with torch.random.fork_rng(devices=[]):  # the architecture only; weights come from the messages
            self.model = model_from_config(cfg.model, 0, fed.input_shape, fed.num_classes).to(self.device)
        self.images: torch.Tensor | None = None  # (K * server_ipc, C, H, W) normalised, on CPU
        self.labels: torch.Tensor | None = None  # (K * server_ipc,)
        self.version = -1  # -1: not initialised; bumped by each gradient-matching refresh
        self._record: ArrayRecord | None = None  # self.images as sent
        self.sent_version: dict[int, int] = {}  # node id -> version of the global data it was sent
        self.pending: set[int] = set()  # nodes messaged this round
        self.current: ArrayRecord | None = None  # w_old: the model sent this round
        self.round_metrics: dict[int, dict[str, float]] = {}  # server metrics of a round, for evaluate_fn
        self.disclosed = {"bytes_up": 0, "clients": 0}

    # -- round 1: class statistics -> global virtual data
    def initialise(self, server_round: int, config: ConfigRecord, grid: Grid) -> None:
        _, nodes = sample_nodes(grid, self.min_available_nodes, 0)  # every available node (waits for the minimum)
        conf = ConfigRecord({**dict(config), keys.SERVER_ROUND: server_round, keys.PHASE: keys.FEDLGD_STATS_PHASE})
        ask = [Message(content=RecordDict({self.configrecord_key: conf}), message_type=MessageType.TRAIN, dst_node_id=n) for n in nodes]
        c, h, w = self.fed.input_shape
        stats, nbytes = [], 0
        for r in grid.send_and_receive(ask, timeout=self.timeout):
            if r.has_error() or keys.FEDLGD_STATS not in r.content.array_records:
                continue
            rec = r.content.array_records[keys.FEDLGD_STATS]
            nbytes += _payload(rec)  # what was disclosed, even when it turns out malformed
            try:
                stats.append(stats_from_record(rec, self.fed.num_classes, c))
            except ValueError:
                continue
        if not stats:
            raise RuntimeError(f"fedlgd: none of {len(nodes)} clients sent valid class statistics in round {server_round}")
        self.disclosed = {"bytes_up": nbytes, "clients": len(stats)}
        self.round_metrics.setdefault(server_round, {}).update({STATS_BYTES: float(nbytes), STATS_CLIENTS: float(len(stats))})
        g = torch.Generator().manual_seed(zlib.crc32(f"fedlgd-global-init,{self.cfg.run.seed}".encode()))  # server-side data, no secret
        self.images, self.labels = init_from_stats(average_stats(stats), self.hp.server_ipc, (h, w), g)
        self.version, self._record = 0, None

    @property
    def record(self) -> ArrayRecord:
        if self._record is None:
            self._record = global_record(self.images, self.labels)
        return self._record

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        if self.version < 0:
            self.initialise(server_round, config, grid)
        self.current = arrays
        messages = list(super().configure_train(server_round, arrays, config, grid))
        conf = ConfigRecord({
            **dict(config), keys.PHASE: keys.FEDLGD_TRAIN_PHASE, keys.FEDLGD_VERSION: self.version,
            keys.FEDLGD_REFRESH: is_refresh_round(server_round, self.hp), keys.FEDLGD_LOCAL_DM: is_local_dm_round(server_round, self.hp),
        })
        run_dir = getattr(getattr(grid, "recorder", None), "out_dir", None)  # fedkd's RecordingGrid records into the run directory
        if run_dir is not None and self.hp.local_image_dir == "run":
            conf[keys.FEDLGD_RUN_DIR] = str(Path(run_dir).resolve())
        out = []
        self.pending = set()
        for m in messages:
            node = m.metadata.dst_node_id
            content = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: conf})
            if self.sent_version.get(node) != self.version:
                content[keys.FEDLGD_GLOBAL] = self.record
                self.sent_version[node] = self.version
            self.pending.add(node)
            out.append(Message(content=content, message_type=m.metadata.message_type, dst_node_id=node))
        return out

    # -- aggregation and the global refresh
    def _valid(self, reply: Message) -> bool:
        if reply.has_error() or self.arrayrecord_key not in reply.content.array_records:
            return False
        got, ref = reply.content.array_records[self.arrayrecord_key], self.current
        if set(got.keys()) != set(ref.keys()):
            return False
        for k, arr in got.items():
            a = arr.numpy()
            if a.shape != ref[k].numpy().shape or not np.isfinite(a).all():
                return False
        m = reply.content.metric_records.get(keys.METRICS)
        n = m.get(keys.NUM_EXAMPLES) if m is not None else None
        return isinstance(n, (int, float)) and math.isfinite(n) and n > 0

    def aggregate_train(self, server_round: int, replies):
        replies = list(replies)
        valid = [r for r in replies if self._valid(r)]
        ok_nodes = {r.metadata.src_node_id for r in valid}
        for node in self.pending - ok_nodes:  # it may not hold the global data it was sent: send it again
            self.sent_version.pop(node, None)
        metrics = self.round_metrics.setdefault(server_round, {})
        metrics["fedlgd_rejected_replies"] = float(len(replies) - len(valid))
        if not valid:
            return None, None
        # the authors' aggregation: the unweighted mean of the sampled clients' weights
        new = {k: np.mean([r.content[self.arrayrecord_key][k].numpy() for r in valid], axis=0).astype(self.current[k].numpy().dtype)
               for k in self.current.keys()}
        train_metrics = self.train_metrics_aggr_fn([r.content for r in valid], self.weighted_by_key)
        if is_refresh_round(server_round, self.hp):
            metrics.update(self.refresh(self.current, new))
        return ArrayRecord({k: Array(v) for k, v in new.items()}), train_metrics

    def refresh(self, old: ArrayRecord, new: dict[str, np.ndarray]) -> dict[str, float]:
        """Gradient matching of the global virtual data against (w_old - w_new) / train.lr on w_old."""
        from tqdm.auto import tqdm

        old_np = {k: v.numpy() for k, v in old.items()}
        self.model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in old_np.items()})
        target = pseudo_gradient(self.model, old_np, new, self.cfg.train.lr)
        images, labels = self.images.clone().to(self.device), self.labels.to(self.device)
        before = gradient_match_distance(self.model, images, labels, target)
        with tqdm(total=self.hp.gm_iterations, desc="fedlgd gradient matching", unit="it", leave=False, disable=None) as bar:
            gradient_matching(images, labels, self.model, target, iterations=self.hp.gm_iterations, lr=self.hp.image_lr,
                              momentum=self.hp.image_momentum, progress=lambda it, d: bar.update(1))
        after = gradient_match_distance(self.model, images, labels, target)
        if not torch.isfinite(images).all():
            raise RuntimeError("fedlgd: gradient matching produced non-finite global virtual images")
        self.images, self.version, self._record = images.detach().cpu(), self.version + 1, None
        return {"fedlgd_gm_distance_before": before, "fedlgd_gm_distance_after": after, "fedlgd_global_version": float(self.version)}


# --------------------------------------------------------------------------- spec, evaluation, summary, grids
def build_fedlgd(cfg, fed: Federation) -> StrategySpec:
    """FedLGD's StrategySpec (client logic "fedlgd", clients/fedlgd.py)."""
    strategy = FedLGD(cfg, fed, **sampling(cfg))
    model = global_model(cfg, fed)
    initial = ArrayRecord(model.state_dict())
    x = normalize(fed.server_test.x, cfg.fedlgd).astype(np.float32)  # (N, C, H, W)
    y = torch.as_tensor(fed.server_test.y)
    names = (fed.extras or {}).get("domains")

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """The global model on the normalised server test set (and per domain), plus the round's server metrics."""
        model.load_state_dict(arrays.to_torch_state_dict())
        logits = predict_logits(model, x, strategy.device)  # (N, K)
        out = {keys.LOSS: float(F.cross_entropy(logits, y)) if len(y) else math.nan,
               keys.ACCURACY: float((logits.argmax(1) == y).float().mean()) if len(y) else math.nan}
        if names and fed.server_test.domain is not None:
            from fedkd.data.domains import per_domain_accuracy

            for name, acc in per_domain_accuracy(logits.argmax(1).numpy(), y.numpy(), fed.server_test.domain, names).items():
                out[f"accuracy_domain_{name}"] = acc
        out.update(strategy.round_metrics.pop(server_round, {}))
        return MetricRecord(out)

    return StrategySpec(strategy, initial, evaluate_fn, client="fedlgd")


STRATEGIES.add("fedlgd", StrategyEntry(build_fedlgd, description="FedLGD (Huang et al., TMLR): local-global dataset distillation on virtual data"))


def fedlgd_summary(cfg, recorder) -> dict:
    """summary.json: FedLGD's upload beyond model weights, named as a disclosure (bytes once measured)."""
    if cfg.strategy.name != "fedlgd":
        return {}
    rows = {r["metric"]: r["value"] for r in recorder.rows if r["node"] == "server" and r["metric"] in (STATS_BYTES, STATS_CLIENTS)}
    return {"disclosures": {DISCLOSURE: {
        "what": "per class and channel, the mean and standard deviation of all pixel values of each client's "
                "(normalised) training images, and which classes it holds; sent once, before round 1's training, "
                "to initialise the global virtual data",
        "bytes_up": int(rows[STATS_BYTES]) if STATS_BYTES in rows else None,
        "clients": int(rows[STATS_CLIENTS]) if STATS_CLIENTS in rows else None,
    }}}


def global_grid_observer(cfg, run_dir):
    """An Observer that writes a PNG grid of each new version of the global virtual data as it is sent."""
    if cfg.strategy.name != "fedlgd" or run_dir is None:
        return None
    from fedkd.distill import grid_path, save_virtual_grid

    saved: set[int] = set()

    def observe(server_round: int, sent: list[Message], replies: list[Message]) -> None:
        for m in sent:
            if m.has_content() and keys.FEDLGD_GLOBAL in m.content.array_records:
                version = int(m.content[keys.CONFIG][keys.FEDLGD_VERSION])
                if version not in saved:
                    saved.add(version)
                    images, labels = global_from_record(m.content.array_records[keys.FEDLGD_GLOBAL])
                    save_virtual_grid(images, labels, grid_path(Path(run_dir), "global", server_round, version), cfg.fedlgd.image_mean, cfg.fedlgd.image_std)

    return observe


def _register_hooks() -> None:
    from fedkd.server import OBSERVER_FACTORIES, SUMMARY_HOOKS

    if fedlgd_summary not in SUMMARY_HOOKS:
        SUMMARY_HOOKS.append(fedlgd_summary)
    if global_grid_observer not in OBSERVER_FACTORIES:
        OBSERVER_FACTORIES.append(global_grid_observer)


_register_hooks()
