"""Tiny randomly initialised pipelines built from configs in code: tests, the CPU demo and benchmarks.

The architectures are the real diffusers / transformers classes (FLUX, SD3, CLIP, T5, AutoencoderKL) at a few
thousand parameters, so every code path that serves real checkpoints runs on them. The tokenizer is a
character-level tokenizer built in-process (no files, no download): every prompt maps to distinct ids.
"""

from __future__ import annotations

import string

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    PreTrainedTokenizerFast,
    T5Config,
    T5EncoderModel,
)

_SPECIAL_TOKENS = ("<s>", "<pad>", "<unk>")
_EOS_TOKEN = "</s>"
_CHARACTERS = string.ascii_lowercase + string.digits + string.punctuation
VOCAB_SIZE = len(_SPECIAL_TOKENS) + len(_CHARACTERS) + 1


def build_char_tokenizer(model_max_length: int) -> PreTrainedTokenizerFast:
    """Lower-cased character-level tokenizer; ids: <s>=0, <pad>=1, <unk>=2, characters, </s>=VOCAB_SIZE-1."""
    tokens = [*_SPECIAL_TOKENS, *_CHARACTERS, _EOS_TOKEN]
    vocab = {token: index for index, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Split("", behavior="isolated")]
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"<s> $A {_EOS_TOKEN}", special_tokens=[("<s>", 0), (_EOS_TOKEN, vocab[_EOS_TOKEN])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token=_EOS_TOKEN,
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=model_max_length,
    )


def _clip_config(hidden_size: int = 32) -> CLIPTextConfig:
    return CLIPTextConfig(
        hidden_size=hidden_size,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=VOCAB_SIZE,
        projection_dim=32,
        max_position_embeddings=77,
        bos_token_id=0,
        pad_token_id=1,
        eos_token_id=VOCAB_SIZE - 1,
    )


def _t5_encoder() -> T5EncoderModel:
    config = T5Config(
        vocab_size=VOCAB_SIZE,
        d_model=32,
        d_ff=37,
        d_kv=8,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=1,
        eos_token_id=VOCAB_SIZE - 1,
    )
    return T5EncoderModel(config)


def _tiny_vae(latent_channels: int) -> AutoencoderKL:
    return AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4,),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )


def _eval_mode(pipeline):
    """Put every module in eval mode, as ``from_pretrained`` does (T5 has dropout 0.1 in train mode)."""
    for component in pipeline.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipeline


def tiny_flux_pipeline(seed: int = 0, guidance_embeds: bool = True) -> FluxPipeline:
    """A FLUX.1-architecture pipeline (dev-style with guidance embedding, or schnell-style without) at ~70k params.

    The VAE has scale factor 1, so a 32 px image is 16 x 16 = 256 packed tokens of 4 channels.
    """
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
        guidance_embeds=guidance_embeds,
    )
    pipeline = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
        vae=_tiny_vae(latent_channels=1),
        text_encoder=CLIPTextModel(_clip_config()),
        tokenizer=build_char_tokenizer(77),
        text_encoder_2=_t5_encoder(),
        tokenizer_2=build_char_tokenizer(512),
        transformer=transformer,
    )
    return _eval_mode(pipeline)


def tiny_sd3_pipeline(seed: int = 0) -> StableDiffusion3Pipeline:
    """An SD3-architecture pipeline (joint transformer, two CLIPs + T5) at ~40k transformer params."""
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=1,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
    )
    pipeline = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_tiny_vae(latent_channels=4),
        text_encoder=CLIPTextModelWithProjection(_clip_config()),
        tokenizer=build_char_tokenizer(77),
        text_encoder_2=CLIPTextModelWithProjection(_clip_config()),
        tokenizer_2=build_char_tokenizer(77),
        text_encoder_3=_t5_encoder(),
        tokenizer_3=build_char_tokenizer(256),
    )
    return _eval_mode(pipeline)
