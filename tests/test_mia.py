"""Membership inference: subject-level (Suri et al.) on synthetic subjects, record-level LOSS / LiRA /
RMIA on small plain-PyTorch models, and the metrics the field reports."""

import copy
import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from fedkd.attacks import lira, loss_attack, rmia
from fedkd.attacks import membership as mb
from fedkd.attacks import mia_metrics as mm
from fedkd.attacks import subject_mia as sm
from fedkd.data import ArrayDataset
from fedkd.data.synthetic import generate_subjects
from fedkd.models import build_model
from fedkd.training import train

SHAPE = (1, 8, 8)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread (tests/conftest.py)


# ---------------------------------------------------------------- pure helpers
def test_logit_scaled_confidence_matches_bruteforce_and_is_stable():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(50, 10)) * 3
    y = rng.integers(0, 10, 50)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    py = p[np.arange(50), y]
    np.testing.assert_allclose(lira.logit_scaled_confidence(z, y), np.log(py / (1 - py)), rtol=1e-9)
    extreme = np.array([[200.0, 0.0, -5.0]])  # p_y rounds to 1.0 in float64: the naive form gives inf
    assert lira.logit_scaled_confidence(extreme, np.array([0])) == pytest.approx(200 - np.logaddexp(0.0, -5.0))


def test_calibrate_threshold_separates_known_subjects():
    t = mb.calibrate_threshold(np.array([-3.0, -2.5, -1.0, -0.5, -0.2]), np.array([0, 0, 1, 1, 1], bool))
    assert t == pytest.approx(-1.75)  # halfway between the two scores the best cut separates
    with pytest.raises(mb.MembershipError, match="known member and one known non-member"):
        mb.KnownMembership(np.array([1, 2]), np.array([True, True]))


