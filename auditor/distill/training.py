"""`audit distill train`: the head fitted on the collected rankings, calibrated, and written as a new encoder bundle."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .. import embed
from ..errors import AuditError
from ..features import query_embeddings, training_digests, training_embeddings
from ..workspace import Workspace
from .collection import load_rankings
from .fitting import calibration_error, fit, fit_temperature, split_validation


@dataclass
class TrainResult:
    encoder_id: str
    path: Path
    best_val_map: float
    epochs: int
    temperature: float
    calibration_nll: float
    calibration_ece: float
    seconds: float
    train_queries: int
    val_queries: int
    fitted_queries: int  # the queries the shipped head was fitted on: train, or train + validation after a refit
    history: list[dict]  # per epoch, the validation run's then the refit's (rows with "refit": True)


def train(
    ws: Workspace,
    *,
    out: str | os.PathLike | None = None,
    progress_row: Callable[[dict], None] = lambda row: None,
    announce: Callable[[str], None] = lambda message: None,
    **overrides,
) -> TrainResult:
    """Train the head on the collected train-split rankings and write a new encoder bundle with it."""
    s = ws.config.distill.override(**overrides)
    started = time.perf_counter()
    encoder = embed.load(ws.encoder_dir(), "cpu")
    with ws.reader() as store:
        ids, img, txt = training_embeddings(ws, store, encoder)
        digests = training_digests(store)
        index_of = {int(i): j for j, i in enumerate(ids)}
        queries, images = load_rankings(store, "train", index_of, ws.limits, announce)
    if len(queries) < 4:
        raise AuditError(f"only {len(queries)} collected training queries; run `audit distill collect` first")
    q_img, q_txt = query_embeddings(encoder, queries, images)
    q_feat = np.concatenate([q_img, q_txt], axis=1)
    t_feat = np.concatenate([img, txt], axis=1)
    fit_set, val, is_val = split_validation(queries, q_feat, s)
    selected, shipped = fit(fit_set, val, t_feat, s, progress_row)
    refitted = shipped is not selected
    n_train, n_val = int((~is_val).sum()), int(is_val.sum())
    fitted = n_train + (n_val if refitted else 0)
    strengths = {}
    if shipped.log_strength is not None:
        strengths = {digests[j]: float(np.exp(shipped.log_strength[j])) for j in np.flatnonzero(shipped.touched)}
    # Calibrate shares over the scan's top-k on the validation queries, by the run that did not fit them: a refit head
    # scores its own training queries more sharply than new ones.
    top_k = ws.config.scan.top_k
    scores, positives = [], []
    for sims, cand, ranks in zip(selected.scores(val.query_features, t_feat), val.candidates, val.ranks):
        top = np.argsort(-sims, kind="stable")[:top_k]
        true = set(cand[np.argsort(ranks)[: s.calibration_k]].tolist())
        scores.append(sims[top])
        positives.append(np.array([i in true for i in top.tolist()]))
    tau, nll = fit_temperature(scores, positives)
    ece = calibration_error(scores, positives, tau)

    config = json.loads((encoder.directory / embed.CONFIG_NAME).read_text())
    config.pop("format")
    head_cfg = {
        "in_dim": t_feat.shape[1],
        "hidden_dims": list(s.hidden_dims),
        "out_dim": s.out_dim,
        "layernorm": s.layernorm,
        "dropout": s.dropout,
        "residual": s.residual,
        "query_map": s.query_map,
        "weights": "head.safetensors",
    }
    weights = {"head.safetensors": shipped.head.state_dict()}
    if strengths:
        config["strengths"] = {"weights": "strengths.safetensors", "images": len(strengths)}
        weights["strengths.safetensors"] = embed.strengths_state(strengths)
    variant = ("" if strengths else "-no-strengths") + ("" if s.query_map else "-shared-head")
    config.update(
        name=f"{encoder.name}-distilled{variant}",
        head=head_cfg,
        temperature=tau,
        distilled={
            "from_encoder": encoder.id,
            "val_map_at_k": selected.best_val_map,
            "k": s.k,
            "epochs": selected.epochs,
            "train_queries": n_train,
            "val_queries": n_val,
            "fitted_queries": fitted,
            "calibration_nll": nll,
            "calibration_ece": ece,
            "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(s).items()},
        },
    )
    target = Path(out) if out else ws.dir / "encoders" / f"{encoder.name}-distilled-{int(time.time())}"
    if target.exists() and any(target.iterdir()):
        raise AuditError(f"{target} already exists and is not empty; choose another --out")
    target.mkdir(parents=True, exist_ok=True)
    for name in {
        config["image_tower"]["weights"],
        *([config["text_tower"]["weights"]] if config.get("text_tower") else []),
    }:
        shutil.copy2(encoder.directory / name, target / name)
    new_id = embed.save(target, config, weights)
    return TrainResult(
        new_id,
        target,
        selected.best_val_map,
        selected.epochs,
        tau,
        nll,
        ece,
        time.perf_counter() - started,
        n_train,
        n_val,
        fitted,
        selected.history + (shipped.history[1:] if refitted else []),
    )
