"""Fitting FastGDA's head to teacher rankings (docs/methods.md §2), and the share temperature to the teacher's top set."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from .. import embed, metrics
from ..config import DistillSettings
from ..errors import AuditError
from ..features import head_space_scores


# ---------------------------------------------------------------------- head training
@dataclass
class Rankings:
    """Per query: its feature index, candidate training indices (rows of the training matrix) and teacher ranks."""

    query_features: np.ndarray
    candidates: list[np.ndarray]
    ranks: list[np.ndarray]


def _targets(ranks: np.ndarray) -> np.ndarray:
    # Rank 1 → 1.0, last rank → 1/n: the teacher's ordering as a soft label (FastGDA's j/n, top = most influential).
    n = len(ranks)
    return 1.0 - (ranks - 1) / n


def _val_map(
    head: embed.ProjectionHead,
    data: Rankings,
    train_features: torch.Tensor,
    k: int,
    log_strength: torch.Tensor | None = None,
) -> float:
    head.eval()
    with torch.no_grad():
        t = head(train_features)
        if log_strength is not None:
            t = t * log_strength.exp()[:, None]
        q = head(torch.as_tensor(data.query_features), query=True)
        sims = (q @ t.T).numpy()
    head.train()
    all_idx = np.arange(len(train_features))
    return float(
        np.mean(
            [
                metrics.average_precision(
                    all_idx[np.argsort(-sims[i], kind="stable")], set(c[np.argsort(r)[:k]].tolist())
                )
                for i, (c, r) in enumerate(zip(data.candidates, data.ranks))
            ]
        )
    )


@dataclass
class FitResult:
    head: embed.ProjectionHead
    best_val_map: float
    epochs: int
    history: list[dict] = field(default_factory=list)
    # Per training row, centred on the rows some training pair reached and 0 (strength 1) for the others: the bundle's
    # convention, in which an image without a strength counts as a typical one.
    log_strength: np.ndarray | None = None
    touched: np.ndarray | None = None  # the training rows some training pair (candidate or negative) reached

    def scores(self, q_feat: np.ndarray, t_feat: np.ndarray) -> np.ndarray:
        """Queries × training rows, as the bundle made from this fit ranks them."""
        return head_space_scores(
            self.head, q_feat, t_feat, None if self.log_strength is None else np.exp(self.log_strength)
        )


def _calibrate(head: embed.ProjectionHead, q_feat: torch.Tensor, t_feat: torch.Tensor, q_idx, t_idx, target) -> None:
    """Fit the score's scale and bias to the untrained head's cosines (a logistic regression) before training: from the
    default calibration the first epochs spend themselves on it and scramble the ranking the head starts from."""
    head.eval()
    with torch.no_grad():
        cosines = (head(q_feat[q_idx], query=True) * head(t_feat[t_idx])).sum(-1)
    head.train()
    y = torch.as_tensor(target)
    params = torch.tensor([float(head.scale.detach().log()), float(head.bias.detach())], requires_grad=True)
    opt = torch.optim.LBFGS([params], max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(params[0].exp() * cosines + params[1], y)
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        head.scale.fill_(float(params[0].exp()))
        head.bias.fill_(float(params[1]))


def fit_head(
    train: Rankings,
    val: Rankings | None,
    train_features: np.ndarray,
    s: DistillSettings,
    progress: Callable[[dict], None] = lambda row: None,
) -> FitResult:
    """FastGDA's head: BCE between scale·cos(h(q), h(t))·strength(t) + bias and the normalised teacher rank; AdamW; early
    stopping on val mAP@k of the weights' moving average. strength(t) = exp(a_t), one free a_t per training row (L2 toward 0), when `s.strengths`.
    Without `val`: exactly `s.epochs` epochs, keeping the last moving average (`fit`'s refit)."""
    torch.manual_seed(s.seed)
    rng = np.random.default_rng(s.seed)
    in_dim = train_features.shape[1]
    head = embed.ProjectionHead(in_dim, list(s.hidden_dims), s.out_dim, s.layernorm, s.dropout, s.residual, s.query_map)
    t_feat = torch.as_tensor(train_features, dtype=torch.float32)
    q_feat = torch.as_tensor(train.query_features, dtype=torch.float32)
    log_strength = torch.nn.Parameter(torch.zeros(len(t_feat))) if s.strengths else None
    groups = [{"params": list(head.parameters()), "weight_decay": s.weight_decay}]
    if log_strength is not None:
        groups.append({"params": [log_strength], "weight_decay": 0.0})  # its own L2 term below
    opt = torch.optim.AdamW(groups, lr=s.lr)
    q_idx = np.concatenate([np.full(len(c), i) for i, c in enumerate(train.candidates)])
    t_idx = np.concatenate(train.candidates)
    target = np.concatenate([_targets(r) for r in train.ranks]).astype(np.float32)
    in_candidates = [set(c.tolist()) for c in train.candidates]
    touched = np.zeros(len(t_feat), bool)
    touched[t_idx] = True
    _calibrate(head, q_feat, t_feat, q_idx, t_idx, target)

    # Validation and the bundle see a moving average of the weights over the optimiser's steps (`s.ema` per step; 0
    # = the weights themselves): from step to step the ranking the validation mAP scores jitters, and early stopping
    # would pick a lucky epoch of that jitter.
    trained = torch.nn.Module()
    trained.head, trained.log_strength = head, log_strength
    average = torch.optim.swa_utils.AveragedModel(
        trained, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(s.ema)
    )

    def validate() -> float:
        if val is None:
            return float("nan")
        return _val_map(average.module.head, val, t_feat, s.k, average.module.log_strength)

    def state():
        kept = average.module
        return (
            {k: v.detach().clone() for k, v in kept.head.state_dict().items()},
            None if kept.log_strength is None else kept.log_strength.detach().clone(),
        )

    # Epoch 0 is the untrained head: with `residual` that is the untuned ranking, the bar training must clear.
    best = (validate(), state(), 0)
    history = [{"epoch": 0, "loss": float("nan"), "val_map": best[0]}]
    for epoch in range(1, s.epochs + 1):
        order = rng.permutation(len(t_idx))
        qi, ti, y = q_idx[order].copy(), t_idx[order].copy(), target[order].copy()
        # A fraction of pairs become out-of-candidate negatives with the last rank's target (0).
        for j in np.flatnonzero(rng.random(len(ti)) < s.negatives):
            outside = len(t_feat) - len(in_candidates[qi[j]])
            if outside == 0:
                continue  # every training image is a candidate of this query: no negative to draw
            while True:
                candidate = int(rng.integers(len(t_feat)))
                if candidate not in in_candidates[qi[j]]:
                    break
            ti[j], y[j] = candidate, 0.0
        touched[ti] = True
        total = 0.0
        for start in range(0, len(ti), s.batch_size):
            sl = slice(start, start + s.batch_size)
            q = head(q_feat[qi[sl]], query=True)
            t = head(t_feat[ti[sl]])
            cosine = (q * t).sum(-1)
            if log_strength is not None:
                cosine = cosine * log_strength[ti[sl]].exp()
            logits = head.scale * cosine + head.bias
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.as_tensor(y[sl]))
            if log_strength is not None:
                loss = loss + s.strength_decay * (log_strength**2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            average.update_parameters(trained)
            total += loss.item() * len(y[sl])
        val_map = validate()
        row = {"epoch": epoch, "loss": total / len(ti), "val_map": val_map}
        history.append(row)
        progress(row)
        if val is None or val_map > best[0]:
            best = (val_map, state(), epoch)
        elif epoch - best[2] >= s.patience:
            break
    head.load_state_dict(best[1][0])
    head.eval()
    log_strength = None
    if best[1][1] is not None:
        learned = best[1][1].numpy()
        log_strength = np.where(touched, learned - learned[touched].mean(), 0.0)
    return FitResult(head, best[0], best[2], history, log_strength, touched)


def fit(
    fit_set: Rankings,
    val: Rankings,
    train_features: np.ndarray,
    s: DistillSettings,
    progress: Callable[[dict], None] = lambda row: None,
) -> tuple[FitResult, FitResult]:
    """(the validation run, the head to ship). Early stopping on the validation queries picks the number of epochs; with
    `s.refit` the head is then trained again, from the same seed, on fit + validation queries for that many epochs, so
    the validation prompts are fitted too: on the example world the held-out gain follows the number of training prompts
    far more than the queries per prompt (half the prompts: +0.137 → +0.058; half of every prompt's queries: +0.133;
    experiments/prompt_curve/PROMPT_CURVE.md).
    Without refit, or when no epoch beat the untrained head, both are the validation run."""
    selected = fit_head(fit_set, val, train_features, s, progress)
    if not s.refit or selected.epochs == 0:
        return selected, selected
    both = Rankings(
        np.concatenate([fit_set.query_features, val.query_features]),
        fit_set.candidates + val.candidates,
        fit_set.ranks + val.ranks,
    )
    final = fit_head(
        both, None, train_features, replace(s, epochs=selected.epochs), lambda row: progress({**row, "refit": True})
    )
    return selected, final


def fit_temperature(scores: list[np.ndarray], positives: list[np.ndarray]) -> tuple[float, float]:
    """AbC's soft attribution: the τ maximising the likelihood of the true set under p ∝ exp((s − s_max)/τ).
    scores[i]: one query's candidate scores; positives[i]: boolean mask of its true influencers (uniform target).
    Returns (τ, mean negative log-likelihood at τ)."""
    from scipy.optimize import minimize_scalar

    pairs = [(s, p) for s, p in zip(scores, positives) if p.any()]
    if not pairs:
        raise AuditError("no query has a teacher-positive among its top candidates; cannot calibrate the temperature")

    def nll(log_tau: float) -> float:
        total = 0.0
        for s, p in pairs:
            z = (s - s.max()) / np.exp(log_tau)
            log_p = z - np.log(np.exp(z).sum())
            total -= log_p[p].mean()
        return total / len(pairs)

    best = minimize_scalar(nll, bounds=(np.log(1e-4), np.log(10.0)), method="bounded", options={"xatol": 1e-4})
    return float(np.exp(best.x)), float(best.fun)


def calibration_error(scores: list[np.ndarray], positives: list[np.ndarray], tau: float, bins: int = 10) -> float:
    """Expected calibration error of shares against the teacher's top set as a uniform distribution."""
    shares, truth = [], []
    for s, p in zip(scores, positives):
        if not p.any():
            continue
        shares.append(embed.softmax_shares(s[None], tau)[0])
        truth.append(p / p.sum())
    shares, truth = np.concatenate(shares), np.concatenate(truth)
    edges = np.quantile(shares, np.linspace(0, 1, bins + 1))
    which = np.clip(np.searchsorted(edges, shares, side="right") - 1, 0, bins - 1)
    # Σ_b (n_b / N)·|mean share − mean truth| over equal-count bins of the predicted share.
    return float(sum(abs(shares[which == b].sum() - truth[which == b].sum()) for b in range(bins)) / len(shares))


def split_validation(queries, q_feat: np.ndarray, s: DistillSettings) -> tuple[Rankings, Rankings, np.ndarray]:
    """(fit, validation, is_val) of load_rankings rows: validation by prompt, like the test split, so validation prompts
    are never fitted."""
    prompts = sorted({q[2] or "" for q in queries})
    val_prompts = set(
        np.random.default_rng(s.seed).permutation(prompts)[: max(1, int(round(len(prompts) * s.val_fraction)))].tolist()
    )
    is_val = np.array([(q[2] or "") in val_prompts for q in queries])

    def subset(mask):
        return Rankings(
            q_feat[mask], [q[3] for q, m in zip(queries, mask) if m], [q[4] for q, m in zip(queries, mask) if m]
        )

    return subset(~is_val), subset(is_val), is_val
