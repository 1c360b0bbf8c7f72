"""Exact and ANN search agree once the table is large enough to be indexed; appends stay searchable."""

import numpy as np

from auditor.search import ExactSearcher, IndexSettings, VectorTable


def _clustered(n, dim, clusters, rng):
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    x = centres[rng.integers(clusters, size=n)] + 0.35 * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _recall(ann_ids, exact_ids):
    return np.mean([len(set(a) & set(e)) / len(e) for a, e in zip(ann_ids, exact_ids)])


def test_ann_matches_exact_search_and_survives_appends(tmp_path):
    rng = np.random.default_rng(0)
    dim, n = 64, 4000
    vectors = _clustered(n + 500, dim, 40, rng)
    settings = IndexSettings(ann_threshold=2000, nprobes=20, refine_factor=10)
    table = VectorTable(str(tmp_path / "lance"), "enc", dim, settings)
    table.add(np.arange(1, n + 1), ["c"] * n, vectors[:n])
    assert table.maintain() == "IvfPq"
    queries = _clustered(200, dim, 40, rng)

    ann_ids, ann_scores = table.searcher().search(queries, 50)
    exact_ids, exact_scores = table.searcher(exact=True).search(queries, 50)
    recall = _recall(ann_ids, exact_ids)
    print(f"ANN recall@50 vs exact on {n} vectors: {recall:.3f}")
    assert recall >= 0.95
    # Refined ANN scores are exact cosines of the vectors it returns.
    # The index's k-means is unseeded, so an odd query may miss its top hit; what it returns is scored exactly.
    assert (ann_ids[:, 0] == exact_ids[:, 0]).mean() >= 0.95
    assert np.allclose(ann_scores, np.take_along_axis(queries @ vectors.T, ann_ids - 1, axis=1), atol=1e-4)

    # Appending keeps the index usable: the new rows are found at once (exact delta)...
    table.add(np.arange(n + 1, n + 501), ["c"] * 500, vectors[n:])
    table.maintain()
    stats = table.table.index_stats(table._index_name())
    assert (stats.num_indexed_rows, stats.num_unindexed_rows) == (4000, 500)
    ann_ids, _ = table.searcher().search(vectors[n : n + 50], 1)
    assert (ann_ids[:, 0] == np.arange(n + 1, n + 51)).mean() >= 0.95
    exact_ids, _ = table.searcher(exact=True).search(queries, 50)
    after = _recall(table.searcher().search(queries, 50)[0], exact_ids)
    print(f"ANN recall@50 after appending 500: {after:.3f}")
    assert after >= 0.95
    # ...and once the delta outgrows rebuild_fraction the index is rebuilt over every row.
    table.settings.rebuild_fraction = 0.05
    table.maintain()
    stats = table.table.index_stats(table._index_name())
    assert (stats.num_indexed_rows, stats.num_unindexed_rows) == (4500, 0)
    rebuilt = _recall(table.searcher().search(queries, 50)[0], exact_ids)
    print(f"ANN recall@50 after rebuild: {rebuilt:.3f}")
    assert rebuilt >= 0.95


def test_exact_search_orders_by_cosine(tmp_path):
    table = VectorTable(str(tmp_path / "lance"), "enc", 2, IndexSettings())
    v = np.array([[1, 0], [0.8, 0.6], [0, 1], [-1, 0]], np.float32)
    table.add(np.array([10, 11, 12, 13]), ["a", "b", "c", "d"], v)
    ids, scores = ExactSearcher(table).search(np.array([[1, 0]], np.float32), 3)
    assert ids.tolist() == [[10, 11, 12]]
    assert np.allclose(scores, [[1.0, 0.8, 0.0]])
    assert table.searcher().__class__ is ExactSearcher  # below the threshold: exact


def test_deleting_uncommitted_ids(tmp_path):
    table = VectorTable(str(tmp_path / "lance"), "enc", 2, IndexSettings())
    table.add(np.arange(1, 6), ["a"] * 5, np.ones((5, 2), np.float32))
    table.delete_ids([4, 5, 2])
    assert sorted(table.ids().tolist()) == [1, 3]


def test_inner_product_tables_rank_by_strength_times_cosine_exact_and_ann(tmp_path):
    # A distilled bundle with strengths stores unit features times a per-image strength and searches by inner product:
    # the ANN index must be built for that metric, or it ranks by angle alone.
    rng = np.random.default_rng(3)
    dim, n = 32, 3000
    unit = _clustered(n, dim, 30, rng)
    vectors = unit * np.exp(rng.normal(0, 0.5, n)).astype(np.float32)[:, None]
    table = VectorTable(
        str(tmp_path / "lance"), "enc", dim, IndexSettings(ann_threshold=1000, nprobes=30), metric="dot"
    )
    table.add(np.arange(1, n + 1), ["c"] * n, vectors)
    queries = _clustered(100, dim, 30, rng)
    exact_ids, exact_scores = table.searcher(exact=True).search(queries, 20)
    truth = np.argsort(-(queries @ vectors.T), axis=1)[:, :20] + 1
    assert (exact_ids == truth).all()
    assert table.maintain() == "IvfPq"
    ann_ids, ann_scores = table.searcher().search(queries, 20)
    recall = _recall(ann_ids, exact_ids)
    print(f"inner-product ANN recall@20: {recall:.3f}")
    assert recall >= 0.95
    # The index's k-means is unseeded, so an odd query may miss its top hit; what it returns is scored exactly.
    assert (ann_ids[:, 0] == exact_ids[:, 0]).mean() >= 0.95
    assert np.allclose(ann_scores, np.take_along_axis(queries @ vectors.T, ann_ids - 1, axis=1), atol=1e-4)
    # The cosine order differs: the strengths matter.
    cosine_ids = np.argsort(-(queries @ unit.T), axis=1)[:, :20] + 1
    assert _recall(cosine_ids, exact_ids) < 0.9
