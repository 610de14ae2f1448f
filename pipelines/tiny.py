"""Tiny randomly initialised pipelines built from configs in code: tests, the CPU demo and benchmarks.

The architectures are the real diffusers / transformers classes (SD UNet, FLUX, SD3, CLIP, T5, AutoencoderKL) at a few
thousand parameters, so every code path that serves real checkpoints runs on them. The tokenizer is a
character-level tokenizer built in-process (no files, no download): every prompt maps to distinct ids.
"""

from __future__ import annotations

import string

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PNDMScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
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


# the sizes of every tiny T5-family text encoder (T5, UMT5, ByT5): 2 layers of width 32
TINY_T5_SIZES = {
    "d_model": 32,
    "d_ff": 37,
    "d_kv": 8,
    "num_layers": 2,
    "num_heads": 4,
    "relative_attention_num_buckets": 8,
}


def _t5_encoder() -> T5EncoderModel:
    config = T5Config(
        vocab_size=VOCAB_SIZE,
        **TINY_T5_SIZES,
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


# Channel layout of the pixel VAE's single block (width 10, one GroupNorm group). See `_pixel_vae`.
_PIXEL_WIDTH = 10
_PIXEL_COPY_A = (0, 1, 2)  # z_c, scaled by +sigma0 in the final norm's affine
_PIXEL_COPY_B = (3, 4, 5)  # z_c again, scaled by -sigma0
_PIXEL_REF_A, _PIXEL_REF_B = 6, 7  # constant 0: cancels the group mean that the norm subtracts
_PIXEL_PLUS_K, _PIXEL_MINUS_K = 8, 9  # constants +K / -K: they set the group std
_PIXEL_K = 4096.0  # a power of two: GroupNorm's float32 sums of K and K^2 are then exact
_PIXEL_MIN_LOGVAR = -30.0  # DiagonalGaussianDistribution clamps log-variance to [-30, 20]


def _centre_tap_(conv: torch.nn.Conv2d, out_channel: int, in_channel: int, weight: float) -> None:
    conv.weight[out_channel, in_channel, conv.kernel_size[0] // 2, conv.kernel_size[1] // 2] = weight


def _set_pixel_tower_(conv_in, blocks, norm_out: torch.nn.GroupNorm, conv_out: torch.nn.Conv2d) -> None:
    """Make conv_in -> blocks -> norm_out -> SiLU -> conv_out[:3] the identity on 3 channels (in place)."""
    for module in (conv_in, *blocks, norm_out, conv_out):
        for parameter in module.parameters():
            parameter.zero_()  # residual branches (conv2, attention to_out) become exact zeros
    for channel in range(3):
        _centre_tap_(conv_in, _PIXEL_COPY_A[channel], channel, 1.0)
        _centre_tap_(conv_in, _PIXEL_COPY_B[channel], channel, 1.0)
    conv_in.bias[_PIXEL_PLUS_K] = _PIXEL_K
    conv_in.bias[_PIXEL_MINUS_K] = -_PIXEL_K
    # Group std at z = 0: two of the ten channels are +-K, the rest 0 (eps as in nn.GroupNorm).
    sigma0 = (2 * _PIXEL_K**2 / _PIXEL_WIDTH + norm_out.eps) ** 0.5
    for channel in (*_PIXEL_COPY_A, _PIXEL_REF_A):
        norm_out.weight[channel] = sigma0
    for channel in (*_PIXEL_COPY_B, _PIXEL_REF_B):
        norm_out.weight[channel] = -sigma0
    # silu(y) - silu(-y) = y exactly, so A - B is linear; subtracting the reference pair removes the mean.
    for channel in range(3):
        _centre_tap_(conv_out, channel, _PIXEL_COPY_A[channel], 1.0)
        _centre_tap_(conv_out, channel, _PIXEL_COPY_B[channel], -1.0)
        _centre_tap_(conv_out, channel, _PIXEL_REF_A, -1.0)
        _centre_tap_(conv_out, channel, _PIXEL_REF_B, 1.0)


@torch.no_grad()
def _pixel_vae() -> AutoencoderKL:
    """A stock `AutoencoderKL` whose decoder (and encoder) is set by hand to the identity: the latent is the image.

    A single block (scale factor 1, no up/down samplers) of width 10 with one GroupNorm group and
    ``scaling_factor=1``, ``shift_factor=0``, so ``vae.decode(z).sample ~= z`` in the [-1, 1] image convention.

    Construction (decoder; the encoder is built the same way):

    * every resnet and the mid-block attention have all parameters zeroed, so ``x + conv2(...)`` and
      ``x + to_out(...)`` are exact identities through the residual path;
    * ``conv_in`` (centre tap) writes z into two copies A and B (channels 0-2 and 3-5), leaves two
      reference channels at 0 (6, 7) and adds constants +K / -K through its bias (8, 9), K = 4096;
    * the final GroupNorm (one group) subtracts the group mean mu and divides by the group std sigma. The
      constants dominate sigma: sigma^2 = K^2 / 5 + (2 sum_c mean(z_c^2)) / 10 - mu^2, so sigma / sigma0 - 1
      ~ -sum_c mean(z_c^2) / (2 K^2) ~ 1e-7 whatever the image (constant images included). Its affine
      multiplies copy A and reference A by +sigma0 and copy B and reference B by -sigma0 (no shift). K is a
      power of two so that the float32 sums over the +-K channels are exact (with K = 1000 their rounding
      gave a per-image scale error growing with image size, 4e-4 at 256 px);
    * SiLU is odd-linear: silu(y) - silu(-y) = y exactly, so ``conv_out`` (centre tap) takes A - B (which is
      sigma0 / sigma * (z - mu)) minus (ref A - ref B) (which is -sigma0 / sigma * mu): z * sigma0 / sigma.

    Measured error in float32: <= ~1e-6 for |z| <= 2 at 16-256 px, ~1e-5 for a constant |z| = 6 image. The
    encoder uses the same tower with its ``conv_out`` emitting the mean = x and log-variance -30 (the clamp),
    so ``encode(x).latent_dist.mode() ~= x``.
    """
    vae = AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(_PIXEL_WIDTH,),
        layers_per_block=1,
        latent_channels=3,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0,
        scaling_factor=1.0,
    )
    decoder, encoder = vae.decoder, vae.encoder
    assert all(block.upsamplers is None for block in decoder.up_blocks)
    assert all(block.downsamplers is None for block in encoder.down_blocks)
    _set_pixel_tower_(
        decoder.conv_in, [decoder.mid_block, *decoder.up_blocks], decoder.conv_norm_out, decoder.conv_out
    )
    _set_pixel_tower_(
        encoder.conv_in, [*encoder.down_blocks, encoder.mid_block], encoder.conv_norm_out, encoder.conv_out
    )
    encoder.conv_out.bias[3:] = _PIXEL_MIN_LOGVAR
    return vae


def _eval_mode(pipeline):
    """Put every module in eval mode, as ``from_pretrained`` does (T5 has dropout 0.1 in train mode)."""
    for component in pipeline.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipeline


def tiny_flux_pipeline(
    seed: int = 0, guidance_embeds: bool = True, *, pixel_decoder: bool = False
) -> FluxPipeline:
    """A FLUX.1-architecture pipeline (dev-style with guidance embedding, or schnell-style without) at ~70k params.

    The VAE has scale factor 1, so a 32 px image is 16 x 16 = 256 packed tokens of 4 channels.

    ``pixel_decoder=False`` (default): a random 1-latent-channel VAE, whose decoder maps every latent to a
    near-constant grey; fine for code-path tests, useless to look at.

    ``pixel_decoder=True``: a 3-latent-channel VAE whose weights are set by hand so that it decodes the latent
    *as* the image (``vae.decode(z).sample ~= z``, RGB in [-1, 1], error ~1e-6; see `_pixel_vae`), and a
    transformer with ``in_channels = out_channels = 12`` (FLUX packs 2 x 2 latent patches: 4 * 3). It exists for
    the CPU demo: with it a colour reward can actually move the images and before/after grids differ visibly.
    Still the stock ``AutoencoderKL`` class, so ``save_pretrained`` / ``FluxPipeline.from_pretrained`` work.
    """
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=12 if pixel_decoder else 4,
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
        vae=_pixel_vae() if pixel_decoder else _tiny_vae(latent_channels=1),
        text_encoder=CLIPTextModel(_clip_config()),
        tokenizer=build_char_tokenizer(77),
        text_encoder_2=_t5_encoder(),
        tokenizer_2=build_char_tokenizer(512),
        transformer=transformer,
    )
    return _eval_mode(pipeline)


