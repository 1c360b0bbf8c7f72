"""Images carrying each generator's metadata, laid out as that generator writes it (PNG text chunks, EXIF
UserComment, XMP, stealth LSBs), built in memory so the tests need no binary fixtures."""

from __future__ import annotations

import gzip
import io
import json

import numpy as np
from PIL import Image, PngImagePlugin

SIZE = (48, 40)  # width != height so a swapped size shows


def _pixels(mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(0)
    channels = len(mode)
    arr = rng.integers(0, 256, (SIZE[1], SIZE[0], channels), dtype=np.uint8)
    if mode == "RGBA":
        arr[:, :, 3] = 255
    return Image.fromarray(arr, mode)


def png(chunks: dict[str, str | bytes] | None = None, itxt: dict[str, str] | None = None, image=None) -> bytes:
    """A PNG with tEXt chunks (bytes values are written raw, as tools that put UTF-8 in tEXt do) and iTXt chunks."""
    info = PngImagePlugin.PngInfo()
    for key, value in (chunks or {}).items():
        info.add_text(key, value)
    for key, value in (itxt or {}).items():
        info.add_itxt(key, value)
    out = io.BytesIO()
    (image or _pixels()).save(out, "PNG", pnginfo=info)
    return out.getvalue()


def user_comment(text: str, encoding: str = "utf-16-be") -> bytes:
    """EXIF UserComment as piexif (and so A1111) writes it: the UNICODE charset header, then UTF-16."""
    return b"UNICODE\x00" + text.encode(encoding)


def with_exif_comment(comment: bytes, fmt: str = "JPEG") -> bytes:
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = comment
    out = io.BytesIO()
    _pixels().save(out, fmt, exif=exif.tobytes(), **({"lossless": True} if fmt == "WEBP" else {}))
    return out.getvalue()


def with_xmp(xmp: str, fmt: str = "JPEG") -> bytes:
    out = io.BytesIO()
    _pixels().save(out, fmt, xmp=xmp.encode())
    return out.getvalue()


def stealth_png(payload: bytes, signature: str, *, declared_bits: int | None = None, size=(96, 80)) -> bytes:
    """The stealth-pnginfo layout: signature, 32-bit big-endian payload length in bits, payload; one bit per
    pixel in the alpha LSB ("png" signatures) or three in the RGB LSBs ("rgb"), pixels column by column."""
    body = signature.encode() + (declared_bits or len(payload) * 8).to_bytes(4, "big") + payload
    bits = np.unpackbits(np.frombuffer(body, dtype=np.uint8))
    width, height = size
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
    arr[:, :, 3] = 255
    channels = [3] if "png" in signature else [0, 1, 2]
    flat = arr[:, :, channels].transpose(1, 0, 2).reshape(-1).copy()  # column-major, channel-minor
    assert len(bits) <= len(flat), "payload too large for the fixture image"
    flat[: len(bits)] = (flat[: len(bits)] & 0xFE) | bits
    arr[:, :, channels] = flat.reshape(width, height, len(channels)).transpose(1, 0, 2)
    out = io.BytesIO()
    Image.fromarray(arr, "RGBA").save(out, "PNG")
    return out.getvalue()


def gz(text: str) -> bytes:
    return gzip.compress(text.encode())


A1111 = (
    "masterpiece, a red fox in the snow,\n(detailed fur:1.2)\n"
    "Negative prompt: blurry, lowres,\nbad hands\n"
    "Steps: 28, Sampler: DPM++ 2M Karras, Schedule type: Karras, CFG scale: 6.5, Seed: 3141592653, Size: 512x768, "
    'Model hash: abcdef1234, Model: dreamshaper_8, Lora hashes: "fox: 1a2b3c, snow: 4d5e6f", Version: v1.10.1'
)
A1111_EXPECTED = dict(
    prompt="masterpiece, a red fox in the snow,\n(detailed fur:1.2)",
    negative_prompt="blurry, lowres,\nbad hands",
    generator="AUTOMATIC1111",
    model_name="dreamshaper_8",
    model_hash="abcdef1234",
    seed=3141592653,
    steps=28,
    sampler="DPM++ 2M Karras",
    cfg_scale=6.5,
    width=512,
    height=768,
)


def comfy_basic() -> dict:
    """The default ComfyUI text-to-image graph; the negative encoder has the lower id."""
    return {
        "3": {
            "class_type": "KSampler",
            "inputs": {
                "seed": 156680208700286,
                "steps": 20,
                "cfg": 8.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1.0,
                "model": ["4", 0],
                "positive": ["7", 0],
                "negative": ["6", 0],
                "latent_image": ["5", 0],
            },
        },  # fmt: skip
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 640, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "text, watermark", "clip": ["4", 1]}},
        "7": {
            "class_type": "CLIPTextEncode",
            "inputs": {"text": "\n\nbeautiful scenery nature glass bottle\n", "clip": ["4", 1]},
        },
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
    }


