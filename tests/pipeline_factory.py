"""An offline, tiny, randomly initialised `StableDiffusionPipeline` for tests (no downloads).

Components: a 2-block `UNet2DConditionModel` (8x8 latents, cross-attention dim 16), a tiny `AutoencoderKL`,
a `CLIPTextModel` from a small `CLIPTextConfig` and a `CLIPTokenizer` over a hand-written character-level
vocabulary (``merges.txt`` holds only the version line, so every word splits into characters).
"""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel, UNet2DModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


def char_tokenizer(directory: str | Path) -> CLIPTokenizer:
    """A CLIP tokenizer whose vocabulary is single characters (plain and word-final ``</w>`` forms)."""
    directory = Path(directory)
    chars = string.ascii_lowercase + string.digits + string.punctuation
    tokens = [*SPECIAL_TOKENS, *chars, *(c + "</w>" for c in chars)]
    (directory / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(tokens)}))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=77)


def tiny_sd_pipeline(scheduler=None, seed: int = 0, dtype: torch.dtype = torch.float32) -> StableDiffusionPipeline:
    """A `StableDiffusionPipeline` with random tiny components (64x64 images, 4x8x8 latents)."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4,
        sample_size=16,
    )
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = char_tokenizer(tmp)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))
    if scheduler is None:
        scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def tiny_unet(seed: int = 0) -> UNet2DModel:
    """A random 2-block `UNet2DModel` for 3x8x8 images (DDPM / DDIM pipelines)."""
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
                       norm_num_groups=4).eval()
