"""Tiny randomly initialised HunyuanVideo pipelines built in code: text-to-video, SkyReels-style image-to-video
and HunyuanVideo 1.5 (tests, CPU demos, benchmarks).

The architectures are diffusers' own classes at a few tens of thousands of parameters (sizes from
/work/shared/TINY_MODELS.md and diffusers' ``tests/pipelines/hunyuan_video*``). The text encoders use the
character-level tokenizer of ``pipelines.tiny``, so the real checkpoints' Llama prompt template (whose crop
offset counts Llama tokens) does not fit them: each tiny pipeline carries ``prompt_template`` (the template
``HunyuanVideoSampler`` passes to ``encode_prompt``) and ``default_num_frames`` (the frames a rollout draws when
``num_frames`` is not given), two attributes the samplers read with the real pipelines' values as fallback.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKLHunyuanVideo,
    AutoencoderKLHunyuanVideo15,
    FlowMatchEulerDiscreteScheduler,
    HunyuanSkyreelsImageToVideoPipeline,
    HunyuanVideo15Transformer3DModel,
    HunyuanVideoPipeline,
    HunyuanVideoTransformer3DModel,
)
from diffusers.guiders import ClassifierFreeGuidance
from transformers import (
    ByT5Tokenizer,
    CLIPTextModel,
    LlamaConfig,
    LlamaModel,
    Qwen2_5_VLTextConfig,
    Qwen2_5_VLTextModel,
    T5Config,
    T5EncoderModel,
)

from pipelines.hunyuan_video_15 import HunyuanVideo15LoraPipeline
from pipelines.tiny import TINY_T5_SIZES, VOCAB_SIZE, _clip_config, _eval_mode, build_char_tokenizer

TINY_PROMPT_TEMPLATE = {"template": "{}", "crop_start": 0}  # the prompt alone: no Llama system prompt to crop
TINY_NUM_FRAMES = 5  # 2 latent frames with the 4x temporal VAE
_LOGVAR_FLOOR = -30.0  # DiagonalGaussianDistribution clamps log-variance to [-30, 20]


def _llama_encoder() -> LlamaModel:
    config = LlamaConfig(
        hidden_size=16,
        intermediate_size=37,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_hidden_layers=2,
        vocab_size=VOCAB_SIZE,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=VOCAB_SIZE - 1,
    )
    return LlamaModel(config)


def _hunyuan_vae(deterministic_posterior: bool) -> AutoencoderKLHunyuanVideo:
    """HunyuanVideo's causal 3D VAE: 8x spatial, 4x temporal compression, 4 latent channels (71k params).

    ``deterministic_posterior``: the encoder's log-variance outputs are pinned to the floor (std ~3e-7), as in
    trained VAEs whose posterior is nearly a point; image-to-video then encodes a source image to the same
    latents whether the posterior is sampled (the diffusers pipeline) or its mode is taken (the sampler).
    """
    vae = AutoencoderKLHunyuanVideo(
        latent_channels=4,
        down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        norm_num_groups=4,
        scaling_factor=0.476986,
        spatial_compression_ratio=8,
        temporal_compression_ratio=4,
        mid_block_add_attention=True,
    )
    if deterministic_posterior:
        with torch.no_grad():  # the posterior's log-variance rows of the last encoder projection
            vae.quant_conv.weight[4:] = 0.0
            vae.quant_conv.bias[4:] = _LOGVAR_FLOOR
    return vae


def _hunyuan_transformer(in_channels: int) -> HunyuanVideoTransformer3DModel:
    return HunyuanVideoTransformer3DModel(
        in_channels=in_channels,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=10,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        patch_size=1,
        patch_size_t=1,
        guidance_embeds=True,
        text_embed_dim=16,
        pooled_projection_dim=8,
        rope_axes_dim=(2, 4, 4),
    )


def _hunyuan_components(seed: int, in_channels: int, deterministic_posterior: bool) -> dict:
    torch.manual_seed(seed)
    return {
        "transformer": _hunyuan_transformer(in_channels),
        "vae": _hunyuan_vae(deterministic_posterior),
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=7.0),  # HunyuanVideo's shipped shift
        "text_encoder": _llama_encoder(),
        "tokenizer": build_char_tokenizer(256),
        "text_encoder_2": CLIPTextModel(_clip_config(hidden_size=8)),
        "tokenizer_2": build_char_tokenizer(77),
    }


def _with_tiny_defaults(pipeline):
    pipeline.prompt_template = dict(TINY_PROMPT_TEMPLATE)
    pipeline.default_num_frames = TINY_NUM_FRAMES
    return _eval_mode(pipeline)


def tiny_hunyuan_video_pipeline(seed: int = 0) -> HunyuanVideoPipeline:
    """A HunyuanVideo-architecture text-to-video pipeline (transformer 47k params, guidance embedding)."""
    components = _hunyuan_components(seed, in_channels=4, deterministic_posterior=False)
    return _with_tiny_defaults(HunyuanVideoPipeline(**components))


def tiny_hunyuan_video_i2v_pipeline(seed: int = 0) -> HunyuanSkyreelsImageToVideoPipeline:
    """A SkyReels-V1-style image-to-video pipeline: the transformer reads noise and source-image latents
    concatenated on channels (in_channels = 2 x 4), as SkyReels-V1-Hunyuan-I2V does (DanceGRPO's I2V model)."""
    components = _hunyuan_components(seed, in_channels=8, deterministic_posterior=True)
    return _with_tiny_defaults(HunyuanSkyreelsImageToVideoPipeline(**components))


_QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ message['content'] }}{% endif %}"
    "{% endfor %}"
)