def comfy_chained() -> dict:
    """Several prompt nodes: a stray encoder, a hires pass with its own text, ControlNet, ConditioningCombine,
    an SDXL encoder, a LoRA between checkpoint and sampler, and primitives feeding text, seed and steps."""
    return {
        "1": {"class_type": "CLIPTextEncode", "inputs": {"text": "an unused draft prompt", "clip": ["10", 1]}},
        "2": {  # the hires pass: lower id than the first pass, but its latent comes from a sampler
            "class_type": "KSampler",
            "inputs": {
                "seed": 7,
                "steps": 10,
                "cfg": 5,
                "sampler_name": "euler",
                "scheduler": "normal",
                "model": ["11", 0],
                "positive": ["3", 0],
                "negative": ["14", 1],
                "latent_image": ["20", 0],
            },
        },  # fmt: skip
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "hires detail pass", "clip": ["10", 1]}},
        "10": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"}},
        "11": {
            "class_type": "LoraLoader",
            "inputs": {"lora_name": "fox.safetensors", "model": ["10", 0], "clip": ["10", 1]},
        },
        "12": {"class_type": "PrimitiveString", "inputs": {"value": "a red fox"}},
        "13": {"class_type": "CLIPTextEncode", "inputs": {"text": ["12", 0], "clip": ["11", 1]}},
        "14": {
            "class_type": "ControlNetApplyAdvanced",
            "inputs": {
                "positive": ["16", 0],
                "negative": ["17", 0],
                "control_net": ["18", 0],
                "image": ["19", 0],
                "strength": 0.8,
            },
        },  # fmt: skip
        "15": {
            "class_type": "CLIPTextEncodeSDXL",
            "inputs": {
                "text_g": "in the snow",
                "text_l": "in the snow",
                "width": 1024,
                "height": 1024,
                "clip": ["11", 1],
            },
        },
        "16": {
            "class_type": "ConditioningCombine",
            "inputs": {"conditioning_1": ["13", 0], "conditioning_2": ["15", 0]},
        },
        "17": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["11", 1]}},
        "18": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "canny.safetensors"}},
        "19": {"class_type": "LoadImage", "inputs": {"image": "edges.png"}},
        "20": {"class_type": "LatentUpscale", "inputs": {"samples": ["21", 0], "width": 1536, "height": 1536}},
        "21": {
            "class_type": "KSamplerAdvanced",
            "inputs": {
                "noise_seed": ["22", 0],
                "steps": ["23", 0],
                "cfg": 6.0,
                "sampler_name": "dpmpp_2m",
                "scheduler": "karras",
                "model": ["11", 0],
                "positive": ["14", 0],
                "negative": ["14", 1],
                "latent_image": ["24", 0],
                "add_noise": "enable",
            },
        },  # fmt: skip
        "22": {"class_type": "Seed (rgthree)", "inputs": {"seed": 987654321}},
        "23": {"class_type": "PrimitiveInt", "inputs": {"value": 30}},
        "24": {"class_type": "EmptyLatentImage", "inputs": {"width": 1024, "height": 768, "batch_size": 1}},
    }


