"""Ranking agreement measures shared by `confirm` and the evaluations, and how their tables are printed."""

from __future__ import annotations

import numpy as np


def average_precision(ranking: np.ndarray, positives: set) -> float:
    """AP of a ranking (best first) against a set of positives; a positive the ranking never reaches counts as missed."""
    if not positives:
        return float("nan")
    hits, total = 0, 0.0
    for position, item in enumerate(ranking.tolist(), start=1):
        if item in positives:
            hits += 1
            total += hits / position
    return total / len(positives)


def map_at_k(ids: np.ndarray, student: np.ndarray, teacher: np.ndarray, k: int) -> float:
    """FastGDA's mAP@k for one query: positives = the teacher's top-k, ranked by the student's scores (docs/methods.md §2)."""
    positives = set(ids[np.argsort(-teacher, kind="stable")[:k]].tolist())
    return average_precision(ids[np.argsort(-student, kind="stable")], positives)


def ranks(scores: np.ndarray) -> np.ndarray:
    """1-based ranks, highest score first, ties in input order: how teacher rankings are stored."""
    rank = np.empty(len(scores), np.int32)
    rank[np.argsort(-np.asarray(scores), kind="stable")] = np.arange(1, len(scores) + 1)
    return rank


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 2:
        return float("nan")
    ra = np.argsort(np.argsort(a, kind="stable"), kind="stable").astype(float)
    rb = np.argsort(np.argsort(b, kind="stable"), kind="stable").astype(float)
    ra -= ra.mean()
    rb -= rb.mean()
    denom = np.sqrt((ra**2).sum() * (rb**2).sum())
    return float((ra * rb).sum() / denom) if denom else float("nan")


def mean_se(values) -> tuple[float, float]:
    """Mean and its standard error over queries."""
    n = len(values)
    return float(np.mean(values)), float(np.std(values, ddof=1) / np.sqrt(n)) if n > 1 else 0.0


def markdown_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in rows])
