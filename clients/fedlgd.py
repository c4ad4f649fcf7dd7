"""FedLGD's client (Huang et al., TMLR; arXiv 2303.02278): it trains the global model on virtual data only.

The protocol and what each message asks for are in ``strategies/fedlgd.py`` (the client contract); the
pieces (``local_virtual_init``, ``local_dm``, ``local_loss``) are pure functions there and in
:mod:`fedkd.distill`. Per node:

- ``stats`` message (round 1, once): reply with its per-class, per-channel pixel statistics
  (``keys.FEDLGD_STATS``). This is the one upload beyond model weights; the server names it in
  summary.json as a disclosure.
- first ``train`` message: draw ``fedlgd.ipc`` local virtual images per class it holds from its own class
  statistics and warm them up by ``fedlgd.warmup_iterations`` of distribution matching (DM) with DiffAugment,
  each iteration on a freshly initialised random ConvNet.
- ``train`` messages with ``keys.FEDLGD_LOCAL_DM``: ``fedlgd.dm_iterations`` of DM with the received
  global model as the embedder.
- every ``train`` message: ``train.local_epochs`` epochs of SGD on local virtual + global virtual data with
  CE + ``lambda_sim`` * SupCon (T = ``temperature``) between the batch's embeddings and all global virtual
  images' embeddings; plain CE when ``keys.FEDLGD_REFRESH``. Reply: the weights and metrics only.

Its real data never leaves it: the reply holds the model's weights (``keys.ARRAYS``) and scalar metrics;
neither real nor virtual images. The local and the last global virtual data live in ``Context.state``
(``keys.STATE_FEDLGD_LOCAL``, ``STATE_FEDLGD_GLOBAL``, ``STATE_FEDLGD_VERSION``). Every random draw of
the client (virtual initialisation, DiffAugment, real-image samples, the warm-up's random networks, batch
shuffles) comes from a ``torch.Generator`` seeded from the OS (``secrets``), which the server cannot know;
``run.seed`` is not used here (the model's initialisation is the server's).

Grids of the local virtual data (one PNG per round in which it changed: warm-up, iterative DM) go to
``fedlgd.local_image_dir``: ``"run"`` (default) = ``<run dir>/virtual/client<pid>-round<r>.png`` when the run
directory the server names exists on this machine (simulations, ``fedkd deploy local``), else nowhere;
``""`` = none; any other value = that folder on the client's machine.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message

from fedkd import keys
from fedkd.distill import class_channel_stats, grid_path, save_virtual_grid
from fedkd.models import model_from_config
from fedkd.privacy.entropy import torch_generator as private_generator  # OS entropy: the server cannot reproduce the client's draws
from fedkd.training import predict_logits
from fedkd.strategies.fedlgd import global_from_record, local_dm, local_loss, local_virtual_init, normalize, stats_record

from . import CLIENTS
from .base import ClientEnv, ClientLogic, reply

RUN_DIR_VALUE = "run"  # fedlgd.local_image_dir: the run directory named by the server, where this machine has it


def real_tensors(data, hp) -> tuple[torch.Tensor, torch.Tensor]:
    """A split's images normalised the way FedLGD works ((x - mean) / std), labels int64."""
    return torch.from_numpy(normalize(data.x, hp).astype(np.float32)), torch.from_numpy(data.y.astype(np.int64))


def image_dir(env: ClientEnv, msg: Message) -> Path | None:
    """Where this client writes grids of its local virtual data (None: nowhere)."""
    d = env.cfg.fedlgd.local_image_dir
    if not d:
        return None
    if d != RUN_DIR_VALUE:
        return Path(d)
    run_dir = str(msg.content[keys.CONFIG].get(keys.FEDLGD_RUN_DIR, "") or "")
    return Path(run_dir) if run_dir and Path(run_dir).is_dir() else None


def virtual_record(images: torch.Tensor, labels: torch.Tensor) -> ArrayRecord:
    return ArrayRecord({"images": Array(images.detach().cpu().numpy().astype(np.float32)), "labels": Array(labels.cpu().numpy().astype(np.int64))})