def test_metrics_tpr_at_low_fpr_auc_csv_and_loglog_png(tmp_path):
    # 1000 non-members at scores 0..999, 10 members: 5 above every non-member, 5 at the bottom
    member = np.r_[np.zeros(1000, bool), np.ones(10, bool)]
    scores = np.r_[np.arange(1000.0), 2000 + np.arange(5.0), -1 - np.arange(5.0)]
    fpr, tpr, _ = mm.roc(scores, member)
    assert mm.tpr_at_fpr(fpr, tpr, 0.001) == pytest.approx(0.5)  # one false positive allowed, none needed
    row = mm.summary(scores, member, "toy", dataset="synthetic")
    assert row["tpr_at_1pct_fpr"] == pytest.approx(0.5) and row["tpr_at_0.1pct_fpr"] == pytest.approx(0.5)
    pairs = sum((a > b) + 0.5 * (a == b) for a in scores[member] for b in scores[~member])  # brute-force AUC
    assert row["auc"] == pytest.approx(pairs / (10 * 1000))
    assert row["fpr_resolved_0.1pct"] and row["dataset"] == "synthetic"
    few = mm.summary(np.r_[0.0, 1, 2, 3], np.array([0, 0, 1, 1], bool), "few")
    assert not few["fpr_resolved_1pct"]  # 2 non-members cannot measure a 1% FPR
    csv = mm.write_csv([row, few], tmp_path / "mia.csv")
    assert mm.frame([row, few]).shape[0] == 2 and csv.read_text().startswith("attack,auc")
    png = mm.plot_roc({"toy": (scores, member)}, tmp_path / "roc_log.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_inputs_are_refused_in_one_line():
    with pytest.raises(mb.MembershipError):
        mm.auc([0.1, 0.2], [True, True])
    with pytest.raises(mb.MembershipError, match="shapes"):
        lira.lira_scores_from_phi(np.zeros(3), np.zeros((4, 2)), np.zeros((4, 2), bool))
    with pytest.raises(mb.MembershipError, match="no reference model"):
        lira.lira_scores_from_phi(np.zeros(2), np.zeros((2, 2)), np.array([[True, False], [True, False]]))
    with pytest.raises(mb.MembershipError, match="gamma"):
        rmia.RMIAParams(gamma=0)


# ---------------------------------------------------------------- subject MIA on synthetic subjects
def _subject_federation(rounds=12, seed=0):
    """60 subjects (separation 5); members 0..29, each member's 12 records spread over two of four
    clients; subjects 30..59 are held by no client. FedAvg (2 local epochs) in process; returns the
    global model of every round (round 0 = initial) and the subjects' generative model."""
    _, model, _, _ = generate_subjects(num_subjects=60, records_per_subject=1, num_clients=1, subjects_per_client=1, clients_per_subject=1, separation=5.0, seed=seed)
    rng = np.random.default_rng(seed)
    held = [[] for _ in range(4)]
    for s in range(30):
        x, y = model.sample(s, 12, rng)
        for i in range(12):
            held[(s + i % 2) % 4].append((x[i], y[i]))
    clients = [ArrayDataset(np.stack([a for a, _ in c]), np.array([b for _, b in c]), 10) for c in held]
    torch.manual_seed(seed)
    glob = build_model("mlp", SHAPE, 10, hidden=(256, 256))
    seen = [mb.ModelObservation.of(glob, "mlp", SHAPE, 10, 0)]
    for r in range(1, rounds + 1):
        states = []
        for c, d in enumerate(clients):
            m = copy.deepcopy(glob)
            train(m, d, epochs=2, batch_size=16, lr=0.05, momentum=0.9, seed=100 * r + c)
            states.append(m.state_dict())
        glob.load_state_dict({k: sum(s[k] for s in states) / len(states) for k in states[0]})
        seen.append(mb.ModelObservation.of(glob, "mlp", SHAPE, 10, r))
    return seen, model


def _adversary_view(model, seed=1):
    """Fresh samples of every subject's distribution (never its training records) and 3 + 3 known subjects."""
    rng = np.random.default_rng(seed)
    xs, ys, ss = [], [], []
    for s in range(60):
        x, y = model.sample(s, 30, rng)
        xs.append(x), ys.append(y), ss.append(np.full(30, s))
    samples = mb.SubjectSamples(np.concatenate(xs), np.concatenate(ys), np.concatenate(ss))
    known = mb.KnownMembership(np.array([0, 1, 2, 40, 41, 42]), np.array([1, 1, 1, 0, 0, 0], bool))
    return samples, known


def test_subject_mia_attacks_a_trained_federation_and_not_an_untrained_model():
    rounds, model = _subject_federation()
    samples, known = _adversary_view(model)
    truth = np.arange(60) < 30
    final = sm.loss_threshold(rounds[-1], samples, known)
    across = sm.loss_across_rounds(mb.RoundsObservation(tuple(rounds)), samples, known)
    unseen = sm.unknown_subjects(final, known)  # measure on the 54 subjects the adversary did not know
    assert mm.auc(final.scores[unseen], truth[unseen]) > 0.8
    assert mm.auc(across.scores[unseen], truth[unseen]) > 0.75
    assert (final.predicted_member[unseen] == truth[unseen]).mean() > 0.7  # the calibrated threshold works
    assert set(np.unique(across.scores)) <= set(range(len(rounds)))  # counts of decreasing rounds
    # the untrained initial model, and a "federation" whose rounds never saw anyone's data
    untrained = sm.loss_threshold(rounds[0], samples, known)
    assert abs(mm.auc(untrained.scores[unseen], truth[unseen]) - 0.5) < 0.2
    noise = []
    for r in range(len(rounds)):
        torch.manual_seed(1000 + r)
        noise.append(mb.ModelObservation.of(build_model("mlp", SHAPE, 10, hidden=(256, 256)), "mlp", SHAPE, 10, r))
    blind = sm.loss_across_rounds(mb.RoundsObservation(tuple(noise)), samples, known)
    assert abs(mm.auc(blind.scores[unseen], truth[unseen]) - 0.5) < 0.2


def test_rounds_must_be_ordered_and_enough():
    m = mb.ModelObservation.of(build_model("mlp", SHAPE, 10), "mlp", SHAPE, 10, 3)
    with pytest.raises(mb.MembershipError, match="increasing"):
        mb.RoundsObservation((m, m))
    samples, known = _adversary_view(generate_subjects(num_subjects=60, records_per_subject=1, num_clients=1, subjects_per_client=1, clients_per_subject=1, separation=1.0, seed=0)[1])
    with pytest.raises(mb.MembershipError, match="at least 2 rounds"):
        sm.loss_across_rounds(mb.RoundsObservation((m,)), samples, known)


# ---------------------------------------------------------------- record-level MIA
def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32)[:, None], d.target.astype(np.int64)


