"""Tiny randomly initialised Qwen2-VL / Qwen2.5-VL / LLaVA built in code: tests, the CPU demo config and the
benchmark.

The architectures are the real ``Qwen2VLForConditionalGeneration`` / ``Qwen2_5_VLForConditionalGeneration``
(vision tower, merger, M-RoPE decoder) at about a hundred thousand parameters, with the real processors (image
processor at 56 x 56 pixels = 16 patches = 4 image tokens, a video processor at 56 x 56 pixels per frame, two
frames per temporal patch, so 4 frames = 8 video tokens; a chat template with Qwen's special tokens), and
``LlavaForConditionalGeneration`` (CLIP vision tower, MLP projector, Llama decoder, 60k parameters) with
``LlavaProcessor`` (CLIP image processor resizing to 28 x 28 = 4 patches = 4 image tokens, no video).
The tokenizer is word-level and built in-process from :data:`WORDS`, so colour names are single tokens and
the synthetic colour task is learnable in a few dozen steps. Nothing is downloaded; save a model with
``save_pretrained`` and load it back through :func:`gen_rl.vlm.policy.load_policy` like any hub checkpoint.
"""

from __future__ import annotations

import torch
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPImageProcessorPil,
    GenerationConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
)
from transformers.utils import is_torchvision_available

from gen_rl.vlm.compat import placeholder_video_processor

__all__ = [
    "COLOURS",
    "SPECIAL_TOKENS",
    "TAG_TOKENS",
    "TINY_BUILDERS",
    "WORDS",
    "build_word_tokenizer",
    "tiny_qwen2_vl",
    "tiny_qwen2_5_vl",
    "tiny_llava",
]

# Qwen2-VL's special tokens (same strings as the real checkpoints); the first one is the padding token.
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
# R1-style reasoning / answer tags, kept whole by the tokenizer (not special: they survive decoding).
TAG_TOKENS = ("<think>", "</think>", "<answer>", "</answer>")
COLOURS = ("red", "green", "blue", "yellow")
WORDS = (
    "<unk>",
    "system",
    "user",
    "assistant",
    "you",
    "are",
    "a",
    "helpful",
    "what",
    "is",
    "the",
    "colour",
    "of",
    "this",
    "image",
    "answer",
    "with",
    "one",
    "word",
    "?",
    ".",
    *COLOURS,
    *(str(digit) for digit in range(10)),
)

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_word_tokenizer(extra_special_tokens: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """Word-level tokenizer: ids 0..7 are Qwen's special tokens, then the R1 tags, then :data:`WORDS`, then
    ``extra_special_tokens`` (another architecture's image token, say)."""
    tokens = [*SPECIAL_TOKENS, *TAG_TOKENS, *WORDS, *extra_special_tokens]
    vocab = {token: index for index, token in enumerate(tokens)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(
        [
            AddedToken(token, special=True, normalized=False)
            for token in (*SPECIAL_TOKENS, *extra_special_tokens)
        ]
    )
    backend.add_tokens([AddedToken(token, special=False, normalized=False) for token in TAG_TOKENS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        unk_token="<unk>",
        model_max_length=4096,
    )
    tokenizer.padding_side = "left"
    return tokenizer


def _text_config(tokenizer, ids: dict[str, int], **extra: object) -> dict:
    """The tiny decoder every tiny VLM shares (2 layers, width 32), plus the architecture's ``extra`` keys."""
    return {
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
        **extra,
    }


QWEN_ROPE = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 1, 1]}  # multimodal RoPE


def _special_token_config(ids: dict[str, int]) -> dict:
    return {
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "tie_word_embeddings": False,
    }


def _finish(model_class, config, processor_class, tokenizer, ids: dict[str, int], seed: int):
    torch.manual_seed(seed)
    model = model_class(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]
    )
    processor = processor_class(
        image_processor=Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=56 * 56),
        tokenizer=tokenizer,
        video_processor=_video_processor(),
        chat_template=CHAT_TEMPLATE,
    )
    return model, processor


def tiny_qwen2_vl(seed: int = 0) -> tuple[Qwen2VLForConditionalGeneration, Qwen2VLProcessor]:
    """A ~105k-parameter Qwen2-VL and its processor, deterministic in ``seed`` (float32, eval mode)."""
    tokenizer = build_word_tokenizer()
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    config = Qwen2VLConfig(
        text_config=_text_config(tokenizer, ids, rope_parameters=QWEN_ROPE),
        vision_config={
            "depth": 2,
            "embed_dim": 32,
            "hidden_size": 32,
            "num_heads": 4,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        **_special_token_config(ids),
    )
    return _finish(Qwen2VLForConditionalGeneration, config, Qwen2VLProcessor, tokenizer, ids, seed)


def tiny_qwen2_5_vl(seed: int = 0) -> tuple[Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor]:
    """A ~100k-parameter Qwen2.5-VL (windowed vision attention, one full-attention block) and its processor."""
    tokenizer = build_word_tokenizer()
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    config = Qwen2_5_VLConfig(
        text_config=_text_config(tokenizer, ids, rope_parameters=QWEN_ROPE),
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 4,
            "out_hidden_size": 32,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 56,
            "fullatt_block_indexes": [1],
        },
        **_special_token_config(ids),
    )
    return _finish(Qwen2_5_VLForConditionalGeneration, config, Qwen2_5_VLProcessor, tokenizer, ids, seed)


LLAVA_IMAGE_TOKEN = "<image>"


def tiny_llava(seed: int = 0) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A ~60k-parameter LLaVA (CLIP vision tower, 2-layer MLP projector, Llama decoder) and its processor.

    Images are resized to 28 x 28 (no centre crop, so the model's pixel frame is the whole image scaled):
    2 x 2 patches of 14 px = 4 image tokens (the CLS feature is dropped, ``vision_feature_select_strategy``
    "default"). The chat template is the Qwen-style one with ``<image>`` as the image placeholder.
    """
    tokenizer = build_word_tokenizer(extra_special_tokens=(LLAVA_IMAGE_TOKEN,))
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in (*SPECIAL_TOKENS, LLAVA_IMAGE_TOKEN)}
    config = LlavaConfig(
        vision_config={
            "model_type": "clip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 28,
            "patch_size": 14,
        },
        text_config=_text_config(tokenizer, ids, model_type="llama"),
        image_token_index=ids[LLAVA_IMAGE_TOKEN],
        image_seq_length=4,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]
    )
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"height": 28, "width": 28}, do_center_crop=False),
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token=LLAVA_IMAGE_TOKEN,
        chat_template=CHAT_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", LLAVA_IMAGE_TOKEN),
    )
    return model, processor


TINY_BUILDERS = {"qwen2_vl": tiny_qwen2_vl, "qwen2_5_vl": tiny_qwen2_5_vl, "llava": tiny_llava}


def _video_processor():
    """Qwen2-VL's video processor (56 x 56 pixels per frame) where torchvision is installed, else a placeholder
    (images only)."""
    if is_torchvision_available():
        from transformers import Qwen2VLVideoProcessor

        return Qwen2VLVideoProcessor(
            size={"shortest_edge": 56 * 56, "longest_edge": 56 * 56}, cap_pixels_per_frame=False
        )
    return placeholder_video_processor()
