"""Generation metadata from every generator's layout, through `ingest.decode` as a scan reads it, and hostile
metadata that must never fail an image (issues #24, #26)."""

import io
import json
import time

import pytest
from PIL import Image

from auditor.ingest import Limits, decode
from auditor.prompts import (
    GenerationMetadata,
    parse_a1111,
    parse_comfyui,
    read_metadata,
    read_prompt,
    read_sidecar,
)

from . import metadata_fixtures as fx


def meta(data: bytes, path=None, **kwargs) -> GenerationMetadata:
    _, info = decode(data, Limits())
    return read_metadata(None if path is None else str(path), info, **kwargs)


def fields(md: GenerationMetadata, expected: dict) -> dict:
    return {key: getattr(md, key) for key in expected}


def assert_clean(md: GenerationMetadata) -> None:
    """Every string out of the reader encodes as UTF-8 and holds no NUL or other control character."""
    for value in [md.prompt, md.negative_prompt, md.raw, md.generator, md.model_name, md.sampler, *md.warnings]:
        if value is not None:
            value.encode("utf-8")
            assert not any(ch < " " and ch not in "\n\t" for ch in value), repr(value[:80])


# --- AUTOMATIC1111 ---------------------------------------------------------------------------------------------


def test_a1111_png_parameters_chunk():
    md = meta(fx.png({"parameters": fx.A1111}))
    assert md.source == "a1111" and md.warnings == []
    assert fields(md, fx.A1111_EXPECTED) == fx.A1111_EXPECTED
    assert md.raw == fx.A1111


@pytest.mark.parametrize(
    "fmt, encoding", [("JPEG", "utf-16-be"), ("JPEG", "utf-16-le"), ("WEBP", "utf-16-be"), ("WEBP", "utf-16-le")]
)
def test_a1111_exif_user_comment_in_either_utf16_byte_order(fmt, encoding):
    md = meta(fx.with_exif_comment(fx.user_comment(fx.A1111, encoding), fmt))
    assert md.source == "exif"
    assert fields(md, fx.A1111_EXPECTED) == fx.A1111_EXPECTED


@pytest.mark.parametrize(
    "signature, payload",
    [
        ("stealth_pnginfo", fx.A1111.encode()),
        ("stealth_pngcomp", fx.gz(fx.A1111)),
        ("stealth_rgbcomp", fx.gz(fx.A1111)),
    ],
)
def test_a1111_stealth_metadata_in_pixel_lsbs(signature, payload):
    md = meta(fx.stealth_png(payload, signature))
    assert md.source == "a1111_stealth" and md.warnings == []
    assert fields(md, fx.A1111_EXPECTED) == fx.A1111_EXPECTED


def test_a1111_stealth_read_from_a_given_image_when_decode_did_not():
    image = Image.open(io.BytesIO(fx.stealth_png(fx.gz(fx.A1111), "stealth_pngcomp")))
    md = read_metadata(None, {}, image)
    assert md.source == "a1111_stealth" and md.prompt == fx.A1111_EXPECTED["prompt"]


def test_a1111_variants_minimal_text_and_forge():
    md = read_metadata(None, {"parameters": "a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512"})
    assert (md.prompt, md.negative_prompt, md.steps, md.sampler, md.cfg_scale, md.seed, md.width) == (
        "a cat", None, 20, "Euler a", 7.0, 1, 512
    )  # fmt: skip
    assert md.model_hash is None and md.generator == "AUTOMATIC1111"
    forge = read_metadata(None, {"parameters": "a cat\nSteps: 20, Seed: 1, Version: f2.0.1v1.10.1-previous-664"})
    assert forge.generator == "Forge"
    # A prompt whose only line has colons is still a prompt, not a settings line.
    plain = read_metadata(None, {"parameters": "style: anime, color: red, mood: dark"})
    assert plain.prompt == "style: anime, color: red, mood: dark" and plain.steps is None


# --- ComfyUI -----------------------------------------------------------------------------------------------------


