"""Tiny randomly initialised judges of the real architectures, saved in the real formats (tests, recipes).

- :func:`save_tiny_qwen2_vl_judge`: a ``Qwen2VLForConditionalGeneration`` (2 layers, width 32) with a
  ``Qwen2VLProcessor`` (56 x 56 pixels = 4 image tokens, Qwen's chat tokens), saved with ``save_pretrained``
  so that :class:`rewards.vlm_judge.VLMJudge` loads it through ``AutoModelForImageTextToText`` exactly like a
  hub checkpoint. Its word-level tokenizer holds the judges' answer words (``yes`` / ``no``, ``1`` .. ``10``,
  ``first`` / ``second``, ``First`` / ``Second``) as single tokens.
- :func:`save_tiny_dino_for_adversarial`: rewards.tiny's DINOv2 (re-exported for the adversarial recipes).

Nothing is downloaded. (``rewards`` imports only ``gen_rl.core``, so this builds its own tokenizer rather than
reuse ``gen_rl.vlm.tiny``.)
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from transformers import (
    GenerationConfig,
    PreTrainedTokenizerFast,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
)

from rewards.tiny import save_tiny_dino as save_tiny_dino_for_adversarial

__all__ = [
    "JUDGE_WORDS",
    "judge_tokenizer",
    "save_tiny_dino_for_adversarial",
    "save_tiny_qwen2_vl_judge",
    "save_tiny_references",
]

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
JUDGE_WORDS = (
    "<unk>",
    "system",
    "user",
    "assistant",
    "does",
    "this",
    "image",
    "picture",
    "show",
    "a",
    "an",
    "the",
    "is",
    "in",
    "of",
    "or",
    "answer",
    "yes",
    "no",
    "Yes",
    "No",
    "which",
    "better",
    "matches",
    "first",
    "second",
    "First",
    "Second",
    "same",
    "rate",
    "from",
    "to",
    "red",
    "green",
    "blue",
    "yellow",
    "square",
    "circle",
    "apple",
    "cat",
    "dog",
    "?",
    ".",
    ",",
    ":",
    *(str(number) for number in range(11)),
)
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def judge_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer: Qwen's special tokens (ids 0..7), then :data:`JUDGE_WORDS`; left padding."""
    tokens = [*SPECIAL_TOKENS, *JUDGE_WORDS]
    backend = Tokenizer(models.WordLevel({token: i for i, token in enumerate(tokens)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(
        [AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        unk_token="<unk>",
        model_max_length=4096,
    )
    tokenizer.padding_side = "left"
    return tokenizer


def _video_processor():
    from transformers.utils import is_torchvision_available

    if not is_torchvision_available():
        return None
    from transformers import Qwen2VLVideoProcessor

    return Qwen2VLVideoProcessor(
        size={"shortest_edge": 56 * 56, "longest_edge": 56 * 56}, cap_pixels_per_frame=False
    )


def tiny_qwen2_vl_judge(seed: int = 0) -> tuple[Qwen2VLForConditionalGeneration, Qwen2VLProcessor]:
    """A ~100k-parameter Qwen2-VL (float32, eval mode) and its processor, deterministic in ``seed``."""
    tokenizer = judge_tokenizer()
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 512,
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 1, 1]},
        },
        vision_config={
            "depth": 2,
            "embed_dim": 32,
            "hidden_size": 32,
            "num_heads": 4,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]
    )
    extra = {} if (video := _video_processor()) is None else {"video_processor": video}
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=56 * 56),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
        **extra,
    )
    return model, processor