def comfy_custom_sampler() -> dict:
    """Flux-style SamplerCustomAdvanced: seed, guider, sampler and steps each in their own node."""
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "flux1-dev.safetensors", "weight_dtype": "default"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse at dusk", "clip": ["9", 0]}},
        "3": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["2", 0], "guidance": 3.5}},
        "4": {
            "class_type": "CFGGuider",
            "inputs": {"model": ["1", 0], "positive": ["3", 0], "negative": ["5", 0], "cfg": 1.0},
        },
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "fog", "clip": ["9", 0]}},
        "6": {"class_type": "RandomNoise", "inputs": {"noise_seed": 42}},
        "7": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "8": {
            "class_type": "BasicScheduler",
            "inputs": {"scheduler": "simple", "steps": 25, "denoise": 1.0, "model": ["1", 0]},
        },
        "9": {
            "class_type": "DualCLIPLoader",
            "inputs": {"clip_name1": "t5xxl.safetensors", "clip_name2": "clip_l.safetensors"},
        },
        "10": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 832, "height": 1216, "batch_size": 1}},
        "11": {
            "class_type": "SamplerCustomAdvanced",
            "inputs": {
                "noise": ["6", 0],
                "guider": ["4", 0],
                "sampler": ["7", 0],
                "sigmas": ["8", 0],
                "latent_image": ["10", 0],
            },
        },
    }


def comfy_workflow() -> dict:
    """The editor's `workflow` JSON for the basic graph: positional widgets_values and a link table."""
    return {
        "last_node_id": 9,
        "last_link_id": 9,
        "nodes": [
            {"id": 3, "type": "KSampler", "mode": 0,
             "inputs": [{"name": "model", "type": "MODEL", "link": 1}, {"name": "positive", "type": "CONDITIONING", "link": 4},
                        {"name": "negative", "type": "CONDITIONING", "link": 6}, {"name": "latent_image", "type": "LATENT", "link": 2}],
             "widgets_values": [156680208700286, "randomize", 20, 8, "euler", "normal", 1]},
            {"id": 4, "type": "CheckpointLoaderSimple", "mode": 0, "widgets_values": ["v1-5-pruned-emaonly.safetensors"]},
            {"id": 5, "type": "EmptyLatentImage", "mode": 0, "widgets_values": [512, 640, 1]},
            {"id": 6, "type": "CLIPTextEncode", "mode": 0, "inputs": [{"name": "clip", "type": "CLIP", "link": 3}],
             "widgets_values": ["beautiful scenery nature glass bottle"]},
            {"id": 7, "type": "CLIPTextEncode", "mode": 0, "inputs": [{"name": "clip", "type": "CLIP", "link": 5}],
             "widgets_values": ["text, watermark"]},
            {"id": 10, "type": "Reroute", "mode": 0, "inputs": [{"name": "", "type": "*", "link": 8}]},
            {"id": 11, "type": "CLIPTextEncode", "mode": 4, "widgets_values": ["a bypassed prompt"]},
        ],
        "links": [
            [1, 4, 0, 3, 0, "MODEL"], [2, 5, 0, 3, 3, "LATENT"], [3, 4, 1, 6, 0, "CLIP"], [8, 6, 0, 10, 0, "*"],
            [4, 10, 0, 3, 1, "CONDITIONING"], [5, 4, 1, 7, 0, "CLIP"], [6, 7, 0, 3, 2, "CONDITIONING"],
        ],
        "version": 0.4,
    }  # fmt: skip


INVOKEAI_METADATA = {
    "generation_mode": "txt2img",
    "positive_prompt": "a cozy cabin in the woods",
    "negative_prompt": "people, text",
    "width": 768,
    "height": 512,
    "seed": 2938472,
    "rand_device": "cpu",
    "cfg_scale": 7.5,
    "steps": 30,
    "scheduler": "dpmpp_2m_k",
    "model": {"key": "8f1c", "hash": "blake3:9a8b7c6d", "name": "juggernaut-xl", "base": "sdxl", "type": "main"},
    "app_version": "4.2.9",
}

SD_METADATA = {
    "model": "stable diffusion",
    "model_weights": "stable-diffusion-1.5",
    "model_hash": "cc6cb27103417325ff94f52b7a5d2dde45a7515b25c255d8e396c90014281516",
    "app_id": "invoke-ai/InvokeAI",
    "app_version": "2.2.5",
    "image": {
        "prompt": [{"prompt": "a cat [ugly, blurry] sitting on a mat [watermark]", "weight": 1.0}],
        "steps": 50, "cfg_scale": 7.5, "threshold": 0, "perlin": 0, "height": 512, "width": 576, "seed": 3357757885,
        "seamless": False, "hires_fix": False, "type": "txt2img", "postprocessing": None, "sampler": "k_lms",
        "variations": [],
    },
}  # fmt: skip

