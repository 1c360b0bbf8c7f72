"""The speed options keep what a scan attributes: reduced JPEG decoding, half-precision towers, the matrix-product
search (issue #27). Each compares against the full-precision path on the small world."""

import csv
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from auditor import embed, ingest
from auditor.errors import AuditError
from auditor.search import ExactSearcher, MatrixSearcher, VectorTable

from . import small_world

LIMITS = ingest.Limits()
WORLD = Path(__file__).resolve().parents[1] / "examples" / "digits_world"


def _jpeg(image: Image.Image, orientation: int | None = None, quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    exif = Image.Exif()
    if orientation:
        exif[ingest.EXIF_ORIENTATION] = orientation
    image.save(buffer, "JPEG", quality=quality, exif=exif.tobytes())
    return buffer.getvalue()


def _photo(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray((rng.random((24, 32, 3)) * 255).astype(np.uint8)).resize((width, height), Image.BICUBIC)
    noisy = np.asarray(coarse, np.int16) + rng.integers(-8, 9, (height, width, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def test_a_jpeg_decodes_at_the_smallest_dct_scale_the_encoder_allows():
    data = _jpeg(_photo(1024, 768), orientation=6)  # rotated 90 degrees: 768 wide, 1024 high once oriented
    full, _, full_size = ingest.decode_sized(data, LIMITS)
    reduced, _, size = ingest.decode_sized(data, LIMITS, reduce_to=224)
    assert full.size == full_size == size == (768, 1024)
    assert reduced.size == (384, 512)  # 1/2: 1/4 would leave the shorter side at 192 < 224
    assert ingest.decode_sized(data, LIMITS, reduce_to=96)[0].size == (96, 128)  # 1/8
    # What the encoder sees differs by resampling only.
    preprocess = embed.Preprocess(224, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    difference = np.abs(preprocess(full) - preprocess(reduced)) * 0.25 * 255
    assert difference.mean() < 2.0, difference.mean()

    # The pixel limit applies to the declared size, never to the reduced decode.
    with pytest.raises(ingest.IngestError) as refused:
        ingest.decode(data, ingest.Limits(max_pixels=500_000), reduce_to=96)
    assert refused.value.code == "too_many_pixels"

    # load_item asks the transform (an encoder's Preprocess) and records the full size.
    path_item = _load(data, preprocess)
    assert (path_item.width, path_item.height) == (768, 1024)
    assert path_item.pixels.shape == (3, 224, 224)


def _load(data: bytes, transform, reduce_to=None):
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "image.jpg")
        with open(path, "wb") as fh:
            fh.write(data)
        return ingest.load_item(path, LIMITS, transform, reduce_to=reduce_to)


def test_png_and_webp_decode_at_full_size_and_keep_their_stealth_metadata():
    image = _photo(512, 512)
    for fmt in ("PNG", "WEBP"):
        buffer = io.BytesIO()
        image.save(buffer, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
        decoded, info, size = ingest.decode_sized(buffer.getvalue(), LIMITS, reduce_to=64)
        assert decoded.size == size == (512, 512), fmt  # no reduced decoding for these formats in Pillow


def _top_k(searcher, encoder, items, k):
    features = encoder.features(np.stack([item.pixels for item in items]), [item.text for item in items])
    return searcher.search(features, k)[0]


def _overlap(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([len(set(x) & set(y)) / len(x) for x, y in zip(a, b)]))


def _as_jpegs(paths, folder, size: int = 256) -> list[str]:
    """The outputs as they might be stored: size px JPEGs (quality 90), so a 32 px encoder's 1/8 scale applies."""
    folder.mkdir()
    jpegs = []
    for n, path in enumerate(paths):
        image = ingest.decode(open(path, "rb").read(), LIMITS)[0].resize((size, size), Image.BICUBIC)
        jpegs.append(str(folder / f"{n:04d}.jpg"))
        with open(jpegs[-1], "wb") as fh:
            fh.write(_jpeg(image, quality=90))
    return jpegs


@pytest.fixture(scope="module")
def example_world():
    """The example world's trained encoder, its 1,617 training vectors (in memory, as `audit index` makes them) and
    its outputs, decoded at full size."""
    if not (WORLD / "training" / "contributors.csv").is_file():
        pytest.skip("examples/digits_world is not built")
    encoder = embed.load(WORLD / "encoder", "cpu")
    with open(WORLD / "training" / "contributors.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    training = [ingest.load_item(str(WORLD / "training" / r["path"]), LIMITS, encoder.preprocess) for r in rows]
    vectors = np.concatenate(
        [
            encoder.index_features(
                np.stack([item.pixels for item in training[i : i + 256]]),
                [r["caption"] for r in rows[i : i + 256]],
                [item.sha256 for item in training[i : i + 256]],
            )
            for i in range(0, len(rows), 256)
        ]
    )
    searcher = MatrixSearcher(None, ids=np.arange(len(rows)), vectors=vectors)
    outputs = [ingest.load_item(p, LIMITS, encoder.preprocess, reduce_to=0) for p in ingest.discover(WORLD / "outputs")]
    return encoder, searcher, [item for item in outputs if item.error is None]


def test_reduced_decoding_keeps_the_example_worlds_top_k(example_world, tmp_path):
    encoder, searcher, outputs = example_world
    jpegs = _as_jpegs([item.path for item in outputs], tmp_path / "jpeg")
    full = [ingest.load_item(p, LIMITS, encoder.preprocess, reduce_to=0) for p in jpegs]
    reduced = [ingest.load_item(p, LIMITS, encoder.preprocess) for p in jpegs]
    for item, output in zip(full + reduced, outputs + outputs):
        item.text = output.text  # the prompts stay in the PNGs; only the pixels are compared
    assert {(item.width, item.height) for item in reduced} == {(256, 256)}
    overlap = _overlap(_top_k(searcher, encoder, full, 10), _top_k(searcher, encoder, reduced, 10))
    print(f"example world: top-10 overlap, 1/8-scale vs full JPEG decoding, {len(jpegs)} outputs: {overlap:.4f}")
    assert overlap >= 0.99  # 0.9905 when written


def test_bf16_and_fp16_towers_keep_the_example_worlds_top_k(example_world):
    encoder, searcher, outputs = example_world
    fp32 = _top_k(searcher, encoder, outputs, 10)
    for precision in ("bf16", "fp16"):
        half = embed.load(WORLD / "encoder", "cpu", precision=precision)
        assert half.id == encoder.id
        overlap = _overlap(fp32, _top_k(searcher, half, outputs, 10))
        print(f"example world: top-10 overlap, {precision} vs fp32 towers, {len(outputs)} outputs: {overlap:.4f}")
        assert overlap >= 0.99  # bf16 0.9915, fp16 0.998 when written


def test_small_world_speed_options_stay_close(indexed_ws, tmp_path):
    """The random tiny test encoder scores near-ties (median gap between the 10th and 11th best 0.0002, against
    0.002 for the example world's trained encoder), so its top-10 moves more under any rounding: a looser bound."""
    fp32 = embed.load(indexed_ws.encoder_dir(), "cpu")
    bf16 = embed.load(indexed_ws.encoder_dir(), "cpu", precision="bf16")
    searcher = VectorTable.for_encoder(indexed_ws.lancedb_uri, fp32, indexed_ws.config.index).searcher()
    outputs = small_world.build_outputs(tmp_path / "outputs", n=96, seed=5)
    jpegs = _as_jpegs(ingest.discover(outputs), tmp_path / "jpeg")
    full = [ingest.load_item(p, LIMITS, fp32.preprocess, reduce_to=0) for p in jpegs]
    reduced = [ingest.load_item(p, LIMITS, fp32.preprocess) for p in jpegs]
    base = _top_k(searcher, fp32, full, 10)
    assert bf16.features(np.stack([full[0].pixels]), [full[0].text]).dtype == np.float32
    decoding, precision = (
        _overlap(base, _top_k(searcher, fp32, reduced, 10)),
        _overlap(base, _top_k(searcher, bf16, full, 10)),
    )
    print(f"small world: top-10 overlap, reduced decoding {decoding:.4f}, bf16 {precision:.4f}")
    assert decoding >= 0.95 and precision >= 0.95
    with pytest.raises(AuditError, match="precision"):
        embed.load(indexed_ws.encoder_dir(), "cpu", precision="fp8")


def test_the_matrix_product_search_returns_what_the_exact_search_does(tmp_path):
    rng = np.random.default_rng(0)
    dim, n = 48, 3000
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    table = VectorTable(str(tmp_path / "lance"), "enc", dim, ingest_settings())
    table.add(np.arange(10, n + 10), ["c"] * n, vectors)
    queries = rng.standard_normal((130, dim)).astype(np.float32)
    exact = table.searcher(device="cpu")
    assert isinstance(exact, ExactSearcher)  # the CPU keeps numpy's exact search
    matrix = MatrixSearcher(table, "cpu")
    for k in (1, 10, 50, 500, n + 5):
        (ids, scores), (mids, mscores) = exact.search(queries, k), matrix.search(queries, k)
        if k <= 50:  # deeper, random unit vectors have near-ties that numpy's and torch's last bits order either way
            assert np.array_equal(ids, mids)
        assert np.allclose(scores, mscores, atol=1e-5)
    assert matrix.search(queries[:0], 5)[0].shape == (0, 5)


def ingest_settings():
    from auditor.config import IndexSettings

    return IndexSettings()
