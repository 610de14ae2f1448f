"""Rollouts of a vision-language policy: prompt encoding, batched sampling, completion masks, token log-probs.

* Prompts are encoded one by one with the processor (chat template, images, videos), so each prompt owns its
  visual tensors; a batch of any subset of completions concatenates them along dim 0 in completion order (Qwen's
  flattened patches + ``image_grid_thw`` rows, or one row per image elsewhere) and left-pads the tokens. Pixel
  values therefore stay aligned with their prompts however prompts with several images are batched.
* Prompts longer than the budget lose words of the problem text only: image tokens are never truncated.
* Videos (sampled frames, :mod:`gen_rl.vlm.video`) go to the processor as video inputs with their frame
  times; a prompt with a video whose encoding carries no video tensor is an error, never a text-only prompt.
* :func:`processed_image_sizes` gives each image's size as the model sees it for any processor (the frame
  box rewards convert coordinates from).
* Sampling is plain temperature sampling (no top-k / top-p / penalties); the vision special tokens are
  suppressed (never generated). Token log-probs are recomputed with the same temperature and the same
  suppressed tokens, so they equal the sampling distribution's (policy ratio 1 before any update).
* Left padding: Qwen-style models with M-RoPE compute their 3-D positions from the attention mask; other
  models get ``position_ids = cumsum(attention_mask) - 1``, as ``generate`` uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from transformers import GenerationConfig
from transformers.video_processing_utils import VideoProcessorMixin

from gen_rl.vlm.video import VideoClip

__all__ = [
    "EncodedPrompt",
    "SamplingSettings",
    "Rollout",
    "build_messages",
    "encode_prompt",
    "collate_prompts",
    "sequence_inputs",
    "sampling_generation_config",
    "generate_completions",
    "completion_mask",
    "token_log_probs",
    "completion_log_probs",
    "sample_rollout",
    "vision_token_ids",
    "uses_mrope",
    "processed_image_sizes",
    "check_video_support",
    "greedy_generation_config",
    "decode_texts",
]

# per-token fields of processor outputs (padded like input_ids, zeros for completion tokens)
_TOKEN_FIELDS = ("mm_token_type_ids", "token_type_ids")
_VISION_TOKEN_ATTRIBUTES = (
    "image_token_id",
    "image_token_index",
    "video_token_id",
    "video_token_index",
    "vision_start_token_id",
    "vision_end_token_id",
    "vision_token_id",
    "boi_token_index",
    "eoi_token_index",
)


@dataclass
class EncodedPrompt:
    """One prompt as the processor encoded it (batch dimension removed).

    Attributes:
        input_ids: ``[L]`` prompt tokens (chat template applied, image placeholders expanded).
        token_fields: per-token fields such as ``mm_token_type_ids`` (``[L]`` each).
        visual: processor tensors for the prompt's images (``pixel_values``, ``image_grid_thw``, ...), whose dim 0
            runs over patches or images and concatenates across prompts.
        processed_sizes: ``(height, width)`` of each image as the model saw it (:func:`processed_image_sizes`).
        num_videos: videos encoded in the prompt.
    """

    input_ids: Tensor
    token_fields: dict[str, Tensor] = field(default_factory=dict)
    visual: dict[str, Tensor] = field(default_factory=dict)
    processed_sizes: list[tuple[int, int]] = field(default_factory=list)
    num_videos: int = 0

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def build_messages(
    problem: str, num_images: int, system_prompt: str = "", num_videos: int = 0
) -> list[dict[str, Any]]:
    """Chat messages: optional system message, then one user turn with the images, then the videos, then the
    text."""
    messages: list[dict[str, Any]] = []
    if system_prompt:
        messages.append({"role": "system", "content": [{"type": "text", "text": system_prompt}]})
    content = [{"type": "image"} for _ in range(num_images)] + [{"type": "video"} for _ in range(num_videos)]
    messages.append({"role": "user", "content": [*content, {"type": "text", "text": problem}]})
    return messages


def check_video_support(processor) -> None:
    """Raise unless ``processor`` has a working video processor (a video must never train as text only)."""
    video_processor = getattr(processor, "video_processor", None)
    if video_processor is None or type(video_processor) is VideoProcessorMixin:
        reason = (
            "a placeholder video processor (torchvision is not installed: pip install torchvision)"
            if video_processor is not None
            else "no video processor (the model takes images only)"
        )
        raise ValueError(
            f"a record has a video but the model's {type(processor).__name__} has {reason}; use a video model "
            "(Qwen2-VL / Qwen2.5-VL) or drop the record's 'video'"
        )


def _frame_size(processor, video_pixels: tuple[int, int]) -> dict[str, int] | None:
    """The video processor's ``size`` with ``(min_pixels, max_pixels)`` per frame set where non-zero."""
    min_pixels, max_pixels = video_pixels
    if not (min_pixels or max_pixels):
        return None
    current = getattr(processor.video_processor, "size", None) or {}
    return {
        "shortest_edge": int(min_pixels or current.get("shortest_edge") or 0),
        "longest_edge": int(max_pixels or current.get("longest_edge") or 0),
    }