def test_comfyui_basic_graph_resolves_the_sampler_positive_input():
    chunks = {"prompt": json.dumps(fx.comfy_basic()), "workflow": json.dumps({"nodes": [], "links": []})}
    md = meta(fx.png(chunks))
    assert md.source == "comfyui" and md.warnings == []
    expected = dict(
        prompt="beautiful scenery nature glass bottle",
        negative_prompt="text, watermark",
        generator="ComfyUI",
        model_name="v1-5-pruned-emaonly.safetensors",
        model_hash=None,
        seed=156680208700286,
        steps=20,
        sampler="euler",
        cfg_scale=8.0,
        width=512,
        height=640,
    )
    assert fields(md, expected) == expected


def test_comfyui_several_prompt_nodes_follow_conditioning_chains_and_primitives():
    md = meta(fx.png({"prompt": json.dumps(fx.comfy_chained())}))
    expected = dict(
        prompt="a red fox\nin the snow",  # ConditioningCombine of a primitive-fed encoder and an SDXL encoder
        negative_prompt="blurry",  # slot 1 of ControlNetApplyAdvanced is its negative
        model_name="sd_xl_base_1.0.safetensors",  # through the LoRA loader
        seed=987654321,
        steps=30,
        sampler="dpmpp_2m",
        cfg_scale=6.0,
        width=1024,  # the first pass's empty latent, not the hires upscale
        height=768,
    )
    assert fields(md, expected) == expected


def test_comfyui_sampler_custom_advanced_reads_guider_noise_scheduler_and_select_nodes():
    md = meta(fx.png({"prompt": json.dumps(fx.comfy_custom_sampler())}))
    expected = dict(
        prompt="a lighthouse at dusk",
        negative_prompt="fog",
        model_name="flux1-dev.safetensors",
        seed=42,
        steps=25,
        sampler="euler",
        cfg_scale=1.0,
        width=832,
        height=1216,
    )
    assert fields(md, expected) == expected


def test_comfyui_graph_without_a_sampler_guesses_and_says_so():
    graph = {
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "b"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "a"}},
    }
    md = read_metadata(None, {"prompt": json.dumps(graph)})
    assert md.prompt == "a" and "a guess" in md.warnings[0]


def test_comfyui_sdxl_encoder_with_different_g_and_l_texts_keeps_both():
    graph = fx.comfy_basic()
    graph["7"] = {
        "class_type": "CLIPTextEncodeSDXL",
        "inputs": {"text_g": "a fox", "text_l": "watercolor", "clip": ["4", 1]},
    }
    assert read_metadata(None, {"prompt": json.dumps(graph)}).prompt == "a fox\nwatercolor"


def test_comfyui_workflow_chunk_is_the_fallback():
    md = meta(fx.png({"workflow": json.dumps(fx.comfy_workflow())}))
    expected = dict(
        prompt="beautiful scenery nature glass bottle",  # through a Reroute; the bypassed encoder is ignored
        negative_prompt="text, watermark",
        source="comfyui",
        model_name="v1-5-pruned-emaonly.safetensors",
        seed=156680208700286,
        steps=20,
        sampler="euler",
        cfg_scale=8.0,
        width=512,
        height=640,
    )
    assert fields(md, expected) == expected
    broken = meta(fx.png({"prompt": "{not json", "workflow": json.dumps(fx.comfy_workflow())}))
    assert broken.prompt == expected["prompt"] and broken.source == "comfyui"
    assert len(broken.warnings) == 1 and "not valid JSON" in broken.warnings[0]


# --- InvokeAI ----------------------------------------------------------------------------------------------------


def test_invokeai_metadata_chunk():
    md = meta(fx.png({"invokeai_metadata": json.dumps(fx.INVOKEAI_METADATA)}))
    expected = dict(
        prompt="a cozy cabin in the woods",
        negative_prompt="people, text",
        source="invokeai",
        generator="InvokeAI",
        model_name="juggernaut-xl",
        model_hash="blake3:9a8b7c6d",
        seed=2938472,
        steps=30,
        sampler="dpmpp_2m_k",
        cfg_scale=7.5,
        width=768,
        height=512,
    )
    assert fields(md, expected) == expected


