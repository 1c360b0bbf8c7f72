"""A tiny, randomly initialised Stable-Diffusion-layout pipeline folder, built in seconds from configs."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def _tokenizer_files(folder: Path) -> None:
    """A character-level CLIP BPE vocabulary (every byte, with and without </w>): no download needed."""
    from open_clip.tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {
        token: i for i, token in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")


def build(folder: Path, seed: int = 0, flip_augmentation: bool = False) -> Path:
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    tok_dir = folder.parent / (folder.name + "-tokenizer-src")
    _tokenizer_files(tok_dir)
    tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=16)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=16,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=16,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        norm_num_groups=16,
        sample_size=32,
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", clip_sample=False
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    # A recipe (auditor/retrain.py) small enough for tests to retrain the model from scratch in seconds.
    (folder / "auditor_training.json").write_text(
        json.dumps(
            {
                "flip_augmentation": flip_augmentation,
                "text_encoder": "trained jointly with the unet, from scratch",
                "steps": 12,
                "batch_size": 8,
                "lr": 1e-3,
                "weight_decay": 0.0,
                "warmup_steps": 2,
                "min_lr_ratio": 0.1,
                "grad_clip": 1.0,
                "autocast": "none",
                "ema_decay": 0.9,
                "caption_dropout": 0.1,
                "seed": seed,
            }
        )
    )
    return folder


def random_batch(model, n: int = 3, seed: int = 0):
    """Random latents of the tiny model's shape with distinct prompt embeddings."""
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn((n, 4, 8, 8), generator=gen)
    return latents, model.text_embeddings([f"a red digit {i}" for i in range(n)])