def _encode_once(
    processor,
    text: str,
    images: Sequence,
    system_prompt: str,
    videos: Sequence[VideoClip] = (),
    video_pixels: tuple[int, int] = (0, 0),
) -> dict[str, Tensor]:
    messages = build_messages(text, len(images), system_prompt, num_videos=len(videos))
    chat = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    kwargs: dict[str, Any] = {}
    if videos:  # frames are sampled already: the processor keeps them all and reads their times
        kwargs["videos"] = [list(clip.frames) for clip in videos]
        kwargs["video_metadata"] = [clip.metadata() for clip in videos]
        kwargs["do_sample_frames"] = False
        size = _frame_size(processor, video_pixels)
        if size is not None:
            kwargs["videos_kwargs"] = {"size": size}
    return processor(text=[chat], images=list(images) or None, return_tensors="pt", **kwargs)


def _first_tokens(tokenizer, text: str, count: int) -> str:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][: max(count, 0)]
    return tokenizer.decode(ids, skip_special_tokens=False)


def encode_prompt(
    processor,
    problem: str,
    images: Sequence,
    system_prompt: str = "",
    max_prompt_length: int = 0,
    question_template: str = "{problem}",
    videos: Sequence[VideoClip] = (),
    video_pixels: tuple[int, int] = (0, 0),
) -> EncodedPrompt:
    """Encode one prompt (``question_template`` with ``{problem}`` filled in, after the images and videos;
    ``video_pixels = (min, max)`` pixels per frame where non-zero, Qwen's video ``size``).

    With ``max_prompt_length > 0`` a prompt that is too long loses tokens from the end of the problem text only:
    the template, the system prompt and the image / video tokens are never cut.
    """
    if videos:
        check_video_support(processor)
    template = question_template
    encoded = _encode_once(
        processor, template.replace("{problem}", problem), images, system_prompt, videos, video_pixels
    )
    for _ in range(4):  # decoding and re-encoding can shift a token or two: re-check
        length = encoded["input_ids"].shape[1]
        if not max_prompt_length or length <= max_prompt_length:
            return _to_encoded_prompt(processor, encoded, len(images), len(videos))
        problem_tokens = len(processor.tokenizer(problem, add_special_tokens=False)["input_ids"])
        keep = problem_tokens - (length - max_prompt_length)
        if keep <= 0:
            break
        problem = _first_tokens(processor.tokenizer, problem, keep)
        encoded = _encode_once(
            processor, template.replace("{problem}", problem), images, system_prompt, videos, video_pixels
        )
    raise ValueError(
        f"a prompt is {encoded['input_ids'].shape[1]} tokens and cutting its problem text cannot bring it within "
        f"data.max_prompt_length={max_prompt_length} (template, system prompt and image tokens are never cut); "
        "raise data.max_prompt_length or lower model.max_pixels"
    )