def save_tiny_qwen2_vl_judge(folder: str | Path, seed: int = 0) -> Path:
    """Write :func:`tiny_qwen2_vl_judge` (model + processor) to ``folder`` with ``save_pretrained``."""
    folder = Path(folder)
    model, processor = tiny_qwen2_vl_judge(seed)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def save_tiny_references(folder: str | Path, count: int = 4, size: int = 24, seed: int = 0) -> Path:
    """``count`` random-colour PNGs of ``size`` x ``size`` in ``folder``: a reference folder for the recipes."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    colours = (torch.rand(count, 3, generator=generator) * 255).round().to(torch.uint8)
    for index, colour in enumerate(colours):
        array = colour[None, None, :].expand(size, size, 3).numpy().copy()
        Image.fromarray(array).save(folder / f"reference_{index:02d}.png")
    return folder


JANUS_SPECIAL_TOKENS = (
    "<pad>",
    "<bos>",
    "<eos>",
    "<image_placeholder>",
    "<begin_of_image>",
    "<end_of_image>",
)
JANUS_ROLE_TOKENS = ("<|User|>", "<|Assistant|>")


def tiny_janus(seed: int = 0, image_tokens_side: int = 4, codebook: int = 32, initializer_range: float = 0.3):
    """A ~0.8M-parameter ``JanusForConditionalGeneration`` (float32, eval mode) and its ``JanusProcessor``.

    Understanding: a 1-layer SigLIP-style tower on 32 x 32 pixels (patch 8 = 16 image tokens) + aligner into a
    2-layer Llama (width 32). Generation: ``image_tokens_side ** 2`` VQ tokens from a ``codebook``-entry codebook,
    decoded by the VQ decoder to ``4 * image_tokens_side`` pixels a side. The word-level tokenizer holds the judge
    words of :data:`JUDGE_WORDS`, Janus's image tokens and roles. ``initializer_range`` 0.3 (not 0.02) for the
    language model and vision tower makes the random understanding sensitive to its image: its ``P(yes)`` spans
    about 0.15 - 0.49 over its own samples, against 0.530 - 0.535 at 0.02.
    """
    from transformers import JanusConfig, JanusForConditionalGeneration, JanusImageProcessor, JanusProcessor

    tokens = [*JANUS_SPECIAL_TOKENS, *JUDGE_WORDS, *JANUS_ROLE_TOKENS]
    backend = Tokenizer(models.WordLevel({token: i for i, token in enumerate(tokens)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(
        [AddedToken(token, special=True, normalized=False) for token in JANUS_SPECIAL_TOKENS]
    )
    backend.add_tokens([AddedToken(token, special=False, normalized=False) for token in JANUS_ROLE_TOKENS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        extra_special_tokens={
            "image_token": "<image_placeholder>",
            "boi_token": "<begin_of_image>",
            "eoi_token": "<end_of_image>",
        },
    )
    tokenizer.padding_side = "left"
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in JANUS_SPECIAL_TOKENS}
    config = JanusConfig(
        text_config={
            "model_type": "llama",
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 256,
            "bos_token_id": ids["<bos>"],
            "eos_token_id": ids["<eos>"],
            "pad_token_id": ids["<pad>"],
            "initializer_range": initializer_range,
        },
        vision_config={
            "initializer_range": initializer_range,
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 8,
            "projection_dim": 32,
            "depth": 2,
            "num_image_tokens": 16,
            "mlp_ratio": 2.0,
        },
        vq_config={
            "embed_dim": 8,
            "num_embeddings": codebook,
            "latent_channels": 32,
            "base_channels": 32,
            "channel_multiplier": [1, 2, 2],
            "num_res_blocks": 1,
            "num_patches": image_tokens_side,
            "projection_dim": 32,
            "image_token_embed_dim": 32,
            "num_hidden_layers": 2,
        },
        image_token_id=ids["<image_placeholder>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = JanusForConditionalGeneration(config).eval()
    processor = JanusProcessor(
        image_processor=JanusImageProcessor(size={"height": 32, "width": 32}, do_center_crop=False),
        tokenizer=tokenizer,
        num_image_tokens=16,
        chat_template="{% for message in messages %}{{ message['content'] }}{% endfor %}",
    )
    return model, processor