DREAM = '"a castle on a hill [fog, people]" -s 50 -S 1234567 -W 640 -H 512 -C 7.5 -A k_euler_a -f 0.75'

NOVELAI_COMMENT = {
    "prompt": "1girl, cherry blossoms, best quality",
    "steps": 28,
    "height": 1216,
    "width": 832,
    "scale": 5.0,
    "uncond_scale": 0.0,
    "cfg_rescale": 0.0,
    "seed": 1730563405,
    "n_samples": 1,
    "noise_schedule": "karras",
    "sampler": "k_euler_ancestral",
    "uc": "lowres, bad anatomy",
    "request_type": "PromptGenerateRequest",
}
NOVELAI_CHUNKS = {
    "Title": "AI generated image",
    "Description": "1girl, cherry blossoms, best quality",
    "Software": "NovelAI",
    "Source": "Stable Diffusion XL C1E1DE52",
    "Generation time": "3.1",
    "Comment": json.dumps(NOVELAI_COMMENT),
}

FOOOCUS = {
    "adm_guidance": "(1.5, 0.8, 0.3)",
    "base_model": "juggernautXL_v8Rundiffusion.safetensors",
    "base_model_hash": "aeb7e9e689",
    "full_negative_prompt": ["unrealistic, saturated", "(worst quality:1.2)"],
    "full_prompt": ["a lighthouse on a cliff, dramatic light, highly detailed"],
    "guidance_scale": 4.0,
    "negative_prompt": "unrealistic, saturated",
    "performance": "Speed",
    "prompt": "a lighthouse on a cliff",
    "prompt_expansion": "a lighthouse on a cliff, dramatic light",
    "refiner_model": "None",
    "resolution": "(1152, 896)",
    "sampler": "dpmpp_2m_sde_gpu",
    "scheduler": "karras",
    "seed": "8127364519",
    "sharpness": 2.0,
    "steps": 30,
    "styles": "['Fooocus V2', 'Fooocus Enhance']",
    "version": "Fooocus v2.5.5",
    "metadata_scheme": "fooocus",
}

SWARMUI = {
    "sui_image_params": {
        "prompt": "an astronaut riding a horse, photo",
        "negativeprompt": "cartoon",
        "model": "OfficialStableDiffusion/sd_xl_base_1.0",
        "seed": 1468203578,
        "steps": 35,
        "cfgscale": 6.5,
        "aspectratio": "Custom",
        "width": 1344,
        "height": 768,
        "sampler": "dpmpp_2m",
        "scheduler": "karras",
        "swarm_version": "0.9.5.2",
        "date": "2025-03-01",
    },
    "sui_models": [
        {"name": "OfficialStableDiffusion/sd_xl_base_1.0.safetensors", "param": "model", "hash": "0x31e35c80fc"}
    ],
}

DRAW_THINGS = {
    "c": "a koi pond, watercolor",
    "uc": "photo, frame",
    "model": "sd_xl_base_1.0_f16.ckpt",
    "seed": 2863498213,
    "steps": 30,
    "scale": 5.5,
    "sampler": "DPM++ 2M Karras",
    "size": "1024x768",
    "strength": 1,
    "seed_mode": "Scale Alike",
}


def draw_things_xmp(data: dict = DRAW_THINGS) -> str:
    comment = json.dumps(data).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return (
        '<x:xmpmeta xmlns:x="adobe:ns:meta/" x:xmptk="XMP Core 6.0.0">'
        '<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        '<rdf:Description rdf:about="" xmlns:dc="http://purl.org/dc/elements/1.1/" '
        'xmlns:exif="http://ns.adobe.com/exif/1.0/" xmlns:xmp="http://ns.adobe.com/xap/1.0/">'
        f'<dc:description><rdf:Alt><rdf:li xml:lang="x-default">{data["c"]}\n-{data["uc"]}</rdf:li></rdf:Alt>'
        "</dc:description>"
        f'<exif:UserComment><rdf:Alt><rdf:li xml:lang="x-default">{comment}</rdf:li></rdf:Alt></exif:UserComment>'
        "<xmp:CreatorTool>Draw Things</xmp:CreatorTool>"
        "</rdf:Description></rdf:RDF></x:xmpmeta>"
    )
