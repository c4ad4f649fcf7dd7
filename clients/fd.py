"""FD client (Jeong et al. 2018): CE + beta * distillation toward the global per-label logits.

See ``strategies/fd.py`` for the protocol. The reply carries one (K, K) float32 array: row ``l`` is
the average logit vector the model produced on this client's label-``l`` samples during this round's
local training (zeros for labels it does not hold), and the K label counts in its MetricRecord.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message
from torch.nn import functional as F

from fedkd import keys

from . import CLIENTS
from .base import ClientEnv, reply
from .personal import PersonalClient


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), mean over the batch. Both (B, K)."""
    t = temperature
    return F.kl_div(F.log_softmax(student_logits / t, 1), F.log_softmax(teacher_logits / t, 1), reduction="batchmean", log_target=True) * t * t


def train_fd(model, data, *, global_logits: np.ndarray | None, beta: float, temperature: float, epochs: int,
             batch_size: int, lr: float, momentum: float, weight_decay: float, device, seed: int) -> dict:
    """One FD local update. Returns metrics and the per-label average logits ((K, K), counts (K,))."""
    device = torch.device(device)
    model.to(device).train()
    torch.manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    x, y = torch.from_numpy(data.x).to(device), torch.from_numpy(data.y).to(device)  # (N, C, H, W), (N,)
    k = data.num_classes
    g = None
    if global_logits is not None:
        g = torch.from_numpy(np.asarray(global_logits, dtype=np.float32)).to(device)  # (K, K), NaN rows = unknown
        known = ~torch.isnan(g).any(1)  # (K,)
        g = torch.nan_to_num(g)
    sums = torch.zeros(k, k, device=device)  # per-label sum of produced logits
    seen = torch.zeros(k, device=device)
    gen = torch.Generator().manual_seed(seed)
    ce_sum, kd_sum, correct, n_seen = 0.0, 0.0, 0, 0
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=gen).to(device)
        for start in range(0, len(y), batch_size):
            idx = perm[start : start + batch_size]
            xb, yb = x[idx], y[idx]
            out = model(xb)  # (B, K)
            ce = F.cross_entropy(out, yb)
            loss = ce
            kd = torch.zeros((), device=device)
            if g is not None and beta > 0:
                mask = known[yb]  # (B,) samples whose label has global logits
                if mask.any():
                    kd = kd_loss(out[mask], g[yb[mask]], temperature)
                    loss = ce + beta * kd
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sums.index_add_(0, yb, out.detach())
            seen.index_add_(0, yb, torch.ones_like(yb, dtype=sums.dtype))
            ce_sum += ce.item() * len(yb)
            kd_sum += kd.item() * len(yb)
            correct += (out.argmax(1) == yb).sum().item()
            n_seen += len(yb)
    avg = (sums / seen.clamp(min=1)[:, None]).cpu().numpy().astype(np.float32)  # (K, K), zero rows if unseen
    counts = np.bincount(data.y, minlength=k).astype(np.int64)  # samples per label held by this client
    metrics = {keys.NUM_EXAMPLES: len(y), keys.LOSS: ce_sum / max(n_seen, 1), keys.ACCURACY: correct / max(n_seen, 1), "distill_loss": kd_sum / max(n_seen, 1)}
    return {"metrics": metrics, "logits": avg, "counts": counts}


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
            weight_decay=t.weight_decay, device=env.device, seed=env.seed(),
        )
        self.save(context, model)
        metrics = {**res["metrics"], "resumed": self.resumed, keys.LABEL_COUNTS: [int(c) for c in res["counts"]]}
        return reply(msg, env, metrics, **{keys.ARRAYS: ArrayRecord({keys.LOGITS: Array(res["logits"])})})