@pytest.mark.parametrize("as_list", [True, False])
def test_invokeai_legacy_sd_metadata_with_bracketed_negatives(as_list):
    data = json.loads(json.dumps(fx.SD_METADATA))
    if not as_list:
        data["image"]["prompt"] = data["image"]["prompt"][0]["prompt"]
    md = meta(fx.png({"sd-metadata": json.dumps(data)}))
    expected = dict(
        prompt="a cat sitting on a mat",
        negative_prompt="ugly, blurry, watermark",
        source="invokeai",
        model_name="stable-diffusion-1.5",
        model_hash="cc6cb27103417325ff94f52b7a5d2dde45a7515b25c255d8e396c90014281516",
        seed=3357757885,
        steps=50,
        sampler="k_lms",
        cfg_scale=7.5,
        width=576,
        height=512,
    )
    assert fields(md, expected) == expected


def test_invokeai_dream_chunk():
    md = meta(fx.png({"Dream": fx.DREAM}))
    expected = dict(
        prompt="a castle on a hill",
        negative_prompt="fog, people",
        source="invokeai",
        generator="InvokeAI",
        seed=1234567,
        steps=50,
        sampler="k_euler_a",
        cfg_scale=7.5,
        width=640,
        height=512,
    )
    assert fields(md, expected) == expected


# --- NovelAI -----------------------------------------------------------------------------------------------------

NOVELAI_EXPECTED = dict(
    prompt="1girl, cherry blossoms, best quality",
    negative_prompt="lowres, bad anatomy",
    source="novelai",
    generator="NovelAI",
    model_name="Stable Diffusion XL",
    model_hash="C1E1DE52",
    seed=1730563405,
    steps=28,
    sampler="k_euler_ancestral",
    cfg_scale=5.0,
    width=832,
    height=1216,
)


def test_novelai_text_chunks():
    md = meta(fx.png(fx.NOVELAI_CHUNKS))
    assert fields(md, NOVELAI_EXPECTED) == NOVELAI_EXPECTED


def test_novelai_stealth_json_in_the_alpha_channel():
    md = meta(fx.stealth_png(fx.gz(json.dumps(fx.NOVELAI_CHUNKS)), "stealth_pngcomp", size=(160, 120)))
    assert fields(md, NOVELAI_EXPECTED) == NOVELAI_EXPECTED


# --- Fooocus, SwarmUI, Draw Things -------------------------------------------------------------------------------

FOOOCUS_EXPECTED = dict(
    prompt="a lighthouse on a cliff",
    negative_prompt="unrealistic, saturated",
    generator="Fooocus",
    model_name="juggernautXL_v8Rundiffusion.safetensors",
    model_hash="aeb7e9e689",
    seed=8127364519,
    steps=30,
    sampler="dpmpp_2m_sde_gpu",
    cfg_scale=4.0,
    width=1152,
    height=896,
)


def test_fooocus_json_in_the_parameters_chunk_is_not_read_as_a1111():
    md = meta(fx.png({"parameters": json.dumps(fx.FOOOCUS), "fooocus_scheme": "fooocus"}))
    assert md.source == "fooocus"
    assert fields(md, FOOOCUS_EXPECTED) == FOOOCUS_EXPECTED


def test_fooocus_json_in_jpeg_exif():
    md = meta(fx.with_exif_comment(fx.user_comment(json.dumps(fx.FOOOCUS))))
    assert md.source == "fooocus"
    assert fields(md, FOOOCUS_EXPECTED) == FOOOCUS_EXPECTED


def test_fooocus_a1111_scheme():
    text = (
        "a lighthouse\nNegative prompt: fog\nSteps: 30, Sampler: DPM++ 2M SDE Karras, Seed: 5, Version: Fooocus v2.5.5"
    )
    md = meta(fx.png({"parameters": text, "fooocus_scheme": "a1111"}))
    assert (md.source, md.generator, md.prompt, md.negative_prompt, md.seed) == (
        "fooocus",
        "Fooocus",
        "a lighthouse",
        "fog",
        5,
    )


