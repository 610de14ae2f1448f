"""Tiny Stable Diffusion 2.x and SDXL pipelines built in code (tests, CPU demos, benchmarks).

Layouts follow diffusers' own fast tests (``tests/pipelines/stable_diffusion_2/test_stable_diffusion_v_pred.py``
and ``tests/pipelines/stable_diffusion_xl/test_stable_diffusion_xl.py``): the SD 2 UNet's linear projections and
per-block head counts, SD 2.1's upcast attention and v-prediction DDIM scheduler; SDXL's two text encoders
(CLIP-L-like and a projection CLIP like OpenCLIP bigG, concatenated to the cross-attention width), pooled
``text_embeds`` and six ``time_ids`` (``addition_embed_type="text_time"``), and the EulerDiscreteScheduler that
SDXL base ships. Tokenizers are ``pipelines.tiny``'s character tokenizer (no files, no download).
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from pipelines.tiny import SD15_SCHEDULE, _clip_config, _eval_mode, _pixel_vae, build_char_tokenizer

# SDXL's micro-conditioning: original_size (2) + crops_coords_top_left (2) + target_size (2) time ids.
SDXL_TIME_IDS = 6
_TIME_ID_WIDTH = 8  # addition_time_embed_dim (256 in SDXL base)
_TEXT_WIDTH = 32  # hidden size of each tiny CLIP; SDXL concatenates both (768 + 1280 = 2048 in SDXL base)


def _kl_vae(scaling_factor: float) -> AutoencoderKL:
    """A random 4-channel KL VAE with scale factor 2 (two encoder blocks)."""
    return AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        scaling_factor=scaling_factor,
    )


def tiny_sd2_pipeline(seed: int = 0, *, pixel_decoder: bool = False) -> StableDiffusionPipeline:
    """A Stable-Diffusion-2.1-architecture pipeline (v-prediction) at ~60k params.

    SD 2's UNet layout (``use_linear_projection``, per-block head counts ``attention_head_dim=(2, 4)``,
    ``upcast_attention`` as in SD 2.1), a GELU CLIP text encoder (OpenCLIP-like), and the ``DDIMScheduler`` SD 2.1
    ships (SD 1.5's beta schedule, ``prediction_type="v_prediction"``). ``pixel_decoder``: the identity VAE of
    ``pipelines.tiny`` (3 channels, the latent is the image) instead of a random 4-channel one (scale factor 2).
    """
    torch.manual_seed(seed)
    channels = 3 if pixel_decoder else 4
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=_TEXT_WIDTH,
        norm_num_groups=4,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        upcast_attention=True,
    )
    text_config = _clip_config(_TEXT_WIDTH)
    text_config.hidden_act = "gelu"
    pipeline = StableDiffusionPipeline(
        vae=_pixel_vae() if pixel_decoder else _kl_vae(scaling_factor=0.18215),
        text_encoder=CLIPTextModel(text_config),
        tokenizer=build_char_tokenizer(77),
        unet=unet,
        scheduler=DDIMScheduler(**SD15_SCHEDULE, clip_sample=False, prediction_type="v_prediction"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return _eval_mode(pipeline)


# SDXL base 1.0's scheduler_config.json (EulerDiscreteScheduler).
SDXL_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "prediction_type": "epsilon",
}


def tiny_sdxl_pipeline(seed: int = 0, *, pixel_decoder: bool = False) -> StableDiffusionXLPipeline:
    """An SDXL-architecture pipeline (two text encoders, pooled embeds, time ids) at ~100k params.

    The UNet is diffusers' SDXL test layout (``addition_embed_type="text_time"``, ``transformer_layers_per_block
    =(1, 2)``, linear projections) at widths (8, 16); its added-embedding input is 6 time ids x 8 + the 32-wide
    pooled projection of ``text_encoder_2``. The scheduler is the ``EulerDiscreteScheduler`` SDXL base ships (the
    sampler builds its DDIM grid from its config); no watermarker. ``pixel_decoder``: the identity VAE of
    ``pipelines.tiny`` (3 channels, scale factor 1) instead of a random 4-channel one (scale factor 2, SDXL's
    ``scaling_factor`` 0.13025).
    """
    torch.manual_seed(seed)
    channels = 3 if pixel_decoder else 4
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=_TIME_ID_WIDTH,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=SDXL_TIME_IDS * _TIME_ID_WIDTH + _TEXT_WIDTH,
        cross_attention_dim=2 * _TEXT_WIDTH,
    )
    second_config = _clip_config(_TEXT_WIDTH)
    second_config.hidden_act = "gelu"
    pipeline = StableDiffusionXLPipeline(
        vae=_pixel_vae() if pixel_decoder else _kl_vae(scaling_factor=0.13025),
        text_encoder=CLIPTextModel(_clip_config(_TEXT_WIDTH)),
        text_encoder_2=CLIPTextModelWithProjection(second_config),
        tokenizer=build_char_tokenizer(77),
        tokenizer_2=build_char_tokenizer(77),
        unet=unet,
        scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULE),
        add_watermarker=False,
    )
    return _eval_mode(pipeline)