def _fit(x, y, seed):
    """An overfit MLP (full-batch Adam, 200 steps): the target and the reference models."""
    torch.manual_seed(seed)
    m = build_model("mlp", SHAPE, 10, hidden=(128, 128))
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(200):
        opt.zero_grad()
        F.cross_entropy(m(xt), yt).backward()
        opt.step()
    return m


@pytest.fixture(scope="module")
def record_setting():
    x, y = _digits()
    perm = np.random.default_rng(0).permutation(len(y))
    cand, pop = perm[:500], perm[500:800]  # candidates; population records no model trains on
    rng = np.random.default_rng(5)
    target_in = rng.random(500) < 0.5  # ground truth: only the metrics see it
    ref_in = mb.balanced_in_mask(8, 500, rng)  # the adversary's own reference training sets: 4 IN, 4 OUT per record
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    target = _fit(x[cand][target_in], y[cand][target_in], 0)
    refs = [_fit(x[cand][ref_in[i]], y[cand][ref_in[i]], i + 1) for i in range(len(ref_in))]
    torch.set_num_threads(before)
    return {
        "target": mb.TargetOutputs(mb.logits_of(target, x[cand]), y[cand]),
        "refs": mb.ReferenceOutputs(np.stack([mb.logits_of(r, x[cand]) for r in refs]), ref_in),
        "population": mb.TargetOutputs(mb.logits_of(target, x[pop]), y[pop]),
        "population_refs": np.stack([mb.logits_of(r, x[pop]) for r in refs]),
        "truth": target_in,
    }


def test_lira_beats_loss_at_low_fpr_on_an_overfit_model(record_setting):
    s = record_setting
    loss = mm.summary(loss_attack.loss_scores(s["target"]), s["truth"], "loss")
    online = mm.summary(lira.lira_scores(s["target"], s["refs"]), s["truth"], "lira-online")
    offline = mm.summary(lira.lira_scores(s["target"], s["refs"], lira.LiRAParams(online=False)), s["truth"], "lira-offline")
    assert online["fpr_resolved_1pct"]
    assert online["tpr_at_1pct_fpr"] > 2 * loss["tpr_at_1pct_fpr"] + 0.02
    assert online["auc"] > loss["auc"] + 0.05
    assert offline["tpr_at_1pct_fpr"] > loss["tpr_at_1pct_fpr"]


def test_rmia_with_few_reference_models_beats_loss(record_setting):
    s = record_setting
    loss = mm.summary(loss_attack.loss_scores(s["target"]), s["truth"], "loss")
    for params in (rmia.RMIAParams(), rmia.RMIAParams(online=False)):
        row = mm.summary(rmia.rmia_scores(s["target"], s["refs"], s["population"], s["population_refs"], params), s["truth"], "rmia")
        assert row["tpr_at_1pct_fpr"] > loss["tpr_at_1pct_fpr"] and row["auc"] > 0.55
    # the score is the share of population records z with LR(x, z) >= gamma: brute force on a slice
    p = rmia.RMIAParams(online=True, gamma=2.0)
    px = rmia.label_probability(s["target"].logits, s["target"].labels)
    rx = rmia.label_probability(s["refs"].logits, s["target"].labels[None])
    pz = rmia.label_probability(s["population"].logits, s["population"].labels)
    rz = rmia.label_probability(s["population_refs"], s["population"].labels[None])
    fast = rmia.rmia_scores_from_probs(px, rx, s["refs"].in_mask, pz, rz, p)
    brute = [np.mean([(px[i] / rx[:, i].mean()) / (pz[j] / rz[:, j].mean()) >= 2.0 for j in range(len(pz))]) for i in range(20)]
    np.testing.assert_allclose(fast[:20], brute)
    a = rmia.tune_offline_a(rx, s["refs"].in_mask, rz, grid=np.array([0.0, 0.5, 1.0]))
    assert a in (0.0, 0.5, 1.0) and math.isfinite(a)


def test_balanced_reference_design():
    mask = mb.balanced_in_mask(8, 300, np.random.default_rng(0))
    assert (mask.sum(0) == 4).all() and 0.4 < mask.mean(1).min() and mask.mean(1).max() < 0.6
