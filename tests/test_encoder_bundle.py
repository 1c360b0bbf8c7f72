"""Encoder bundles: loaded from local files only, with errors that name the file."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from auditor import embed
from auditor.errors import BundleError


def test_features_are_unit_vectors_of_image_and_text(tiny_encoder):
    enc = embed.load(tiny_encoder)
    img = enc.preprocess(Image.new("RGB", (40, 32), (200, 10, 10)))
    assert img.shape == (3, 32, 32)
    feats = enc.features(np.stack([img, img]), ["a red digit", None])
    assert feats.shape == (2, enc.dim) == (2, enc.image_dim + enc.text_dim)
    assert np.allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)
    # A missing prompt leaves the text half empty; the image half carries the whole vector.
    assert np.allclose(feats[1, enc.image_dim :], 0)
    assert not np.allclose(feats[0, enc.image_dim :], 0)


def test_encoder_id_is_a_content_hash(tiny_encoder, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_encoder, copy)
    assert embed.load(copy).id == embed.load(tiny_encoder).id
    state = load_file(str(copy / "backbone.safetensors"))
    state["logit_scale"] = state["logit_scale"] + 1
    save_file(state, str(copy / "backbone.safetensors"))
    assert embed.load(copy).id != embed.load(tiny_encoder).id


def test_missing_bundle_pieces_are_named(tiny_encoder, tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        embed.load(tmp_path / "nowhere")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_encoder, broken)
    (broken / "backbone.safetensors").unlink()
    with pytest.raises(BundleError, match="backbone.safetensors is missing"):
        embed.load(broken)
    (broken / "encoder.json").unlink()
    with pytest.raises(BundleError, match="encoder.json is missing"):
        embed.load(broken)


def test_weights_that_do_not_match_the_config_are_refused(tiny_encoder, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_encoder, bad)
    config = json.loads((bad / "encoder.json").read_text())
    config["image_tower"]["model_config"]["vision_cfg"]["width"] = 96
    (bad / "encoder.json").write_text(json.dumps(config))
    with pytest.raises(BundleError, match="does not match the image_tower config"):
        embed.load(bad)


def test_head_is_applied_and_checked(tiny_encoder, tmp_path):
    base = embed.load(tiny_encoder)
    config = json.loads((tiny_encoder / "encoder.json").read_text())
    head_cfg = {
        "in_dim": base.dim,
        "hidden_dims": [16],
        "out_dim": 8,
        "layernorm": True,
        "dropout": 0.1,
        "weights": "head.safetensors",
    }
    torch.manual_seed(0)
    head = embed.ProjectionHead.from_config(head_cfg)
    target = tmp_path / "headed"
    shutil.copytree(tiny_encoder, target)
    config.pop("format")
    embed.save(target, {**config, "head": head_cfg}, {"head.safetensors": head.state_dict()})
    enc = embed.load(target)
    assert enc.dim == 8 and enc.id != base.id
    img = enc.preprocess(Image.new("RGB", (32, 32), (0, 0, 255)))
    out = enc.features(img[None], ["x"])
    assert out.shape == (1, 8) and np.isclose(np.linalg.norm(out), 1.0, atol=1e-5)


def test_a_query_map_moves_queries_and_not_training_images(tiny_encoder, tmp_path):
    config = json.loads((tiny_encoder / "encoder.json").read_text())
    config.pop("format")
    head_cfg = {
        "in_dim": embed.load(tiny_encoder).dim,
        "hidden_dims": [16],
        "out_dim": 8,
        "layernorm": True,
        "dropout": 0.1,
        "residual": True,
        "weights": "head.safetensors",
    }
    torch.manual_seed(0)
    head = embed.ProjectionHead.from_config({**head_cfg, "query_map": True})
    with torch.no_grad():
        head.query_map.weight.copy_(torch.randn(8, 8))  # as if trained
    paths = {}
    for name, cfg, state in (
        ("mapped", {**head_cfg, "query_map": True}, head.state_dict()),
        ("shared", head_cfg, {k: v for k, v in head.state_dict().items() if not k.startswith("query_map")}),
    ):
        paths[name] = tmp_path / name
        shutil.copytree(tiny_encoder, paths[name])
        embed.save(paths[name], {**config, "head": cfg}, {"head.safetensors": state})
    mapped, shared = embed.load(paths["mapped"]), embed.load(paths["shared"])
    img = mapped.preprocess(Image.new("RGB", (32, 32), (200, 0, 0)))
    # Training images: the same vectors with or without the map. Queries: moved by it, still unit vectors.
    np.testing.assert_allclose(
        mapped.index_features(img[None], ["x"], ["0" * 64]),
        shared.index_features(img[None], ["x"], ["0" * 64]),
        atol=1e-6,
    )
    query = mapped.features(img[None], ["x"])
    assert np.isclose(np.linalg.norm(query), 1.0, atol=1e-5)
    assert (query @ shared.features(img[None], ["x"]).T).item() < 0.99
    assert mapped.id != shared.id


def test_strengths_scale_index_vectors_by_content_and_are_checked(tiny_encoder, tmp_path):
    import hashlib

    config = json.loads((tiny_encoder / "encoder.json").read_text())
    config.pop("format")
    known, other = hashlib.sha256(b"known").hexdigest(), hashlib.sha256(b"other").hexdigest()
    target = tmp_path / "strong"
    shutil.copytree(tiny_encoder, target)
    embed.save(
        target,
        {**config, "strengths": {"weights": "strengths.safetensors"}},
        {"strengths.safetensors": embed.strengths_state({known: 2.5})},
    )
    enc = embed.load(target)
    assert enc.metric == "dot" and embed.load(tiny_encoder).metric == "cosine"
    assert enc.strengths == {known: pytest.approx(2.5)}
    img = enc.preprocess(Image.new("RGB", (32, 32), (0, 90, 0)))
    pixels = np.stack([img, img])
    vectors = enc.index_features(pixels, ["a", "a"], [known, other])
    # The known image's vector is its feature times its strength; an image without one keeps strength 1.
    np.testing.assert_allclose(vectors, enc.features(pixels, ["a", "a"]) * np.array([[2.5], [1.0]]), rtol=1e-6)

    save_file({"log_strength": torch.zeros(3)}, str(target / "strengths.safetensors"))
    with pytest.raises(BundleError, match="lacks the 'sha256' tensor"):
        embed.load(target)
    (target / "strengths.safetensors").unlink()
    with pytest.raises(BundleError, match="strengths weights file strengths.safetensors is missing"):
        embed.load(target)


def test_softmax_shares_sum_to_one_and_sharpen_with_lower_temperature():
    scores = np.array([[0.9, 0.8, 0.1]])
    warm, cold = embed.softmax_shares(scores, 1.0), embed.softmax_shares(scores, 0.01)
    assert np.allclose(warm.sum(), 1) and np.allclose(cold.sum(), 1)
    assert cold[0, 0] > warm[0, 0] > 1 / 3


def test_cuda_request_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        assert embed.resolve_device("cuda").type == "cuda"
    else:
        with pytest.raises(Exception, match="--device cuda"):
            embed.resolve_device("cuda")
    assert embed.resolve_device("cpu").type == "cpu"