@CLIENTS.register("fedlgd")
class FedLGDClient(ClientLogic):
    def model(self, msg: Message, env: ClientEnv) -> torch.nn.Module:
        fed = env.federation
        with torch.random.fork_rng(devices=[]):  # the architecture only: its weights are the received ones
            model = model_from_config(env.cfg.model, env.partition_id, fed.input_shape, fed.num_classes)
        model.load_state_dict(msg.content[keys.ARRAYS].to_torch_state_dict())
        return model.to(env.device)

    def train(self, msg: Message, context: Context, env: ClientEnv) -> Message:
        conf, hp, fed = msg.content[keys.CONFIG], env.cfg.fedlgd, env.federation
        phase = str(conf.get(keys.PHASE, keys.FEDLGD_TRAIN_PHASE))
        x, y = real_tensors(env.data.train, hp)
        if phase == keys.FEDLGD_STATS_PHASE:
            return reply(msg, env, {}, **{keys.FEDLGD_STATS: stats_record(class_channel_stats(x, y, fed.num_classes))})
        if phase != keys.FEDLGD_TRAIN_PHASE:
            raise ValueError(f"fedlgd client: unknown phase {phase!r}")
        gx, gy = self.global_data(msg, context)
        gen = private_generator()
        model = self.model(msg, env)
        metrics: dict = {}
        images, labels, changed = self.local_data(msg, context, env, x, y, model, gen, metrics)
        if changed:
            context.state[keys.STATE_FEDLGD_LOCAL] = virtual_record(images, labels)
            out = image_dir(env, msg)
            if out is not None:
                save_virtual_grid(images, labels, grid_path(out, f"client{env.partition_id}", env.server_round), hp.image_mean, hp.image_std)
        t0 = time.perf_counter()
        metrics.update(self.fit(model, images, labels, gx, gy, env, bool(conf[keys.FEDLGD_REFRESH]), gen))
        metrics["fedlgd_train_s"] = time.perf_counter() - t0
        return reply(msg, env, metrics, **{keys.ARRAYS: ArrayRecord({k: v.detach().cpu() for k, v in model.state_dict().items()})})

    @staticmethod
    def global_data(msg: Message, context: Context) -> tuple[torch.Tensor, torch.Tensor]:
        """The global virtual data of the version in force: from the message (then kept) or from the state."""
        version = int(msg.content[keys.CONFIG][keys.FEDLGD_VERSION])
        if keys.FEDLGD_GLOBAL in msg.content.array_records:
            context.state[keys.STATE_FEDLGD_GLOBAL] = msg.content.array_records[keys.FEDLGD_GLOBAL]
            context.state[keys.STATE_FEDLGD_VERSION] = ConfigRecord({"version": version})
        kept = context.state.get(keys.STATE_FEDLGD_VERSION)
        if kept is None or int(kept["version"]) != version or keys.STATE_FEDLGD_GLOBAL not in context.state:
            have = None if kept is None else int(kept["version"])
            raise ValueError(f"fedlgd client holds global virtual data version {have}, the round needs {version}")
        return global_from_record(context.state[keys.STATE_FEDLGD_GLOBAL])

    @staticmethod
    def local_data(msg, context, env, x, y, model, gen, metrics) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """The local virtual data, after this round's warm-up and/or iterative DM; and whether it changed."""
        hp, fed, dev = env.cfg.fedlgd, env.federation, env.device
        rec = context.state.get(keys.STATE_FEDLGD_LOCAL)
        changed = False
        if rec is None:
            images, labels = local_virtual_init(x, y, fed.num_classes, hp, gen, device=dev)
            t0 = time.perf_counter()

            def factory():
                return model_from_config(env.cfg.model, env.partition_id, fed.input_shape, fed.num_classes)

            losses = local_dm(images, labels, x.to(dev), y.to(dev), hp, gen, net_factory=factory)
            metrics.update({"fedlgd_warmup_s": time.perf_counter() - t0, "fedlgd_warmup_iterations": len(losses)})
            if losses:
                metrics.update({"fedlgd_warmup_loss_first": losses[0], "fedlgd_warmup_loss_last": losses[-1]})
            changed = True
        else:
            images = torch.from_numpy(rec["images"].numpy().copy()).to(dev)
            labels = torch.from_numpy(rec["labels"].numpy().copy()).to(dev)
        if bool(msg.content[keys.CONFIG][keys.FEDLGD_LOCAL_DM]) and hp.dm_iterations > 0:
            t0 = time.perf_counter()
            losses = local_dm(images, labels, x.to(dev), y.to(dev), hp, gen, embedder=model)
            metrics.update({"fedlgd_dm_s": time.perf_counter() - t0, "fedlgd_dm_loss_first": losses[0], "fedlgd_dm_loss_last": losses[-1]})
            changed = True
        return images.detach(), labels, changed

    @staticmethod
    def fit(model, images, labels, gx, gy, env: ClientEnv, refresh: bool, gen: torch.Generator) -> dict:
        """``train.local_epochs`` of SGD on local + global virtual data (FedLGD's loss); the training metrics."""
        t, hp, dev = env.cfg.train, env.cfg.fedlgd, env.device
        gx, gy = gx.to(dev), gy.to(dev)
        vx, vy = torch.cat([images.to(dev), gx]), torch.cat([labels.to(dev), gy])  # (M + S, C, H, W), (M + S,)
        opt = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
        model.train()
        ce_sum = align_sum = 0.0
        seen = 0
        for _ in range(t.local_epochs):
            perm = torch.randperm(len(vy), generator=gen).to(dev)
            for start in range(0, len(vy), t.batch_size):
                idx = perm[start : start + t.batch_size]
                xb, yb = vx[idx], vy[idx]
                loss, ce, align = local_loss(model, xb, yb, gx, gy, hp, refresh)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                ce_sum += ce.item() * len(yb)
                align_sum += align.item() * len(yb)
                seen += len(yb)
        n = max(seen, 1)
        return {keys.NUM_EXAMPLES: len(vy), keys.LOSS: ce_sum / n, "fedlgd_align_loss": align_sum / n, "fedlgd_refresh_round": int(refresh)}

    def evaluate(self, msg: Message, context: Context, env: ClientEnv) -> Message:
        """FedAvg's evaluation: the global model on this client's own test split, normalised as in training."""
        x, y = real_tensors(env.data.test, env.cfg.fedlgd)
        logits = predict_logits(self.model(msg, env), x, env.device)  # (N, K)
        loss = float(torch.nn.functional.cross_entropy(logits, y)) if len(y) else float("nan")
        acc = float((logits.argmax(1) == y).float().mean()) if len(y) else float("nan")
        return reply(msg, env, {keys.NUM_EXAMPLES: len(y), keys.LOSS: loss, keys.ACCURACY: acc})