def _to_encoded_prompt(processor, encoded, num_images: int, num_videos: int) -> EncodedPrompt:
    input_ids = encoded["input_ids"][0]
    token_fields, visual = {}, {}
    for name, value in encoded.items():
        if name in ("input_ids", "attention_mask") or not isinstance(value, Tensor):
            continue
        if name in _TOKEN_FIELDS:
            token_fields[name] = value[0]
        else:
            visual[name] = value
    if num_videos and not any("video" in name for name in visual):
        raise ValueError(
            f"the {type(processor).__name__} returned no video tensor for a prompt with {num_videos} video(s) "
            f"(got {sorted(visual)}); the model cannot see the video: use a video model or drop the video"
        )
    sizes = processed_image_sizes(processor, visual, num_images)
    return EncodedPrompt(input_ids, token_fields, visual, sizes, num_videos)


def processed_image_sizes(processor, visual: dict[str, Tensor], num_images: int) -> list[tuple[int, int]]:
    """``(height, width)`` of each image in the pixel frame the model sees, for any processor.

    Grid processors (Qwen2-VL family: ``image_grid_thw`` rows, in patches) give ``grid x patch_size``; processors
    that return one pixel tensor per image (``pixel_values [num_images, C, H, W]``: LLaVA, PaliGemma, Gemma 3,
    ...) give its ``(H, W)``. Tiling processors (several crops per image: Idefics3, InternVL, LLaVA-NeXT) and
    processors that centre-crop or pad (CLIP's default crop) have no frame that is the whole image scaled per
    axis: ``[]``, and box rewards then need the record's ``box_format`` (see :mod:`rewards.verifiable.boxes`).
    """
    if not num_images:
        return []
    patch_size = getattr(getattr(processor, "image_processor", None), "patch_size", None)
    if "image_grid_thw" in visual and patch_size:
        return [
            (int(grid_h * patch_size), int(grid_w * patch_size))
            for _, grid_h, grid_w in visual["image_grid_thw"].tolist()
        ]
    image_processor = getattr(processor, "image_processor", None)
    if getattr(image_processor, "do_center_crop", False) or getattr(image_processor, "do_pad", False):
        return []  # a crop or pad is no per-axis scale of the whole image: no frame box rewards could use
    pixels = visual.get("pixel_values")
    if pixels is not None and pixels.dim() == 4 and pixels.shape[0] == num_images:
        return [(int(pixels.shape[-2]), int(pixels.shape[-1]))] * num_images
    return []


def collate_prompts(prompts: Sequence[EncodedPrompt], pad_token_id: int) -> dict[str, Tensor]:
    """Left-padded prompt batch: ``input_ids``, ``attention_mask``, per-token fields, concatenated visuals."""
    max_length = max(len(prompt) for prompt in prompts)
    batch_size = len(prompts)
    input_ids = torch.full((batch_size, max_length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch_size, max_length), dtype=torch.long)
    token_field_names = sorted({name for prompt in prompts for name in prompt.token_fields})
    token_fields = {
        name: torch.zeros((batch_size, max_length), dtype=torch.long) for name in token_field_names
    }
    for row, prompt in enumerate(prompts):
        start = max_length - len(prompt)
        input_ids[row, start:] = prompt.input_ids
        attention_mask[row, start:] = 1
        for name, values in prompt.token_fields.items():
            token_fields[name][row, start:] = values
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, **token_fields}
    visual_names = sorted({name for prompt in prompts for name in prompt.visual})
    for name in visual_names:
        batch[name] = torch.cat([prompt.visual[name] for prompt in prompts if name in prompt.visual], dim=0)
    return batch