def tiny_sd3_pipeline(seed: int = 0, num_layers: int = 1) -> StableDiffusion3Pipeline:
    """An SD3-architecture pipeline (joint transformer, two CLIPs + T5) at ~40k params per transformer block."""
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=1,
        in_channels=4,
        num_layers=num_layers,
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


# Stable Diffusion 1.5's noise schedule (its scheduler_config.json), shared by the DDIM and PNDM variants.
SD15_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "set_alpha_to_one": False,
    "steps_offset": 1,
}


def tiny_sd_pipeline(
    seed: int = 0,
    *,
    prediction_type: str = "epsilon",
    pixel_decoder: bool = False,
    scheduler: str = "ddim",
) -> StableDiffusionPipeline:
    """A Stable-Diffusion-1.5-architecture pipeline (cross-attention UNet, CLIP text encoder, KL VAE) at ~50k params.

    ``prediction_type``: ``epsilon`` (SD 1.5) or ``v_prediction`` (SD 2.x 768). ``scheduler``: ``ddim`` or
    ``pndm`` (what SD 1.5 ships), both with SD 1.5's schedule. ``pixel_decoder=False``: a random 4-channel VAE
    with scale factor 2 and SD's ``scaling_factor`` 0.18215; ``True``: the hand-set identity VAE of
    ``_pixel_vae`` (3 channels, scale factor 1, the latent *is* the image), for demos and learning tests.
    No safety checker.
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
        cross_attention_dim=32,
        norm_num_groups=4,
        attention_head_dim=4,
    )
    if pixel_decoder:
        vae = _pixel_vae()
    else:
        vae = AutoencoderKL(
            sample_size=32,
            in_channels=3,
            out_channels=3,
            block_out_channels=(8, 16),
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=4,
            scaling_factor=0.18215,
        )
    if scheduler == "ddim":
        noise_scheduler = DDIMScheduler(**SD15_SCHEDULE, clip_sample=False, prediction_type=prediction_type)
    elif scheduler == "pndm":
        noise_scheduler = PNDMScheduler(**SD15_SCHEDULE, skip_prk_steps=True, prediction_type=prediction_type)
    else:
        raise ValueError(f"scheduler must be 'ddim' or 'pndm'; got {scheduler!r}")
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(_clip_config()),
        tokenizer=build_char_tokenizer(77),
        unet=unet,
        scheduler=noise_scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return _eval_mode(pipeline)
