"""FD client (Jeong et al. 2018): CE + beta * distillation toward the global per-label logits.

See ``strategies/fd.py`` for the protocol. The reply carries one (K, K) float32 array: row ``l`` is
the average logit vector the model produced on this client's label-``l`` samples during this round's
local training (zeros for labels it does not hold), and, in its MetricRecord, K label weights:
0/1 for the labels it holds (default, the paper's unweighted average) or the exact per-label sample
counts when ``fd.weighted = true``. Training goes through the shared loop
(``fedkd.training.train``, distillation as a loss term); its randomness is private.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message
from torch.nn import functional as F

from fedkd import keys
from fedkd.training import Batch, train

from . import CLIENTS
from .base import ClientEnv, reply
from .personal import PersonalClient


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), mean over the batch. Both (B, K)."""
    t = temperature
    return F.kl_div(F.log_softmax(student_logits / t, 1), F.log_softmax(teacher_logits / t, 1), reduction="batchmean", log_target=True) * t * t


def train_fd(model, data, *, global_logits: np.ndarray | None, beta: float, temperature: float, epochs: int,
             batch_size: int, lr: float, momentum: float, weight_decay: float, device, seed: int | None = None) -> dict:
    """One FD local update through the shared training loop (distillation as a loss term).
    Returns metrics and the per-label average logits ((K, K), counts (K,))."""
    device = torch.device(device)
    k = data.num_classes
    terms = {}
    if global_logits is not None and beta > 0:
        g = torch.from_numpy(np.asarray(global_logits, dtype=np.float32)).to(device)  # (K, K), NaN rows = unknown
        known = ~torch.isnan(g).any(1)  # (K,)
        g = torch.nan_to_num(g)

        def distill(b: Batch) -> torch.Tensor:
            mask = known[b.y]  # (B,) samples whose label has global logits
            if not mask.any():
                return b.out.sum() * 0.0
            return beta * kd_loss_per_sample(b.out[mask], g[b.y[mask]], temperature).mean()

        terms["distill_loss"] = distill
    sums = torch.zeros(k, k, device=device)  # per-label sum of produced logits
    seen = torch.zeros(k, device=device)

    def accumulate(b: Batch) -> None:
        sums.index_add_(0, b.y, b.out.float())
        seen.index_add_(0, b.y, torch.ones_like(b.y, dtype=sums.dtype))

    res = train(model, data, epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum, weight_decay=weight_decay,
                device=device, seed=seed, loss_terms=terms, on_batch=accumulate)
    avg = (sums / seen.clamp(min=1)[:, None]).cpu().numpy().astype(np.float32)  # (K, K), zero rows if unseen
    counts = np.bincount(data.y, minlength=k).astype(np.int64)  # samples per label held by this client
    dl = res.extra.get("distill_loss", 0.0) / beta if beta > 0 else 0.0
    metrics = {keys.NUM_EXAMPLES: res.num_examples, keys.LOSS: res.loss, keys.ACCURACY: res.accuracy, "distill_loss": dl}
    return {"metrics": metrics, "logits": avg, "counts": counts}


def kd_loss_per_sample(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """(B,) T^2 * KL(softmax(teacher/T) || softmax(student/T)) per sample."""
    t = temperature
    kl = F.kl_div(F.log_softmax(student_logits / t, 1), F.log_softmax(teacher_logits / t, 1), reduction="none", log_target=True)
    return kl.sum(1) * t * t


@CLIENTS.register("fd")
class FDClient(PersonalClient):
    def train(self, msg: Message, context: Context, env: ClientEnv) -> Message:
        model = self.own_model(env, context)
        arrays = msg.content.array_records.get(keys.ARRAYS)
        g = arrays[keys.LOGITS].numpy() if arrays is not None and keys.LOGITS in arrays else None
        t, hp = env.cfg.train, env.cfg.fd
        res = train_fd(
            model, env.data.train, global_logits=g, beta=hp.beta, temperature=hp.temperature,
            epochs=t.local_epochs, batch_size=t.batch_size, lr=t.lr, momentum=t.momentum,
            weight_decay=t.weight_decay, device=env.device, seed=env.noise_seed(),
        )
        self.save(context, model)
        counts = res["counts"] if hp.weighted else (res["counts"] > 0).astype(np.int64)  # unweighted: which labels it holds
        metrics = {**res["metrics"], "resumed": self.resumed, keys.LABEL_COUNTS: [int(c) for c in counts]}
        return reply(msg, env, metrics, **{keys.ARRAYS: ArrayRecord({keys.LOGITS: Array(res["logits"])})})
