"""Offline, tiny, randomly initialised flow-matching pipelines for tests (no text encoders, no downloads).

`StableDiffusion3Pipeline`, `FluxPipeline` and `WanPipeline` with one-layer transformers and tiny VAEs; prompts are
given as embeddings (`sd3_embeddings`, `flux_embeddings`, `wan_embeddings`), and runs return latents
(``output_type="latent"``).
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLWan,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Img2ImgPipeline,
    StableDiffusion3Pipeline,
    UniPCMultistepScheduler,
    WanPipeline,
    WanTransformer3DModel,
)

#: Wan's stock scheduler config (flow UniPC, shift 3)
WAN_SCHEDULER = {"prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": 3.0}
#: SD3's and Flux's stock scheduler configs (SD3: static shift 3; Flux: resolution-dependent shift)
SD3_SCHEDULER = {"shift": 3.0}
FLUX_SCHEDULER = {"shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
                  "base_image_seq_len": 256, "max_image_seq_len": 4096}


def _components(transformer: torch.nn.Module, vae: AutoencoderKL, scheduler_config: dict) -> dict:
    return {"transformer": transformer.eval(), "vae": vae.eval(),
            "scheduler": FlowMatchEulerDiscreteScheduler(**scheduler_config), "text_encoder": None,
            "tokenizer": None, "text_encoder_2": None, "tokenizer_2": None}


def tiny_sd3_pipeline(seed: int = 0, img2img: bool = False, channels: int = 4) -> StableDiffusion3Pipeline:
    """SD3 with a one-layer `SD3Transformer2DModel` on 4x8x8 latents (64x64 images; joint attention dim 32);
    ``channels=16`` for the inpainting pipeline, which insists on SD3's 16 latent channels."""
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=channels, out_channels=channels,
                                        num_layers=1,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                        caption_projection_dim=16, pooled_projection_dim=16, pos_embed_max_size=16)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=channels, block_out_channels=(4, 4, 4, 4),
                        layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=1, sample_size=64,
                        shift_factor=0.0609, scaling_factor=1.5035)
    cls = StableDiffusion3Img2ImgPipeline if img2img else StableDiffusion3Pipeline
    pipe = cls(**_components(transformer, vae, SD3_SCHEDULER), text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _embeddings(batch: int, seed: int, pooled_dim: int) -> dict[str, torch.Tensor]:
    """Random prompt and negative-prompt embeddings (6 tokens of 32 channels, pooled vectors of ``pooled_dim``)."""
    g = torch.Generator().manual_seed(seed)
    return {"prompt_embeds": torch.randn(batch, 6, 32, generator=g),
            "pooled_prompt_embeds": torch.randn(batch, pooled_dim, generator=g),
            "negative_prompt_embeds": torch.randn(batch, 6, 32, generator=g),
            "negative_pooled_prompt_embeds": torch.randn(batch, pooled_dim, generator=g)}


def sd3_embeddings(batch: int = 1, seed: int = 1) -> dict[str, torch.Tensor]:
    """Random prompt and negative-prompt embeddings for `tiny_sd3_pipeline`."""
    return _embeddings(batch, seed, 16)


def tiny_flux_pipeline(seed: int = 0) -> FluxPipeline:
    """Flux with a one-double, one-single block `FluxTransformer2DModel` (1-channel 16x16 latents, packed to 64
    tokens of 4 channels; 16x16 images)."""
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=1, block_out_channels=(4,), layers_per_block=1,
                        norm_num_groups=1, sample_size=16, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0609, scaling_factor=1.5035)
    pipe = FluxPipeline(**_components(transformer, vae, FLUX_SCHEDULER))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_embeddings(batch: int = 1, seed: int = 1) -> dict[str, torch.Tensor]:
    """Random prompt and negative-prompt embeddings for `tiny_flux_pipeline`."""
    return _embeddings(batch, seed, 32)


def tiny_wan_pipeline(seed: int = 0) -> WanPipeline:
    """Wan 2.1 with a one-layer `WanTransformer3DModel` on 4-channel latents (one frame of 32x32 pixels: 4x1x4x4
    latents, 2x2 patches) and a tiny `AutoencoderKLWan`; it runs CFG as two transformer calls per step."""
    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                        in_channels=4, out_channels=4, text_dim=32, freq_dim=16, ffn_dim=16,
                                        num_layers=1, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                        rope_max_seq_len=32)
    vae = AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae.eval(), transformer=transformer.eval(),
                       scheduler=UniPCMultistepScheduler(**WAN_SCHEDULER))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def wan_embeddings(batch: int = 1, seed: int = 1) -> dict[str, torch.Tensor]:
    """Random prompt and negative-prompt embeddings (6 tokens of 32 channels) for `tiny_wan_pipeline`."""
    g = torch.Generator().manual_seed(seed)
    return {"prompt_embeds": torch.randn(batch, 6, 32, generator=g),
            "negative_prompt_embeds": torch.randn(batch, 6, 32, generator=g)}