def sequence_inputs(
    prompts: Sequence[EncodedPrompt], completion_ids: Tensor, completion_mask: Tensor, pad_token_id: int
) -> dict[str, Tensor]:
    """Model inputs for prompt + completion: completion tokens after the first EOS are masked out."""
    batch = collate_prompts(prompts, pad_token_id)
    completion_ids = completion_ids.cpu()
    batch["input_ids"] = torch.cat([batch["input_ids"], completion_ids], dim=1)
    batch["attention_mask"] = torch.cat([batch["attention_mask"], completion_mask.long().cpu()], dim=1)
    for name in _TOKEN_FIELDS:
        if name in batch:
            batch[name] = torch.cat([batch[name], torch.zeros_like(completion_ids)], dim=1)
    return batch


@dataclass
class SamplingSettings:
    """What a rollout samples with; the same temperature and suppressed tokens apply to log-probs."""

    max_new_tokens: int
    temperature: float
    eos_token_ids: list[int]
    pad_token_id: int
    suppress_token_ids: list[int]


def sampling_generation_config(settings: SamplingSettings, return_scores: bool = False) -> GenerationConfig:
    """Pure temperature sampling: every other logits warper / penalty is set to a value that builds no processor.

    ``min_p`` stays unset (any value builds a warper); ``load_policy`` clears the checkpoint's generation
    defaults, so nothing fills it in.
    """
    return GenerationConfig(
        do_sample=True,
        num_beams=1,
        temperature=settings.temperature,
        top_k=0,
        top_p=1.0,
        typical_p=1.0,
        epsilon_cutoff=0.0,
        eta_cutoff=0.0,
        repetition_penalty=1.0,
        encoder_repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        min_new_tokens=0,
        output_scores=return_scores,
        **_budget_and_stops(settings),
    )


def greedy_generation_config(settings: SamplingSettings) -> GenerationConfig:
    """Greedy decoding (argmax after suppressing the vision tokens) with the rollout's budget and EOS ids."""
    return GenerationConfig(do_sample=False, num_beams=1, **_budget_and_stops(settings))


def _budget_and_stops(settings: SamplingSettings) -> dict:
    """The generate settings sampled and greedy decoding share: token budget, EOS / pad / suppressed ids."""
    return {
        "max_new_tokens": settings.max_new_tokens,
        "eos_token_id": list(settings.eos_token_ids),
        "pad_token_id": settings.pad_token_id,
        "suppress_tokens": list(settings.suppress_token_ids) or None,
        "use_cache": True,
        "return_dict_in_generate": True,
    }


def completion_mask(completion_ids: Tensor, eos_token_ids: Sequence[int]) -> tuple[Tensor, Tensor]:
    """``[N, C]`` bool mask of each completion's tokens up to and including its first EOS, and ``[N]`` truncated.

    A completion without EOS (it hit the token budget) keeps all its tokens and is flagged truncated.
    """
    eos = torch.tensor(list(eos_token_ids), device=completion_ids.device)
    is_eos = torch.isin(completion_ids, eos)
    has_eos = is_eos.any(dim=1)
    length = completion_ids.shape[1]
    first_eos = torch.where(
        has_eos, is_eos.int().argmax(dim=1), torch.full_like(has_eos, length, dtype=torch.long)
    )
    positions = torch.arange(length, device=completion_ids.device)[None, :]
    return positions <= first_eos[:, None], ~has_eos


