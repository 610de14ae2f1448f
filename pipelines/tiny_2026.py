"""Tiny randomly initialised 2026 image pipelines built in code: Qwen-Image, FLUX.2 (dev, klein), Z-Image and
FLUX.1 Kontext (editing), for tests, the CPU recipes and the rollout benchmark.

The architectures are the real diffusers / transformers classes (Qwen-Image MMDiT with Qwen2.5-VL, FLUX.2 with
Mistral 3 or Qwen3, Z-Image S3-DiT with Qwen3, FLUX.1 Kontext) at a few thousand to ~100k parameters, with the
sizes of diffusers' own pipeline tests. Tokenizers are built in-process (no files, no download): the character
tokenizer of ``pipelines.tiny`` plus the chat special tokens these pipelines' prompt templates use, and a chat
template of our own that renders the user turn only (the system prompts of FLUX.2 and Qwen3 would fill the short
test sequence and truncate every prompt to the same tokens).

The text encoders of FLUX.2 read hidden states of fixed layers (dev: 10, 20, 30; klein: 9, 18, 27), so their tiny
encoders have 31 and 28 layers of width 16: the samplers call ``encode_prompt`` with the pipelines' defaults.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKLFlux2,
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Pipeline,
    Flux2Transformer2DModel,
    FluxKontextPipeline,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    ZImagePipeline,
    ZImageTransformer2DModel,
)
from tokenizers import AddedToken, processors
from transformers import (
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3Model,
)

from pipelines.tiny import _eval_mode, _tiny_vae, build_char_tokenizer, tiny_flux_pipeline

CHAT_SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "[INST]", "[/INST]")
# Renders the user turns only; content may be a string (Qwen3) or a list of {"type": "text"} parts (Mistral 3).
USER_TURNS_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}<|im_start|>"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{{ part['text'] }}{% endfor %}{% endif %}"
    "<|im_end|>{% endif %}{% endfor %}"
)
# Qwen-Image drops the first 34 tokens of its templated prompt (the system turn, as Qwen2.5's BPE splits it).
# These words and the newline are single tokens here, so the system turn is exactly those 34 tokens too.
QWEN_IMAGE_TEMPLATE_WORDS = (
    "\n",
    *(
        "system",
        "Describe",
        "the",
        "image",
        "by",
        "detailing",
        "color",
        "shape",
        "size",
        "texture",
        "quantity",
    ),
    *("text", "spatial", "relationships", "of", "objects", "and", "background", "user", "assistant"),
)
TEXT_WIDTH = 16  # hidden size of every tiny text encoder here


def build_chat_tokenizer(model_max_length: int = 1100) -> PreTrainedTokenizerFast:
    """The character tokenizer plus chat special tokens and Qwen-Image's template words (one id each), with the
    user-turn chat template."""
    tokenizer = build_char_tokenizer(model_max_length)
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [AddedToken(token, normalized=False) for token in CHAT_SPECIAL_TOKENS]}
    )
    tokenizer.add_tokens([AddedToken(word, normalized=False) for word in QWEN_IMAGE_TEMPLATE_WORDS])
    tokenizer.chat_template = USER_TURNS_TEMPLATE
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="$A", pair="$A $B"
    )  # no <s>
    return tokenizer


def _qwen3_config(tokenizer: PreTrainedTokenizerFast, num_layers: int) -> Qwen3Config:
    return Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_WIDTH,
        intermediate_size=TEXT_WIDTH,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=1200,
        pad_token_id=tokenizer.pad_token_id,
    )


def _flux2_vae() -> AutoencoderKLFlux2:
    """FLUX.2's VAE at diffusers-test size (scale factor 1, one latent channel), with batch-norm latent statistics
    other than 0 / 1 so that a dropped or inverted normalisation shows."""
    vae = AutoencoderKLFlux2(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(4,),
        layers_per_block=1,
        latent_channels=1,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    vae.bn.running_mean.copy_(torch.tensor([0.2, -0.1, 0.3, 0.05]))
    vae.bn.running_var.copy_(torch.tensor([0.5, 1.5, 0.8, 1.2]))
    return vae


def _flux2_transformer(joint_attention_dim: int, guidance_embeds: bool) -> Flux2Transformer2DModel:
    return Flux2Transformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=joint_attention_dim,
        timestep_guidance_channels=256,
        axes_dims_rope=[4, 4, 4, 4],
        guidance_embeds=guidance_embeds,
    )


def tiny_qwen_image_pipeline(seed: int = 0) -> QwenImagePipeline:
    """A Qwen-Image-architecture pipeline (MMDiT, Qwen2.5-VL text encoder, Qwen-Image VAE) at ~150k params.

    The VAE has scale factor 4 and 4 latent channels: a 32 px image is 8 x 8 latents, packed to 16 tokens of 16.
    """
    tokenizer = build_chat_tokenizer()
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=3,
        joint_attention_dim=TEXT_WIDTH,
        guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),
    )
    vae = AutoencoderKLQwenImage(
        base_dim=24,
        z_dim=4,
        dim_mult=[1, 2, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True],
        latents_mean=[0.1, -0.2, 0.05, 0.3],  # not 0 / 1, so a dropped or inverted normalisation shows
        latents_std=[0.8, 1.3, 0.6, 1.1],
    )
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": TEXT_WIDTH,
            "intermediate_size": TEXT_WIDTH,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "max_position_embeddings": 1200,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [1, 1, 2]},
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_heads": 2,
            "out_hidden_size": 16,
        },
        vision_start_token_id=len(tokenizer),
        vision_end_token_id=len(tokenizer) + 1,
        image_token_id=len(tokenizer) + 2,
        video_token_id=len(tokenizer) + 3,
    )
    pipeline = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift_terminal=0.02),
        vae=vae,
        text_encoder=Qwen2_5_VLForConditionalGeneration(config),
        tokenizer=tokenizer,
        transformer=transformer,
    )
    return _eval_mode(pipeline)


def tiny_flux2_pipeline(seed: int = 0) -> Flux2Pipeline:
    """A FLUX.2-dev-architecture pipeline (embedded guidance, Mistral 3 text encoder read at layers 10/20/30)."""
    tokenizer = build_chat_tokenizer()
    torch.manual_seed(seed)
    config = Mistral3Config(
        text_config={
            "model_type": "mistral",
            "vocab_size": len(tokenizer),
            "hidden_size": TEXT_WIDTH,
            "intermediate_size": TEXT_WIDTH,
            "max_position_embeddings": 1200,
            "num_attention_heads": 2,
            "num_hidden_layers": 31,
            "num_key_value_heads": 2,
            "head_dim": 8,
            "sliding_window": None,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "model_type": "pixtral",
            "hidden_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 16,
            "image_size": 30,
            "patch_size": 6,
            "num_channels": 3,
        },
        image_token_index=len(tokenizer),
    )
    pipeline = Flux2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
        vae=_flux2_vae(),
        text_encoder=Mistral3ForConditionalGeneration(config),
        tokenizer=tokenizer,
        transformer=_flux2_transformer(3 * TEXT_WIDTH, guidance_embeds=True),
    )
    return _eval_mode(pipeline)


def tiny_flux2_klein_pipeline(seed: int = 0, is_distilled: bool = True) -> Flux2KleinPipeline:
    """A FLUX.2-klein-architecture pipeline (no guidance embedding, Qwen3 text encoder read at layers 9/18/27).

    ``is_distilled=True``: the 4-step distilled klein (CFG refused); ``False``: klein base (true CFG)."""
    tokenizer = build_chat_tokenizer()
    torch.manual_seed(seed)
    pipeline = Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
        vae=_flux2_vae(),
        text_encoder=Qwen3ForCausalLM(_qwen3_config(tokenizer, num_layers=28)),
        tokenizer=tokenizer,
        transformer=_flux2_transformer(3 * TEXT_WIDTH, guidance_embeds=False),
        is_distilled=is_distilled,
    )
    return _eval_mode(pipeline)


def tiny_z_image_pipeline(seed: int = 0) -> ZImagePipeline:
    """A Z-Image-architecture pipeline (single-stream S3-DiT, Qwen3 text encoder, 4-channel KL VAE) at ~60k params.

    The VAE has scale factor 1; the transformer patchifies 2 x 2, so sides are multiples of 2."""
    tokenizer = build_chat_tokenizer()
    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=4,
        dim=32,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        norm_eps=1e-5,
        qk_norm=True,
        cap_feat_dim=TEXT_WIDTH,
        rope_theta=256.0,
        t_scale=1000.0,
        axes_dims=[8, 4, 4],
        axes_lens=[1200, 32, 32],
    )
    with torch.no_grad():  # created with torch.empty: give them values
        transformer.x_pad_token.copy_(torch.ones_like(transformer.x_pad_token))
        transformer.cap_pad_token.copy_(torch.ones_like(transformer.cap_pad_token))
    pipeline = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift=3.0),
        vae=_tiny_vae(latent_channels=4),
        text_encoder=Qwen3Model(_qwen3_config(tokenizer, num_layers=2)),
        tokenizer=tokenizer,
        transformer=transformer,
    )
    return _eval_mode(pipeline)


def tiny_flux_kontext_pipeline(seed: int = 0) -> FluxKontextPipeline:
    """A FLUX.1-Kontext-architecture pipeline: the tiny FLUX.1-dev components in ``FluxKontextPipeline``."""
    flux = tiny_flux_pipeline(seed=seed, guidance_embeds=True)
    return _eval_mode(FluxKontextPipeline(**flux.components))
