"""VLM-as-judge: a transformers image-text-to-text model answers templated questions about each sample.

The reward is read from the judge's next-token distribution after the question, in one batched forward pass
(no sampling, no generation):

- ``answer="yes_no"``: ``P(yes)``. With ``z`` the last-position logits, ``Y`` / ``N`` the token ids of the
  yes / no words, ``normalise="yes_no"`` gives ``sum_Y e^z / (sum_Y e^z + sum_N e^z)`` (the two answers
  renormalised, VQAScore-style "P(yes | yes or no)"), ``normalise="vocabulary"`` gives ``sum_Y softmax(z)``
  (VQAScore's plain ``P("Yes")`` over the whole vocabulary).
- ``answer="score"``: the expectation ``sum_k v_k softmax(z_S)_k`` over the score tokens ``S`` (``1`` .. ``10``
  by default, each a single token, ``v_k`` its number).

Questions come from ``questions`` (templates formatted with ``{prompt}`` and the sample's metadata fields) or,
when a sample's metadata has ``question_key`` (a string or a list of strings), from there; several questions
per sample are averaged (``reduce="mean"``) or the weakest is kept (``"min"``). A missing judge model fails in
``__init__`` with one line (``rewards.weights.load_pretrained``), i.e. when the trainer builds its rewards,
before the first rollout; ``weight_sources`` lets start-up checks find it earlier.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from gen_rl.core.dtypes import resolve_device, resolve_dtype
from rewards.base import Reward, RewardOutput, register_reward
from rewards.weights import load_pretrained

DEFAULT_QUESTION = "Does this image show {prompt}? Answer yes or no."
DEFAULT_SCORE_QUESTION = "Rate from 1 to 10 how well this image matches {prompt}. Answer with one number."
JUDGE_PUBLISHED = "the hub page of the judge model (e.g. https://huggingface.co/Qwen/Qwen2-VL-2B-Instruct)"
ANSWERS = ("yes_no", "score")
NORMALISATIONS = ("yes_no", "vocabulary")


def to_pil(image: Tensor) -> Image.Image:
    """``[3, H, W]`` pixels in [0, 1] as an 8-bit RGB PIL image (what the processors read)."""
    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(array))


def yes_probability(logits: Tensor, yes_ids: Sequence[int], no_ids: Sequence[int], normalise: str) -> Tensor:
    """``P(yes)`` ``[N]`` from next-token ``logits`` ``[N, V]`` (see the module docstring for both modes)."""
    logits = logits.float()
    if normalise == "vocabulary":
        return logits.softmax(dim=-1)[:, list(yes_ids)].sum(dim=-1)
    if normalise != "yes_no":
        raise ValueError(f"normalise must be one of {NORMALISATIONS}; got {normalise!r}")
    answers = logits[:, [*yes_ids, *no_ids]].softmax(dim=-1)
    return answers[:, : len(yes_ids)].sum(dim=-1)


def score_expectation(logits: Tensor, score_ids: Sequence[int], values: Sequence[float]) -> Tensor:
    """``sum_k v_k softmax(z_S)_k`` ``[N]``: the expected score over the score tokens ``S``."""
    probabilities = logits.float()[:, list(score_ids)].softmax(dim=-1)
    return probabilities @ torch.tensor(list(values), dtype=torch.float32, device=logits.device)


class JudgeModel:
    """A transformers image-text-to-text model (any ``AutoModelForImageTextToText``) read at its next token.

    ``next_token_logits(images, texts)`` asks each query (its images, then its text) as one user turn of the
    processor's chat template and returns the logits ``[N, V]`` the model gives the first answer token.
    """

    def __init__(
        self,
        model: str,
        processor: str | None = None,
        device: str | None = None,
        dtype: str = "float32",
        batch_size: int = 8,
        system_prompt: str | None = None,
    ) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.device = resolve_device(device)
        self.batch_size = int(batch_size)
        self.system_prompt = system_prompt
        what = f"judge model {model!r}"
        self.model = load_pretrained(
            AutoModelForImageTextToText.from_pretrained, model, what=what, published=JUDGE_PUBLISHED
        )
        self.model.to(device=self.device, dtype=resolve_dtype(dtype)).eval().requires_grad_(False)
        self.processor = load_pretrained(
            AutoProcessor.from_pretrained,
            processor or model,
            what=f"judge processor {processor or model!r}",
            published=JUDGE_PUBLISHED,
        )
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.tokenizer.padding_side = "left"  # the answer position is the last one of every row

    def token_id(self, word: str) -> int:
        """The id of ``word`` as one token of the judge's tokenizer; ``ValueError`` when it is not one token."""
        ids = self.tokenizer.encode(word, add_special_tokens=False)
        if len(ids) != 1 or ids[0] == self.tokenizer.unk_token_id:
            raise ValueError(
                f"the judge's tokenizer does not read {word!r} as one known token (got ids {ids}); choose answer "
                "words that are single tokens of this judge (e.g. 'yes' / 'Yes', score words '0' .. '9')"
            )
        return int(ids[0])

    def prompt_text(self, num_images: int, text: str) -> str:
        content: list[dict[str, Any]] = [{"type": "image"} for _ in range(num_images)]
        content.append({"type": "text", "text": text})
        messages: list[dict[str, Any]] = [{"role": "user", "content": content}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": [{"type": "text", "text": self.system_prompt}]})
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    @torch.no_grad()
    def next_token_logits(self, images: Sequence[Sequence[Tensor]], texts: Sequence[str]) -> Tensor:
        """Logits ``[N, V]`` float32 (CPU) of the first answer token of each query ``(images[i], texts[i])``."""
        rows = []
        for start in range(0, len(texts), self.batch_size):
            chunk_images = images[start : start + self.batch_size]
            chunk_texts = texts[start : start + self.batch_size]
            prompts = [
                self.prompt_text(len(views), text)
                for views, text in zip(chunk_images, chunk_texts, strict=True)
            ]
            flat = [to_pil(view) for views in chunk_images for view in views]
            encoded = self.processor(text=prompts, images=flat or None, padding=True, return_tensors="pt")
            encoded = encoded.to(self.device)
            logits = self.model(**encoded).logits  # [n, T, V]
            mask = encoded["attention_mask"]
            positions = torch.arange(mask.shape[1], device=mask.device)
            last = (mask * positions).argmax(dim=1)  # the last real token of each row (left or right padded)
            rows.append(logits[torch.arange(logits.shape[0], device=logits.device), last].float().cpu())
        return torch.cat(rows) if rows else torch.empty(0, 0)


class _Fields(dict):
    """Template fields that name the missing key in one line."""

    def __missing__(self, key: str) -> str:
        raise ValueError(
            f"question template field {{{key}}} is neither 'prompt' nor a key of the sample's metadata "
            f"(keys: {sorted(k for k in self if k != 'prompt')}); fix the template or the metadata"
        )


def format_question(template: str, prompt: str, metadata: dict) -> str:
    """``template`` with ``{prompt}`` and the metadata's fields filled in."""
    fields = _Fields({key: value for key, value in metadata.items() if isinstance(key, str)})
    fields["prompt"] = prompt
    return string.Formatter().vformat(template, (), fields)


def sample_questions(templates: Sequence[str], question_key: str, prompt: str, metadata: dict) -> list[str]:
    """The questions asked about one sample: the metadata's own (``question_key``), else the templates."""
    own = metadata.get(question_key) if question_key else None
    if own:
        return [own] if isinstance(own, str) else [str(question) for question in own]
    return [format_question(template, prompt, metadata) for template in templates]


@register_reward("vlm_judge", "vqa_score")
class VLMJudge(Reward):
    """``P(yes)`` (or the expected 1-10 score) of a VLM judge answering templated questions about a sample."""

    weight_sources: ClassVar[dict[str, str]] = {"model": "config.json"}

    def __init__(
        self,
        model: str,
        processor: str | None = None,
        questions: str | list[str] | None = None,
        question_key: str = "questions",
        answer: str = "yes_no",
        normalise: str = "yes_no",
        yes_words: Sequence[str] = ("yes", "Yes"),
        no_words: Sequence[str] = ("no", "No"),
        score_words: Sequence[str] = tuple(str(k) for k in range(1, 11)),
        reduce: str = "mean",
        device: str | None = None,
        dtype: str = "float32",
        batch_size: int = 8,
        system_prompt: str | None = None,
    ) -> None:
        if answer not in ANSWERS:
            raise ValueError(f"vlm_judge: answer must be one of {ANSWERS}; got {answer!r}")
        if normalise not in NORMALISATIONS:
            raise ValueError(f"vlm_judge: normalise must be one of {NORMALISATIONS}; got {normalise!r}")
        if reduce not in ("mean", "min"):
            raise ValueError(f"vlm_judge: reduce must be 'mean' or 'min'; got {reduce!r}")
        default = DEFAULT_QUESTION if answer == "yes_no" else DEFAULT_SCORE_QUESTION
        self.templates = [questions] if isinstance(questions, str) else list(questions or [default])
        self.question_key, self.answer, self.normalise, self.reduce = question_key, answer, normalise, reduce
        self.judge = JudgeModel(model, processor, device, dtype, batch_size, system_prompt)
        self.yes_ids = [self.judge.token_id(word) for word in yes_words]
        self.no_ids = [self.judge.token_id(word) for word in no_words]
        self.score_ids = [self.judge.token_id(word) for word in score_words] if answer == "score" else []
        self.score_values = [float(word) for word in score_words] if answer == "score" else []

    def answer_values(self, logits: Tensor) -> Tensor:
        """``P(yes)`` or the expected score ``[N]`` of each question's answer logits ``[N, V]``."""
        if self.answer == "score":
            return score_expectation(logits, self.score_ids, self.score_values)
        return yes_probability(logits, self.yes_ids, self.no_ids, self.normalise)

    def ask(self, views: Sequence[Tensor], questions: Sequence[str]) -> Tensor:
        """The answer value ``[N]`` of each question about its image ``views[i]`` ``[3, H, W]`` (one batch)."""
        return self.answer_values(self.judge.next_token_logits([[view] for view in views], questions))

    def score(self, pixels: Tensor, prompts: list[str], metadata: list[dict]) -> RewardOutput:
        """Mean (or min) over each sample's questions of ``P(yes)`` / the expected score."""
        per_sample = [
            sample_questions(self.templates, self.question_key, prompt, record)
            for prompt, record in zip(prompts, metadata, strict=True)
        ]
        owners = [index for index, questions in enumerate(per_sample) for _ in questions]
        values = self.ask([pixels[index] for index in owners], [q for qs in per_sample for q in qs])
        scores, spread = [], []
        for index in range(len(per_sample)):
            mine = values[[position for position, owner in enumerate(owners) if owner == index]]
            scores.append(mine.mean() if self.reduce == "mean" else mine.min())
            spread.append(mine.max() - mine.min())
        return RewardOutput(
            scores=torch.stack(scores), components={"judge_question_spread": torch.stack(spread)}
        )