def test_swarmui_parameters_json():
    md = meta(fx.png({"parameters": json.dumps(fx.SWARMUI)}))
    expected = dict(
        prompt="an astronaut riding a horse, photo",
        negative_prompt="cartoon",
        source="swarmui",
        generator="SwarmUI",
        model_name="OfficialStableDiffusion/sd_xl_base_1.0",
        model_hash="0x31e35c80fc",
        seed=1468203578,
        steps=35,
        sampler="dpmpp_2m",
        cfg_scale=6.5,
        width=1344,
        height=768,
    )
    assert fields(md, expected) == expected


DRAW_THINGS_EXPECTED = dict(
    prompt="a koi pond, watercolor",
    negative_prompt="photo, frame",
    source="drawthings",
    generator="Draw Things",
    model_name="sd_xl_base_1.0_f16.ckpt",
    seed=2863498213,
    steps=30,
    sampler="DPM++ 2M Karras",
    cfg_scale=5.5,
    width=1024,
    height=768,
)


@pytest.mark.parametrize("container", ["png_itxt", "jpeg"])
def test_draw_things_xmp(container):
    xmp = fx.draw_things_xmp()
    data = fx.png(itxt={"XML:com.adobe.xmp": xmp}) if container == "png_itxt" else fx.with_xmp(xmp)
    md = meta(data)
    assert fields(md, DRAW_THINGS_EXPECTED) == DRAW_THINGS_EXPECTED


def test_plain_camera_xmp_is_no_prompt():
    xmp = "<x:xmpmeta><rdf:Description><dc:description>IMG_0042</dc:description></rdf:Description></x:xmpmeta>"
    assert meta(fx.with_xmp(xmp)).source == "none"


# --- sidecars ----------------------------------------------------------------------------------------------------


def test_sidecar_txt_a1111_and_plain(tmp_path):
    (tmp_path / "a.txt").write_text(fx.A1111)
    md = read_metadata(str(tmp_path / "a.png"), {})
    assert md.source == "sidecar_txt" and fields(md, fx.A1111_EXPECTED) == fx.A1111_EXPECTED
    (tmp_path / "b.txt").write_text("\n  just a prompt\r\n")
    assert read_sidecar(str(tmp_path / "b.png")) == ("just a prompt", "sidecar_txt")


@pytest.mark.parametrize(
    "content, expected",
    [
        ({"prompt": "from a json sidecar"}, {"prompt": "from a json sidecar"}),
        ({"caption": "a captioned digit"}, {"prompt": "a captioned digit"}),
        ({"parameters": fx.A1111}, fx.A1111_EXPECTED),
        (fx.INVOKEAI_METADATA, {"prompt": "a cozy cabin in the woods", "model_hash": "blake3:9a8b7c6d"}),
        (fx.SWARMUI, {"prompt": "an astronaut riding a horse, photo", "generator": "SwarmUI", "seed": 1468203578}),
        (fx.FOOOCUS, {"prompt": "a lighthouse on a cliff", "generator": "Fooocus", "seed": 8127364519}),
        (fx.DRAW_THINGS, {"prompt": "a koi pond, watercolor", "width": 1024}),
        (fx.comfy_basic(), {"prompt": "beautiful scenery nature glass bottle", "steps": 20}),
        (fx.comfy_workflow(), {"prompt": "beautiful scenery nature glass bottle", "height": 640}),
    ],
)
def test_sidecar_json_shapes(tmp_path, content, expected):
    (tmp_path / "x.json").write_text(json.dumps(content))
    md = read_metadata(str(tmp_path / "x.png"), {})
    assert md.source == "sidecar_json"
    assert fields(md, expected) == expected


def test_image_metadata_beats_a_sidecar(tmp_path):
    (tmp_path / "x.txt").write_text("the sidecar prompt")
    md = meta(fx.png({"parameters": fx.A1111}), tmp_path / "x.png")
    assert md.source == "a1111"
    assert meta(fx.png(), tmp_path / "x.png").source == "sidecar_txt"


