"""`audit distill`: teach the fast encoder to rank like the teacher (FastGDA, docs/methods.md §2).

One module per job: collecting.py (collect, and the teacher's replicate), collection.py
(reading rankings back, export and import), fitting.py (the head and the share temperature),
training.py (the bundle). This package exposes their public API.

collect — generate query images from a prompt set with the workspace's model (or take a
          folder), rank each query's candidate set (its nearest training images by the
          untuned backbone) with the AbU teacher, store the rankings. Test queries are
          those whose *prompt* hashes into the test fraction, so no test prompt is ever
          seen in training.
train   — fit the shared MLP head on (query, candidate, normalised teacher rank) with
          binary cross-entropy, early-stopped on validation mAP@k; calibrate the share
          temperature; write a new encoder bundle (the old one is untouched).

Beyond FastGDA, both on by default: a learned influence strength per training image
(`strengths`) and a query map (`query_map`). The teacher's score is a loss change, to first
order the inner product of the query's update with the candidate's gradient, so a training
image whose loss moves a lot under any update ranks high for every query it is a candidate
of; a cosine cannot say that, a per-image factor on it can. And it is not symmetric (a
generated 'five' pulls in training 'sevens' far more often than the reverse), which one head
shared by both sides cannot say; a linear map on the query side can. On the example world,
held-out mAP@10 over the untuned ranking: +0.144 with both, +0.108 without strengths, +0.137
with one shared head (experiments/distill/EVAL.md). Strengths are kept for the training images the teacher ranked.
"""

from .collecting import REPLICATE_SEED, CollectResult, collect, is_test_prompt, replicate
from .collection import (
    QUERIES_FILE,
    RANKINGS_FILE,
    REPLICATES_FILE,
    ImportResult,
    collected_queries,
    current_queries,
    export_collection,
    import_collection,
    load_rankings,
    read_query,
)
from .fitting import FitResult, Rankings, calibration_error, fit, fit_head, fit_temperature, split_validation
from .training import TrainResult, train

__all__ = [
    "QUERIES_FILE",
    "RANKINGS_FILE",
    "REPLICATES_FILE",
    "REPLICATE_SEED",
    "CollectResult",
    "FitResult",
    "ImportResult",
    "Rankings",
    "TrainResult",
    "calibration_error",
    "collect",
    "collected_queries",
    "current_queries",
    "export_collection",
    "fit",
    "fit_head",
    "fit_temperature",
    "import_collection",
    "is_test_prompt",
    "load_rankings",
    "read_query",
    "replicate",
    "split_validation",
    "train",
]