def tiny_hunyuan_video_15_pipeline(seed: int = 0) -> HunyuanVideo15LoraPipeline:
    """A HunyuanVideo 1.5-architecture text-to-video pipeline (sizes of diffusers' test_hunyuan_1_5.py), with the
    LoRA loader the sampler's ``from_pretrained`` adds (``HunyuanVideo15LoraPipeline``).

    The Qwen2.5-VL text tower reads a character tokenizer whose chat template keeps only the user prompt (no
    system prompt to crop: ``prompt_template_encode_start_idx = 0``); sequence lengths are cut to tiny ones
    (48 prompt tokens, 16 ByT5 glyph tokens, 4 image tokens) so a CPU step stays fast.
    """
    torch.manual_seed(seed)
    transformer = HunyuanVideo15Transformer3DModel(
        in_channels=9,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=1,
        num_refiner_layers=1,
        mlp_ratio=2.0,
        patch_size=1,
        patch_size_t=1,
        text_embed_dim=16,
        text_embed_2_dim=32,
        image_embed_dim=12,
        rope_axes_dim=(2, 2, 4),
        target_size=16,
        task_type="t2v",
    )
    vae = AutoencoderKLHunyuanVideo15(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(16, 16),
        layers_per_block=1,
        spatial_compression_ratio=4,
        temporal_compression_ratio=2,
        downsample_match_channel=False,
        upsample_match_channel=False,
    )
    text_encoder = Qwen2_5_VLTextModel(
        Qwen2_5_VLTextConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=16,
            intermediate_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [1, 1, 2]},
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=VOCAB_SIZE - 1,
        )
    )
    tokenizer = build_char_tokenizer(64)
    tokenizer.chat_template = _QWEN_CHAT_TEMPLATE
    byt5 = ByT5Tokenizer()
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(byt5),
            **TINY_T5_SIZES,
            pad_token_id=0,
            eos_token_id=1,
        )
    )
    pipeline = HunyuanVideo15LoraPipeline(
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=byt5,
        guider=ClassifierFreeGuidance(guidance_scale=1.0),
    )
    pipeline.prompt_template_encode_start_idx = 0
    pipeline.tokenizer_max_length = 48
    pipeline.tokenizer_2_max_length = 16
    pipeline.vision_num_semantic_tokens = 4
    pipeline.default_num_frames = TINY_NUM_FRAMES
    return _eval_mode(pipeline)