@torch.no_grad()
def generate_completions(
    model,
    prompt_batch: dict[str, Tensor],
    settings: SamplingSettings,
    return_scores: bool = False,
    greedy: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Sample (or, with ``greedy``, decode greedily) one completion per prompt row; returns
    ``completion_ids [N, C]`` and, if asked, the processed scores ``[N, C, V]`` the tokens were sampled from
    (temperature and suppression applied)."""
    device = next(model.parameters()).device
    inputs = {name: value.to(device) for name, value in prompt_batch.items()}
    if greedy:
        generation_config = greedy_generation_config(settings)
        generation_config.output_scores = return_scores
    else:
        generation_config = sampling_generation_config(settings, return_scores)
    output = model.generate(**inputs, generation_config=generation_config)
    prompt_length = inputs["input_ids"].shape[1]
    completion_ids = output.sequences[:, prompt_length:]
    scores = torch.stack(output.scores, dim=1) if return_scores else None
    return completion_ids, scores


def token_log_probs(
    logits: Tensor,
    token_ids: Tensor,
    temperature: float = 1.0,
    suppress_token_ids: Sequence[int] = (),
    with_entropy: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """``log softmax(logits / T)[token]`` per position with the suppressed tokens' logits at -inf, i.e. the
    sampling distribution of ``generate`` (temperature warper + ``suppress_tokens``), ``[N, C, V] -> [N, C]``.

    With ``with_entropy``, also that distribution's entropy ``-sum_v p_v log p_v`` per position ``[N, C]``
    (no gradient). Computed one completion at a time in float32, so the float32 copy of the logits is one row.
    """
    suppressed = torch.tensor(list(suppress_token_ids), dtype=torch.long, device=logits.device)
    rows, entropies = [], []
    for row_logits, row_ids in zip(logits, token_ids, strict=True):
        row_logits = row_logits.float() / temperature
        if suppressed.numel():
            row_logits = row_logits.index_fill(-1, suppressed, float("-inf"))
        picked = row_logits.gather(-1, row_ids[:, None]).squeeze(-1)
        normaliser = torch.logsumexp(row_logits, dim=-1)
        rows.append(picked - normaliser)
        if with_entropy:  # -sum p log p; entr(0) = 0 for the suppressed tokens; detached: no graph
            entropies.append(torch.special.entr(torch.softmax(row_logits.detach(), dim=-1)).sum(dim=-1))
    if with_entropy:
        return torch.stack(rows), torch.stack(entropies)
    return torch.stack(rows)


def _unwrap(model):
    while hasattr(model, "module"):  # DDP / accelerate wrappers
        model = model.module
    if hasattr(model, "get_base_model"):  # peft
        model = model.get_base_model()
    return model


def uses_mrope(model) -> bool:
    """Whether the model derives (3-D) positions from the attention mask itself (Qwen2-VL family)."""
    inner = getattr(_unwrap(model), "model", None)
    return callable(getattr(inner, "get_rope_index", None))


def _has_visual(batch: dict[str, Tensor]) -> bool:
    return any(name.startswith("pixel_values") for name in batch)


def completion_log_probs(
    model,
    batch: dict[str, Tensor],
    completion_ids: Tensor,
    temperature: float,
    suppress_token_ids: Sequence[int],
    with_entropy: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Log-probs ``[N, C]`` of ``completion_ids`` under ``model`` with the sampling temperature and suppression.

    ``batch`` comes from :func:`sequence_inputs` (prompt + completion); gradients flow when enabled. With
    ``with_entropy``, also the per-position entropy of that sampling distribution (see ``token_log_probs``).
    """
    device = completion_ids.device
    inputs = {name: value.to(device) for name, value in batch.items()}
    if not (uses_mrope(model) and _has_visual(inputs)):
        positions = inputs["attention_mask"].long().cumsum(dim=-1) - 1
        inputs["position_ids"] = positions.clamp_min(0)
    completion_length = completion_ids.shape[1]
    outputs = model(**inputs, use_cache=False, logits_to_keep=completion_length + 1)
    return token_log_probs(
        outputs.logits[:, :-1, :], completion_ids, temperature, suppress_token_ids, with_entropy
    )


def vision_token_ids(model_config, processor=None) -> list[int]:
    """Ids of the image / video / vision-boundary special tokens (never to be generated)."""
    ids = set()
    for attribute in _VISION_TOKEN_ATTRIBUTES:
        value = getattr(model_config, attribute, None)
        if isinstance(value, int):
            ids.add(value)
    for attribute in ("image_token_id", "video_token_id"):
        value = getattr(processor, attribute, None) if processor is not None else None
        if isinstance(value, int):
            ids.add(value)
    return sorted(ids)


@dataclass
class Rollout:
    """A rollout batch on one process: ``G`` completions per prompt, prompt-major.

    Attributes:
        prompts: the encoded prompt of each completion (shared objects within a group).
        records: the data record of each completion.
        group_ids: ``[N]`` group (prompt) id of each completion, unique across processes and rounds.
        completion_ids: ``[N, C]`` sampled tokens (padding after EOS).
        completion_mask: ``[N, C]`` bool, tokens up to and including the first EOS.
        is_truncated: ``[N]`` bool, no EOS within the token budget.
        texts: decoded completions (special tokens removed).
    """

    prompts: list[EncodedPrompt]
    records: list[Any]
    group_ids: Tensor
    completion_ids: Tensor
    completion_mask: Tensor
    is_truncated: Tensor
    texts: list[str]

    def __len__(self) -> int:
        return int(self.completion_ids.shape[0])

    def select(self, indices: Sequence[int]) -> Rollout:
        """The completions at ``indices`` (in that order)."""
        index = torch.as_tensor(list(indices), dtype=torch.long)
        return Rollout(
            prompts=[self.prompts[i] for i in indices],
            records=[self.records[i] for i in indices],
            group_ids=self.group_ids[index],
            completion_ids=self.completion_ids[index.to(self.completion_ids.device)],
            completion_mask=self.completion_mask[index.to(self.completion_mask.device)],
            is_truncated=self.is_truncated[index.to(self.is_truncated.device)],
            texts=[self.texts[i] for i in indices],
        )


def _pad_columns(tensor: Tensor, length: int, value: int | bool) -> Tensor:
    missing = length - tensor.shape[1]
    if missing <= 0:
        return tensor
    return torch.cat([tensor, tensor.new_full((tensor.shape[0], missing), value)], dim=1)


def decode_texts(processor, completion_ids: Tensor, mask: Tensor) -> list[str]:
    """Each completion's masked tokens as text (special tokens removed, whitespace stripped)."""
    return [
        processor.tokenizer.decode(ids[row_mask].tolist(), skip_special_tokens=True).strip()
        for ids, row_mask in zip(completion_ids, mask, strict=True)
    ]


def sample_rollout(
    model,
    processor,
    prompts: Sequence[EncodedPrompt],
    records: Sequence[Any],
    group_ids: Sequence[int],
    settings: SamplingSettings,
    group_size: int,
    generation_batch_size: int = 0,
) -> Rollout:
    """Sample ``group_size`` completions for each prompt, ``generation_batch_size`` completions per
    ``generate`` call (0 = all at once; rounded to whole groups), and decode them."""
    prompts_per_call = max(generation_batch_size // group_size, 1) if generation_batch_size else len(prompts)
    chunks = []
    for start in range(0, len(prompts), prompts_per_call):
        chunk = [prompt for prompt in prompts[start : start + prompts_per_call] for _ in range(group_size)]
        completion_ids, _ = generate_completions(
            model, collate_prompts(chunk, settings.pad_token_id), settings
        )
        chunks.append(completion_ids.cpu())
    mask_parts, truncated_parts = zip(
        *(completion_mask(ids, settings.eos_token_ids) for ids in chunks), strict=True
    )
    length = max(int(mask.sum(dim=1).max()) for mask in mask_parts)
    completion_ids = torch.cat(
        [_pad_columns(ids, length, settings.pad_token_id)[:, :length] for ids in chunks]
    )
    mask = torch.cat([_pad_columns(part, length, False)[:, :length] for part in mask_parts])
    completion_ids = completion_ids.masked_fill(~mask, settings.pad_token_id)
    texts = decode_texts(processor, completion_ids, mask)
    repeat = [index for index in range(len(prompts)) for _ in range(group_size)]
    return Rollout(
        prompts=[prompts[index] for index in repeat],
        records=[records[index] for index in repeat],
        group_ids=torch.tensor([group_ids[index] for index in repeat], dtype=torch.long),
        completion_ids=completion_ids,
        completion_mask=mask,
        is_truncated=torch.cat(truncated_parts),
        texts=texts,
    )