def test_read_prompt_wrapper_keeps_its_contract(tmp_path):
    _, info = decode(fx.png({"parameters": fx.A1111}), Limits())
    assert read_prompt(str(tmp_path / "x.png"), info) == (fx.A1111_EXPECTED["prompt"], "a1111")
    assert read_prompt(str(tmp_path / "y.png"), {}) == (None, "none")
    assert read_prompt(str(tmp_path / "y.png"), {"prompt": "{not json"}) == (None, "unreadable")
    assert parse_a1111(fx.A1111) == fx.A1111_EXPECTED["prompt"]
    assert parse_comfyui(json.dumps(fx.comfy_basic())) == "beautiful scenery nature glass bottle"


# --- hostile metadata (issue #24) --------------------------------------------------------------------------------


def test_lone_surrogate_in_a_comfyui_chunk_and_a_json_sidecar(tmp_path):
    graph = fx.comfy_basic()
    graph["7"]["inputs"]["text"] = "fox \udc80 snow"
    md = meta(fx.png({"prompt": json.dumps(graph)}))  # json.dumps escapes it; json.loads brings it back
    assert md.prompt == "fox \ufffd snow"
    assert_clean(md)
    (tmp_path / "s.json").write_text('{"prompt": "caf\\udc80 \\ud800"}')
    side = read_metadata(str(tmp_path / "s.png"), {})
    assert side.prompt == "caf\ufffd \ufffd" and side.source == "sidecar_json"
    assert_clean(side)


def test_deeply_nested_json_loses_the_prompt_not_the_image(tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    (tmp_path / "d.json").write_text(deep)
    md = read_metadata(str(tmp_path / "d.png"), {})
    assert (md.prompt, md.source) == (None, "unreadable")
    assert "nested too deeply" in md.warnings[0]
    chunk = read_metadata(None, {"prompt": '{"a": ' * 100_000 + "1" + "}" * 100_000})
    assert (chunk.prompt, chunk.source) == (None, "unreadable")


@pytest.mark.parametrize(
    "graph, reason",
    [
        ({"3": {"class_type": "KSampler", "inputs": [["6", 0]]}, "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "x"}}}, "inputs is a list"),
        ({"3": {"class_type": "KSampler", "inputs": {"positive": ["4", 0], "negative": ["4", 0]}},
          "4": {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["5", 0]}},
          "5": {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["4", 0]}}}, "link cycle"),
        ({"3": {"class_type": "KSampler", "inputs": {"positive": ["3", 0]}}}, "link cycle"),
        (["not", "a", "graph"], "not an object"),
        ({"3": "KSampler"}, "node '3' is a str"),
    ],
)  # fmt: skip
def test_malformed_comfyui_graphs_are_unreadable(graph, reason):
    md = meta(fx.png({"prompt": json.dumps(graph)}))
    assert (md.prompt, md.source) == (None, "unreadable")
    assert len(md.warnings) == 1 and reason in md.warnings[0]


def test_forged_graph_of_many_samplers_on_one_long_chain_is_bounded():
    n = 1500
    graph = {f"c{i}": {"class_type": "LatentX", "inputs": {"samples": [f"c{i + 1}", 0]}} for i in range(n)}
    for i in range(n):
        graph[f"s{i}"] = {"class_type": "KSampler", "inputs": {"positive": [f"t{i}", 0], "latent_image": ["c0", 0]}}
        graph[f"t{i}"] = {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["c0", 0]}}
    start = time.perf_counter()
    md = read_metadata(None, {"prompt": json.dumps(graph)})
    assert time.perf_counter() - start < 2.0
    assert md.source == "unreadable" and "node visits" in md.warnings[0]


