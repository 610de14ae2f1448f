"""Tiny randomly initialised Wan pipelines built in code: Wan 2.1 text-to-video, image-to-video and Wan 2.2's
two-expert text-to-video (tests, CPU runs, benchmarks).

The architectures are diffusers' own classes (``WanTransformer3DModel``, ``AutoencoderKLWan``) and transformers'
``UMT5EncoderModel`` / ``CLIPVisionModel`` at a few tens of thousands of parameters (sizes from
/work/shared/TINY_MODELS.md and diffusers' ``tests/pipelines/wan``), with the character-level tokenizer of
``pipelines.tiny``. The scheduler is ``FlowMatchEulerDiscreteScheduler`` (released Wan checkpoints ship UniPC,
a multistep solver the Euler ODE cannot equal; the samplers read either grid). Each pipeline carries
``default_num_frames`` (5: two latent frames), which the samplers use when ``num_frames`` is not given, and
``vae_scale_factor`` (= ``vae_scale_factor_spatial``, the name the image families' tables read).
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKLWan,
    FlowMatchEulerDiscreteScheduler,
    WanImageToVideoPipeline,
    WanPipeline,
    WanTransformer3DModel,
)
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

from pipelines.tiny import TINY_T5_SIZES, VOCAB_SIZE, _eval_mode, build_char_tokenizer

TINY_NUM_FRAMES = 5  # 4k + 1 frames: 2 latent frames with the VAE's temporal factor 4
TINY_SHIFT = 3.0  # the flow_shift of Wan 2.1's shipped scheduler config
TINY_BOUNDARY = 0.875  # Wan 2.2 A14B text-to-video's boundary_ratio
IMAGE_EMBED_DIM = 4


def _transformer(seed: int, in_channels: int = 16, image_dim: int | None = None) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=in_channels,
        out_channels=16,
        text_dim=32,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
        image_dim=image_dim,
    )


def _text_parts(seed: int) -> dict:
    torch.manual_seed(seed)
    encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=VOCAB_SIZE,
            **TINY_T5_SIZES,
            pad_token_id=1,
            eos_token_id=VOCAB_SIZE - 1,
        )
    )
    return {"text_encoder": encoder, "tokenizer": build_char_tokenizer(512)}


def _vae(seed: int) -> AutoencoderKLWan:
    torch.manual_seed(seed)
    return AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )


def _finish(pipeline):
    pipeline.default_num_frames = TINY_NUM_FRAMES
    pipeline.vae_scale_factor = pipeline.vae_scale_factor_spatial
    pipeline.set_progress_bar_config(disable=True)
    return _eval_mode(pipeline)


def tiny_wan_pipeline(seed: int = 0, two_experts: bool = False) -> WanPipeline:
    """Wan 2.1-architecture text-to-video (~28k-parameter transformer), or with ``two_experts`` Wan 2.2 A14B's
    layout: a second, differently initialised transformer for the low-noise steps and ``boundary_ratio`` 0.875."""
    extra = {}
    if two_experts:
        extra = {"transformer_2": _transformer(seed + 1), "boundary_ratio": TINY_BOUNDARY}
    pipeline = WanPipeline(
        vae=_vae(seed),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=TINY_SHIFT),
        transformer=_transformer(seed),
        **_text_parts(seed),
        **extra,
    )
    return _finish(pipeline)


def tiny_wan_i2v_pipeline(seed: int = 0) -> WanImageToVideoPipeline:
    """Wan 2.1 I2V-architecture: 36 input channels (noise + frame mask + first-frame latents) and CLIP image
    embeddings (a 2-layer CLIP vision tower of width 4)."""
    torch.manual_seed(seed)
    image_encoder = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=IMAGE_EMBED_DIM,
            projection_dim=IMAGE_EMBED_DIM,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            intermediate_size=16,
            patch_size=8,
        )
    )
    pipeline = WanImageToVideoPipeline(
        vae=_vae(seed),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=TINY_SHIFT),
        transformer=_transformer(seed, in_channels=36, image_dim=IMAGE_EMBED_DIM),
        image_encoder=image_encoder,
        image_processor=CLIPImageProcessor(crop_size=32, size=32),
        **_text_parts(seed),
    )
    return _finish(pipeline)
