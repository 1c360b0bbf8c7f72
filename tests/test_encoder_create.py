"""`audit encoder create`: bundles from model names in open_clip, timm and transformers, built here from tiny configs with
random weights saved as local files (or laid out as the Hugging Face cache lays them out)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from auditor import bundle, embed
from auditor.cli import app
from auditor.errors import BundleError

TINY_TEXT = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
TINY_VISION = {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16}
CONFIGS = {
    "auditor-tiny": {"embed_dim": 16, "vision_cfg": TINY_VISION, "text_cfg": TINY_TEXT},
    "auditor-tiny-quickgelu": {"embed_dim": 16, "quick_gelu": True, "vision_cfg": TINY_VISION, "text_cfg": TINY_TEXT},
    "auditor-tiny-deep": {"embed_dim": 16, "vision_cfg": {**TINY_VISION, "layers": 3}, "text_cfg": TINY_TEXT},
}
TIMM_TINY = "vit_tiny_patch16_224"
TIMM_KWARGS = {"img_size": 32, "patch_size": 8, "depth": 2}
SNAPSHOT = "0" * 40


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """Tiny open_clip configs registered under their names, a SigLIP-style one with its own tokenizer, and a weight
    file for each."""
    import open_clip
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("open_clip")
    words = ["[PAD]", "[UNK]", "</s>", "a", "red", "blue", "digit", "seven", "on", "paper"]
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", pad_token="[PAD]", eos_token="</s>")
    tok.save_pretrained(str(root / "tokenizer"))
    configs = {
        **CONFIGS,
        "auditor-tiny-SigLIP": {
            "embed_dim": 16,
            "init_logit_bias": -10,
            "custom_text": True,
            "vision_cfg": TINY_VISION,
            "text_cfg": {
                "context_length": 8,
                "vocab_size": len(words),
                "hf_tokenizer_name": str(root / "tokenizer"),
                "tokenizer_kwargs": {"clean": "canonicalize"},
                "width": 32,
                "heads": 2,
                "layers": 1,
                "no_causal_mask": True,
                "proj_bias": True,
                "pool_type": "last",
            },
        },
    }
    (root / "configs").mkdir()
    files = {}
    for name, cfg in configs.items():
        (root / "configs" / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(root / "configs")
    for i, name in enumerate(configs):
        torch.manual_seed(i)
        model = open_clip.create_model(name)
        files[name] = root / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(files[name]))
    return files


@pytest.fixture(scope="module")
def timm_weights(tmp_path_factory):
    import timm

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("timm") / "dino.safetensors"
    save_file(timm.create_model(TIMM_TINY, num_classes=0, **TIMM_KWARGS).state_dict(), str(path))
    return path


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory):
    """A tiny transformers CLIP saved as a local model folder (config.json + model.safetensors)."""
    import transformers

    config = transformers.CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2},
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=24,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("hf") / "tiny-clip"
    transformers.CLIPModel(config).save_pretrained(str(folder))
    return folder


def _pixels(enc, n=2):
    colours = [(200, 20, 20), (20, 20, 200), (20, 160, 40)]
    return np.stack([enc.preprocess(Image.new("RGB", (40, 32), colours[i % 3])) for i in range(n)])


def _activations(enc) -> set[str]:
    return {type(m).__name__ for m in enc._image_model.modules() if type(m).__name__ in ("GELU", "QuickGELU")}


def _cache(root, repo: str, filename: str, source) -> None:
    """Put a file where huggingface_hub's cache keeps `repo`'s `filename` (refs/main → a snapshot)."""
    import shutil

    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(SNAPSHOT)
    (folder / "snapshots" / SNAPSHOT).mkdir(parents=True, exist_ok=True)
    shutil.copy(source, folder / "snapshots" / SNAPSHOT / filename)


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    root = tmp_path / "hf-cache"
    root.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root))
    return root


def test_clip_preset_from_open_clip_matches_open_clip_and_records_its_source(registry, tmp_path):
    import open_clip

    made = bundle.create(tmp_path / "b", "clip", bundle.Source("open_clip", "auditor-tiny", registry["auditor-tiny"]))
    assert made.config["image_tower"]["weights"] == made.config["text_tower"]["weights"] == "backbone.safetensors"
    source = made.config["sources"]["image_tower"]
    assert source["library"] == "open_clip" and source["name"] == "auditor-tiny"
    assert source["sha256"] == bundle.sha256_file(registry["auditor-tiny"])
    enc = embed.load(made.path)
    assert enc.id == made.encoder_id and enc.dim == 32
    reference = open_clip.create_model("auditor-tiny", pretrained=str(registry["auditor-tiny"])).eval()
    pixels = _pixels(enc)
    with torch.no_grad():
        expected = torch.nn.functional.normalize(reference.encode_image(torch.as_tensor(pixels)), dim=-1)
    np.testing.assert_allclose(enc.embed_images(pixels).numpy(), expected.numpy(), atol=1e-5)
    feats = enc.features(pixels, ["a red digit", None])
    assert np.allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)


def test_quickgelu_comes_from_the_config_name_and_the_pretrained_tag(registry, tmp_path, hf_cache, monkeypatch):
    import open_clip.pretrained

    # The same weights under the two names: QuickGELU only where the config says so, and different features.
    weights = registry["auditor-tiny"]
    made = bundle.create(tmp_path / "gelu", "clip", bundle.Source("open_clip", "auditor-tiny", weights))
    # Nothing in the weights tells the activations apart: the create says which config to use for OpenAI's.
    assert "auditor-tiny uses GELU" in made.notes[0] and "auditor-tiny-quickgelu instead" in made.notes[0]
    plain = embed.load(made.path)
    quick = embed.load(
        bundle.create(tmp_path / "quick", "clip", bundle.Source("open_clip", "auditor-tiny-quickgelu", weights)).path
    )
    assert _activations(plain) == {"GELU"} and _activations(quick) == {"QuickGELU"}
    assert not np.allclose(plain.embed_images(_pixels(plain)), quick.embed_images(_pixels(quick)), atol=1e-4)

    # A pretrained tag trained with QuickGELU (as OpenAI's are) sets it under the plain name; weights from the cache.
    monkeypatch.setitem(
        open_clip.pretrained._PRETRAINED,
        "auditor-tiny",
        {"openai": {"hf_hub": "tests/auditor-tiny-openai/", "quick_gelu": True, "mean": [0.5] * 3, "std": [0.2] * 3}},
    )
    _cache(hf_cache, "tests/auditor-tiny-openai", "open_clip_model.safetensors", weights)
    made = bundle.create(tmp_path / "tag", "clip", bundle.Source("open_clip", "auditor-tiny/openai"))
    assert not made.notes
    assert made.config["image_tower"]["model_config"]["quick_gelu"] is True
    assert made.config["image_tower"]["std"] == [0.2] * 3
    tagged = embed.load(made.path)
    assert _activations(tagged) == {"QuickGELU"}
    pixels = _pixels(quick)  # the same pixels: the tag brings its own preprocessing
    np.testing.assert_allclose(tagged.embed_images(pixels), quick.embed_images(pixels), atol=1e-6)
    with pytest.raises(BundleError, match="no pretrained tag 'laion'"):
        bundle.create(tmp_path / "x", "clip", bundle.Source("open_clip", "auditor-tiny/laion"))


def test_siglip_style_config_builds_custom_text_with_its_own_tokenizer(registry, tmp_path):
    name = "auditor-tiny-SigLIP"
    made = bundle.create(tmp_path / "siglip", "clip", bundle.Source("open_clip", name, registry[name]))
    assert made.config["text_tower"]["tokenizer"] == "tokenizer" and (made.path / "tokenizer").is_dir()
    enc = embed.load(made.path)
    assert type(enc._text_model).__name__ == "CustomTextCLIP"
    feats = enc.features(_pixels(enc), ["a red digit", "a blue seven on paper"])
    assert feats.shape == (2, 32)
    assert not np.allclose(feats[0, 16:], feats[1, 16:])
    # The tokenizer is part of the bundle's identity.
    (made.path / "tokenizer" / "tokenizer_config.json").write_text("{}")
    assert embed._hash_bundle(made.path, made.config) != made.encoder_id


def test_dino_clip_stores_only_the_clip_text_tower(registry, timm_weights, tmp_path):
    clip = bundle.Source("open_clip", "auditor-tiny", registry["auditor-tiny"])
    dino = bundle.Source("timm", TIMM_TINY, timm_weights, kwargs=TIMM_KWARGS)
    made = bundle.create(tmp_path / "dc", "dino-clip", clip, dino)
    image, text = made.config["image_tower"], made.config["text_tower"]
    assert (image["library"], image["weights"]) == ("timm", "image.safetensors")
    assert (text["library"], text["tower"], text["weights"]) == ("open_clip", "text", "text.safetensors")
    from safetensors import safe_open

    with safe_open(str(made.path / "text.safetensors"), "pt") as fh:
        assert not any(k.startswith("visual.") for k in fh.keys())
    assert made.config["sources"]["image_tower"]["sha256"] == bundle.sha256_file(timm_weights)
    enc = embed.load(made.path)
    assert enc.image_dim == 192 and enc.text_dim == 16
    # The text half is the full CLIP model's text embedding.
    full = embed.load(bundle.create(tmp_path / "full", "clip", clip).path)
    np.testing.assert_allclose(enc.embed_texts(["a red digit"]), full.embed_texts(["a red digit"]), atol=1e-6)


def test_timm_weights_come_from_the_hf_cache_without_the_classifier(tmp_path, hf_cache, registry):
    import timm

    name = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    torch.manual_seed(1)
    model = timm.create_model(name, **TIMM_KWARGS)  # with its 1000-class head, as published
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    _cache(hf_cache, f"timm/{name}", "model.safetensors", tmp_path / "model.safetensors")
    dino = bundle.Source("timm", name, kwargs=TIMM_KWARGS)
    made = bundle.create(
        tmp_path / "b", "dino-clip", bundle.Source("open_clip", "auditor-tiny", registry["auditor-tiny"]), dino
    )
    assert made.config["sources"]["image_tower"]["file"].startswith(str(hf_cache))
    enc = embed.load(made.path)
    model.reset_classifier(0)
    with torch.no_grad():
        expected = torch.nn.functional.normalize(model.eval()(torch.as_tensor(_pixels(enc))), dim=-1)
    np.testing.assert_allclose(enc.embed_images(_pixels(enc)), expected.numpy(), atol=1e-5)
    with pytest.raises(BundleError, match="not in the local Hugging Face cache"):
        bundle.create(
            tmp_path / "c",
            "dino-clip",
            bundle.Source("open_clip", "auditor-tiny", registry["auditor-tiny"]),
            bundle.Source("timm", "vit_small_patch16_224.dino"),
        )


def test_transformers_clip_for_both_presets(hf_clip, timm_weights, tmp_path):
    import transformers

    made = bundle.create(tmp_path / "hf", "clip", bundle.Source("transformers", str(hf_clip)))
    assert made.config["image_tower"]["model_class"] == "CLIPVisionModelWithProjection"
    assert made.config["text_tower"]["model_class"] == "CLIPTextModelWithProjection"
    enc = embed.load(made.path)
    assert (enc.image_dim, enc.text_dim) == (24, 24)
    reference = transformers.CLIPModel.from_pretrained(str(hf_clip)).eval()
    from open_clip.tokenizer import SimpleTokenizer

    tokens = SimpleTokenizer(context_length=77)(["a red digit"])
    with torch.no_grad():
        image = reference.get_image_features(pixel_values=torch.as_tensor(_pixels(enc)))
        text = reference.get_text_features(input_ids=tokens)
    image = getattr(image, "pooler_output", image)
    text = getattr(text, "pooler_output", text)
    np.testing.assert_allclose(enc.embed_images(_pixels(enc)), torch.nn.functional.normalize(image, dim=-1), atol=1e-5)
    np.testing.assert_allclose(enc.embed_texts(["a red digit"]), torch.nn.functional.normalize(text, dim=-1), atol=1e-5)

    dino = bundle.Source("timm", TIMM_TINY, timm_weights, kwargs=TIMM_KWARGS)
    both = bundle.create(tmp_path / "hf-dc", "dino-clip", bundle.Source("transformers", str(hf_clip)), dino)
    assert both.config["text_tower"]["library"] == "transformers"
    assert {p.name for p in both.path.iterdir()} == {"encoder.json", "image.safetensors", "text.safetensors"}
    np.testing.assert_allclose(embed.load(both.path).embed_texts(["a red digit"]), enc.embed_texts(["a red digit"]))


def test_mismatched_or_missing_weights_are_refused(registry, timm_weights, hf_clip, tmp_path):
    cases = [
        (
            bundle.Source("open_clip", "auditor-tiny-deep", registry["auditor-tiny"]),
            None,
            "12 missing weights \\(e.g. visual.transformer.resblocks.2",
        ),
        (bundle.Source("open_clip", "auditor-tiny", registry["auditor-tiny-deep"]), None, "unexpected weights"),
        (
            bundle.Source("open_clip", "auditor-tiny", registry["auditor-tiny"]),
            bundle.Source("timm", TIMM_TINY, timm_weights, kwargs={**TIMM_KWARGS, "depth": 3}),
            "missing weights",
        ),
        (
            bundle.Source("open_clip", "auditor-tiny", registry["auditor-tiny"]),
            bundle.Source("timm", "vit_small_patch16_224", timm_weights, kwargs=TIMM_KWARGS),
            "size mismatch",
        ),
        (
            bundle.Source("open_clip", "auditor-tiny", tmp_path / "nowhere.safetensors"),
            None,
            "nowhere.safetensors does not exist",
        ),
        (bundle.Source("open_clip", "auditor-tiny"), None, "no weights; pass the weights file"),
        (bundle.Source("open_clip", "no-such-model", registry["auditor-tiny"]), None, "no model config named"),
    ]
    for i, (clip, dino, message) in enumerate(cases):
        with pytest.raises(BundleError, match=message) as info:
            bundle.create(tmp_path / f"b{i}", "dino-clip" if dino else "clip", clip, dino)
        assert "\n" not in str(info.value)
        assert not (tmp_path / f"b{i}").exists()

    from safetensors.torch import load_file

    state = load_file(str(hf_clip / "model.safetensors"))
    state["text_model.extra.weight"] = torch.zeros(2)
    save_file(state, str(tmp_path / "extra.safetensors"))
    with pytest.raises(BundleError, match="1 unexpected weights \\(e.g. text_model.extra.weight\\)"):
        bundle.create(
            tmp_path / "hf", "clip", bundle.Source("transformers", str(hf_clip), tmp_path / "extra.safetensors")
        )


def test_cli_creates_both_presets_and_the_bundle_indexes(registry, timm_weights, training_dir, tmp_path, monkeypatch):
    import shutil

    runner = CliRunner()
    clip = ["--clip", "open_clip:auditor-tiny", "--clip-weights", str(registry["auditor-tiny"])]
    result = runner.invoke(app, ["encoder", "create", "clip", *clip, "--out", str(tmp_path / "clip")])
    assert result.exit_code == 0, result.output
    assert "encoder" in result.output and embed.load(tmp_path / "clip").dim == 32

    dino = ["--dino", f"timm:{TIMM_TINY}", "--dino-weights", str(tmp_path / "vit.safetensors")]
    import timm

    torch.manual_seed(3)
    save_file(timm.create_model(TIMM_TINY, num_classes=0).state_dict(), str(tmp_path / "vit.safetensors"))
    result = runner.invoke(app, ["encoder", "create", "dino-clip", *clip, *dino, "--out", str(tmp_path / "dc")])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "dc" / "encoder.json").read_text())
    assert config["sources"]["preset"] == "dino-clip" and config["image_tower"]["image_size"] == 224

    # A refused create is one line, and leaves nothing behind.
    result = runner.invoke(app, ["encoder", "create", "dino-clip", *clip, "--out", str(tmp_path / "no")])
    assert result.exit_code != 0 and "needs --dino" in str(result.exception)
    assert not (tmp_path / "no").exists()

    # The bundle works through the product: init with it, index a small folder, switch with `audit encoder use`.
    small = tmp_path / "training"
    (small / "ana").mkdir(parents=True)
    for path in sorted((training_dir / "ana").glob("*.png"))[:4]:
        shutil.copy(path, small / "ana" / path.name)
    monkeypatch.chdir(tmp_path)
    for args in (
        ["init", "ws", "--encoder", str(tmp_path / "dc")],
        ["-w", "ws", "index", str(small)],
        ["-w", "ws", "encoder", "use", str(tmp_path / "clip")],
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, (args, result.output, result.exception)
    assert "4 training images embedded" in result.output
