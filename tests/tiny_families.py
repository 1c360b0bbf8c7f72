"""Tiny "SD-shaped" SD 2.x and SDXL pipelines, built in seconds from configs: each family's block structure, attention
layout and text-encoder interfaces (SD 2.x: v-prediction, linear projections, per-block head counts, cross-attention
as wide as its own text encoder; SDXL: two text encoders, pooled embeddings and text_time size conditioning) at tiny
widths and 32 px, laid out as diffusers saves them. SD 1.x is tests/tiny_sd.py."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .tiny_sd import _tokenizer_files


def _tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    src = folder.parent / (folder.name + "-tokenizer-src")
    _tokenizer_files(src)
    return CLIPTokenizer(str(src / "vocab.json"), str(src / "merges.txt"), model_max_length=16)


def _text_config(tokenizer, width: int, **extra):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=16,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def _vae(scaling_factor: float):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        norm_num_groups=16,
        sample_size=32,
        scaling_factor=scaling_factor,
    )


def _facts(folder: Path) -> None:
    (folder / "auditor_training.json").write_text(json.dumps({"flip_augmentation": False}))


def build_sd2(folder: Path, prediction_type: str = "v_prediction", seed: int = 0) -> Path:
    """SD 2.x-shaped: an OpenCLIP-style (gelu) text encoder in CLIPTextModel form whose width (48) is the
    cross-attention width, linear projections, upcast attention, head counts per block, a DDIM inference scheduler."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = _tokenizer(folder)
    text_encoder = CLIPTextModel(_text_config(tokenizer, 48, hidden_act="gelu"))
    unet = UNet2DConditionModel(
        sample_size=8,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=48,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        upcast_attention=True,
        norm_num_groups=16,
    )
    scheduler = DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type=prediction_type,
        clip_sample=False,
        set_alpha_to_one=False,
    )
    StableDiffusionPipeline(
        vae=_vae(0.18215),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(folder)
    _facts(folder)
    return folder


def build_sdxl(folder: Path, seed: int = 0) -> Path:
    """SDXL-shaped: CLIPTextModel (32) + CLIPTextModelWithProjection (48, projection 40) whose penultimate states
    side by side are the 80-wide cross-attention input, text_time addition embedding over the pooled projection and
    six size ids (40 + 6 × 8 inputs), no attention in the first level, deeper transformers below, Euler sampling."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = _tokenizer(folder)
    text_encoder = CLIPTextModel(_text_config(tokenizer, 32))
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer, 48, projection_dim=40, hidden_act="gelu"))
    time_dim = 8
    unet = UNet2DConditionModel(
        sample_size=8,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        cross_attention_dim=32 + 48,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=40 + 6 * time_dim,
        norm_num_groups=16,
    )
    scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    StableDiffusionXLPipeline(
        vae=_vae(0.13025),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    ).save_pretrained(folder)
    _facts(folder)
    return folder


def single_file(folder: Path, out: Path) -> Path:
    """An SD 1.x diffusers folder written as one original-layout (LDM) checkpoint, as A1111 and ComfyUI users have
    them: the inverse of diffusers' single-file conversion (after its scripts/convert_diffusers_to_original_stable_
    diffusion.py), for any number of levels and layers per block."""
    from safetensors.torch import load_file, save_file

    unet_config = json.loads((folder / "unet" / "config.json").read_text())
    vae_config = json.loads((folder / "vae" / "config.json").read_text())
    weights = {
        name: load_file(str(next((folder / name).glob("*.safetensors")))) for name in ("unet", "vae", "text_encoder")
    }
    state = {f"model.diffusion_model.{k}": v for k, v in _renamed(weights["unet"], _unet_prefixes(unet_config)).items()}
    vae = _renamed(weights["vae"], _vae_prefixes(vae_config))
    for key, value in vae.items():
        # The VAE's mid-block attention projections are 1×1 convolutions there.
        if (
            key.startswith(("encoder.mid.attn_1.", "decoder.mid.attn_1."))
            and key.endswith(".weight")
            and value.ndim == 2
        ):
            value = value[:, :, None, None]
        state[f"first_stage_model.{key}"] = value
    # Original checkpoints keep transformers' older "text_model." prefix, which newer transformers drops on saving.
    text = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in weights["text_encoder"].items()}
    state |= {f"cond_stage_model.transformer.{k}": v for k, v in text.items()}
    save_file({k: v.contiguous() for k, v in state.items()}, str(out))
    return out


def _renamed(weights: dict, prefixes: list[tuple[str, str]]) -> dict:
    """Each key's longest matching diffusers prefix replaced by its original one, then resnet and attention names."""
    resnet = [
        ("norm1.", "in_layers.0."),
        ("conv1.", "in_layers.2."),
        ("norm2.", "out_layers.0."),
        ("conv2.", "out_layers.3."),
    ]
    resnet += [("time_emb_proj.", "emb_layers.1."), ("conv_shortcut.", "skip_connection.")]
    vae_resnet = [("conv_shortcut.", "nin_shortcut.")]
    vae_attention = [
        ("group_norm.", "norm."),
        ("to_q.", "q."),
        ("to_k.", "k."),
        ("to_v.", "v."),
        ("to_out.0.", "proj_out."),
    ]
    out = {}
    for key, value in weights.items():
        hf, sd = max(((h, s) for h, s in prefixes if key.startswith(h)), key=lambda p: len(p[0]), default=("", ""))
        rest = key[len(hf) :]
        if "resnets." in hf:
            for a, b in resnet if hf.startswith(("down_blocks", "up_blocks", "mid_block")) else vae_resnet:
                rest = rest.replace(a, b) if rest.startswith(a) else rest
        if "mid_block.attentions" in hf and "." in sd and sd.startswith(("encoder", "decoder")):
            for a, b in vae_attention:
                rest = b + rest[len(a) :] if rest.startswith(a) else rest
        out[sd + rest] = value
    return out