def test_huge_sidecar_is_read_only_up_to_the_limit_and_the_prompt_is_capped(tmp_path):
    (tmp_path / "h.txt").write_bytes(b"a very long prompt " * (10 * 1024 * 1024 // 19))
    start = time.perf_counter()
    md = read_metadata(str(tmp_path / "h.png"), {})
    assert time.perf_counter() - start < 2.0
    assert md.source == "sidecar_txt" and len(md.prompt) == 65536
    assert md.warnings == [
        "h.txt read only up to 1048576 bytes",
        "prompt cut at 65536 characters (was 1048576)",
        "raw metadata cut at 65536 characters (was 1048576)",
    ]
    # The wrappers take the cap the workspace sets ([scan] max_text_chars); the sidecar is read far enough for it.
    assert len(read_sidecar(str(tmp_path / "h.png"))[0]) == 65536
    assert len(read_sidecar(str(tmp_path / "h.png"), max_chars=2**20)[0]) == 2**20


def test_nul_and_control_characters_are_removed():
    md = meta(fx.png({"parameters": "a\x00 fox\x1b[31m\nNegative prompt: b\x07lur\nSteps: 20, Seed: 1\x00"}))
    assert (md.prompt, md.negative_prompt, md.seed) == ("a fox[31m", "blur", 1)
    assert_clean(md)


def test_utf8_written_into_a_latin1_text_chunk_is_repaired():
    md = meta(fx.png({"parameters": "café 中文 prompt\nSteps: 20".encode()}))
    assert md.prompt == "café 中文 prompt"


def test_pathological_settings_line_is_fast():
    line = "Steps: 20, " + 'k: "' * 200_000
    start = time.perf_counter()
    md = read_metadata(None, {"parameters": "a prompt\n" + line})
    assert time.perf_counter() - start < 2.0
    assert md.prompt == "a prompt" and md.steps == 20
    md = read_metadata(None, {"parameters": "a" * 2_000_000 + ": x, b: y, c: z"})
    assert md.prompt is not None


@pytest.mark.parametrize(
    "signature, payload, declared, reason",
    [
        ("stealth_pngcomp", b"not gzip at all", None, "not valid gzip"),
        ("stealth_pnginfo", b"x", 10**9, "claims 1000000000 bits"),
    ],
)
def test_broken_stealth_payload_is_unreadable(signature, payload, declared, reason):
    md = meta(fx.stealth_png(payload, signature, declared_bits=declared))
    assert (md.prompt, md.source) == (None, "unreadable")
    assert reason in md.warnings[0]


def test_a_text_chunk_cannot_pose_as_stealth_metadata():
    assert meta(fx.png({"stealth_metadata": "a forged prompt"})).source == "none"


JUNK = [
    None, 0, 1.5, [], {}, "", "{}", "[]", "null", '"str"', "{", "\x00" * 10, b"\xff\xfe\x00", "1e400", '{"a": 1e400}',
    '{"seed": ' + "9" * 5000 + "}", json.dumps({"sui_image_params": []}), json.dumps({"image": "x", "model_weights": 1}),
]  # fmt: skip


@pytest.mark.parametrize("key", ["parameters", "prompt", "workflow", "invokeai_metadata", "sd-metadata", "Dream",
                                 "Comment", "exif_user_comment", "xmp", "stealth_metadata"])  # fmt: skip
def test_junk_in_any_field_never_raises(key):
    for value in JUNK:
        for info in ({key: value}, {key: value, "Software": "NovelAI", "Description": value, "Source": value}):
            md = read_metadata(None, info)
            assert_clean(md)
            assert md.source in {"none", "unreadable"} or md.source in {
                "a1111", "comfyui", "invokeai", "novelai", "fooocus", "swarmui", "exif", "a1111_stealth"
            }  # fmt: skip


def test_wrong_types_in_known_shapes_never_raise():
    odd = {
        "parameters": json.dumps({"prompt": ["x"], "seed": {"a": 1}, "steps": "many", "guidance_scale": "nan",
                                  "resolution": 5, "version": 3}),
        "invokeai_metadata": json.dumps({"positive_prompt": 5, "model": "plain-string", "width": -3}),
        "Dream": '"unbalanced -s',
        "prompt": json.dumps({"1": {"class_type": "KSampler", "inputs": {"positive": [None, "x"], "seed": [1, 2, 3]}}}),
    }  # fmt: skip
    for key, value in odd.items():
        md = read_metadata(None, {key: value})
        assert_clean(md)
        assert md.prompt is None