def _unet_prefixes(config: dict) -> list[tuple[str, str]]:
    lpb, n = config["layers_per_block"], len(config["block_out_channels"])
    down = ["CrossAttn" in t for t in config["down_block_types"]]
    up = ["CrossAttn" in t for t in config["up_block_types"]]
    pairs = [("time_embedding.linear_1.", "time_embed.0."), ("time_embedding.linear_2.", "time_embed.2.")]
    pairs += [("conv_in.", "input_blocks.0.0."), ("conv_norm_out.", "out.0."), ("conv_out.", "out.2.")]
    pairs += [("mid_block.attentions.0.", "middle_block.1."), ("mid_block.resnets.0.", "middle_block.0.")]
    pairs += [("mid_block.resnets.1.", "middle_block.2.")]
    for i in range(n):
        for j in range(lpb):
            pairs.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{(lpb + 1) * i + j + 1}.0."))
            if down[i]:
                pairs.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{(lpb + 1) * i + j + 1}.1."))
        for j in range(lpb + 1):
            pairs.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{(lpb + 1) * i + j}.0."))
            if up[i]:
                pairs.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{(lpb + 1) * i + j}.1."))
        if i < n - 1:
            pairs.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(lpb + 1) * (i + 1)}.0.op."))
            pairs.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{(lpb + 1) * i + lpb}.{2 if up[i] else 1}."))
    return pairs


def _vae_prefixes(config: dict) -> list[tuple[str, str]]:
    lpb, n = config["layers_per_block"], len(config["block_out_channels"])
    pairs = [("encoder.conv_norm_out.", "encoder.norm_out."), ("decoder.conv_norm_out.", "decoder.norm_out.")]
    for part in ("encoder", "decoder"):
        pairs.append((f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1."))
        pairs += [(f"{part}.mid_block.resnets.{j}.", f"{part}.mid.block_{j + 1}.") for j in range(2)]
    for i in range(n):
        pairs += [(f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.") for j in range(lpb)]
        pairs += [(f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{n - 1 - i}.block.{j}.") for j in range(lpb + 1)]
        if i < n - 1:
            pairs.append((f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."))
            pairs.append((f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{n - 1 - i}.upsample."))
    return pairs
