"""SRUM's unified path: a model that both understands and generates (transformers ``JanusForConditionalGeneration``)
trains its image-token generation with the shared token-level policy-gradient core, rewarded by its own
understanding of what it drew.

One step, per prompt (a group of ``group_size`` images):

1. **Sample** image tokens autoregressively: the prompt ``<|User|>: {prompt} <|Assistant|>:<begin_of_image>`` is
   embedded, then each next VQ token is drawn from ``softmax(generation_head(h_t) / temperature)`` (with
   ``guidance_scale`` > 1, CFG against unconditional rows, as Janus samples) and fed back through
   ``prepare_embeddings_for_image_generation``; its log-probability is kept (the old policy).
2. **Decode** the tokens with the VQ decoder (``decode_image_tokens``) to pixels in [0, 1].
3. **Self-reward**: the same model, in understanding mode, is shown its image and asked a yes / no question; the
   reward is ``P(yes | yes or no)`` from its answer logits (``rewards.vlm_judge.yes_probability``; with objects in
   the metadata, the SRUM map of ``rewards.srum`` combines a global and one local answer per object).
4. **Update**: group advantages (``gen_rl.core.advantages.group_advantages``) and the token-level GRPO loss of
   ``gen_rl.vlm.objectives.policy_loss`` over the image tokens, their log-probs recomputed teacher-forced.

``trainable="generation"`` (default) trains only the generation embeddings, aligner and head, so the
understanding that judges stays fixed; ``"all"`` trains the language model too (the judge then moves with the
policy: true self-rewarding, and easier to hack). A held-out gold reward (any ``rewards`` reward, e.g. ``colour``)
is scored on the same images and reported beside the self-reward, to show whether the policy hacks itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from gen_rl.core.advantages import group_advantages
from gen_rl.vlm.objectives import MiniBatchNorms, policy_loss
from rewards.base import score_reward
from rewards.srum import pixel_box, region_view, reward_map
from rewards.vlm_judge import format_question, to_pil, yes_probability

GENERATION_PROMPT = "<|User|>: {prompt} <|Assistant|>:"
JUDGE_PROMPT = "<|User|>: <image_placeholder> {question} <|Assistant|>:"
DEFAULT_QUESTION = "does this image show {prompt} ? answer yes or no ."
GENERATION_MODULES = ("generation_embeddings", "generation_aligner", "generation_head")


@dataclass
class SelfRewardConfig:
    """Settings of a self-rewarded run (the VLM trainer's names where they exist)."""

    num_steps: int = 20
    group_size: int = 8
    lr: float = 1e-2
    clip_low: float = 0.2
    clip_high: float = 0.2
    loss: str = "grpo"
    inner_epochs: int = 1
    temperature: float = 1.0
    guidance_scale: float = 1.0  # Janus samples with 5 (CFG); 1 = no unconditional rows
    trainable: str = "generation"  # or "all"
    question: str = DEFAULT_QUESTION
    objects_key: str = "objects"
    yes_words: tuple[str, ...] = ("yes", "Yes")
    no_words: tuple[str, ...] = ("no", "No")
    seed: int = 0


class UnifiedPolicy:
    """A Janus-like unified model: samples image tokens with log-probs, decodes them, and judges images."""

    def __init__(self, model: Any, processor: Any, config: SelfRewardConfig) -> None:
        self.model, self.processor, self.config = model, processor, config
        self.tokenizer = processor.tokenizer
        self.language_model = model.model.language_model
        self.boi_id = self.tokenizer.convert_tokens_to_ids(processor.image_start_token)
        quant = model.model.vqmodel.quantize.quant_state_dims
        self.num_image_tokens = int(quant[0] * quant[1])
        self.yes_ids = [self._token(word) for word in config.yes_words]
        self.no_ids = [self._token(word) for word in config.no_words]

    def _token(self, word: str) -> int:
        ids = self.tokenizer.encode(word, add_special_tokens=False)
        if len(ids) != 1 or ids[0] == self.tokenizer.unk_token_id:
            raise ValueError(f"the unified model's tokenizer does not read {word!r} as one known token")
        return int(ids[0])

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The generation modules (``trainable="generation"``) or those plus the language model (``"all"``)."""
        self.model.requires_grad_(False)
        modules = [getattr(self.model.model, name) for name in GENERATION_MODULES]
        if self.config.trainable == "all":
            modules.append(self.language_model)
        elif self.config.trainable != "generation":
            raise ValueError(f"trainable must be 'generation' or 'all'; got {self.config.trainable!r}")
        for module in modules:
            module.requires_grad_(True)
        return [parameter for module in modules for parameter in module.parameters()]

    def prompt_ids(self, prompt: str) -> Tensor:
        """``[L]`` token ids of the generation prompt, ending with ``<begin_of_image>``."""
        text = GENERATION_PROMPT.format(prompt=prompt)
        ids = self.tokenizer.encode(text, add_special_tokens=False) + [self.boi_id]
        return torch.tensor(ids, dtype=torch.long)

    def _rows(self, prompt: str, count: int, device: torch.device) -> Tensor:
        """Prompt ids ``[count, L]``, followed with CFG by ``count`` unconditional rows (every token but the
        leading BOS and ``<begin_of_image>`` replaced by padding, as ``JanusForConditionalGeneration.generate``)."""
        ids = self.prompt_ids(prompt).to(device)[None].expand(count, -1)
        if self.config.guidance_scale == 1.0:
            return ids
        keep = ids == self.boi_id
        if self.tokenizer.bos_token_id is not None:
            keep |= (ids == self.tokenizer.bos_token_id) & (torch.arange(ids.shape[1], device=device) == 0)
        unconditional = torch.where(keep, ids, torch.full_like(ids, self.tokenizer.pad_token_id))
        return torch.cat([ids, unconditional])

    def _log_policy(self, hidden: Tensor) -> Tensor:
        """``log pi`` ``[count, ..., V]`` from hidden states ``[rows, ..., H]``: with CFG (scale ``w``),
        ``log_softmax((l_u + w (l_c - l_u)) / T)`` of the conditional / unconditional log-softmaxes (transformers'
        ``ClassifierFreeGuidanceLogitsProcessor`` then the temperature), else ``log_softmax(logits / T)``."""
        logits = self.model.model.generation_head(hidden).float()
        if self.config.guidance_scale != 1.0:
            conditional, unconditional = torch.log_softmax(logits, dim=-1).chunk(2)
            logits = unconditional + self.config.guidance_scale * (conditional - unconditional)
        return torch.log_softmax(logits / self.config.temperature, dim=-1)

    @torch.no_grad()
    def sample(self, prompt: str, count: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``count`` image-token sequences ``[G, n]`` and their log-probs ``[G, n]`` under the current policy."""
        from transformers import DynamicCache

        device = next(self.model.parameters()).device
        ids = self._rows(prompt, count, device)
        repeats = ids.shape[0] // count  # 2 with CFG: each token feeds its conditional and unconditional row
        cache = DynamicCache()
        embeds = self.model.get_input_embeddings()(ids)
        hidden = self.language_model(inputs_embeds=embeds, cache=cache, use_cache=True).last_hidden_state
        tokens, log_probs = [], []
        for _ in range(self.num_image_tokens):
            log_p = self._log_policy(hidden[:, -1])
            token = torch.multinomial(log_p.exp().cpu(), 1, generator=generator).to(device)[:, 0]
            tokens.append(token)
            log_probs.append(log_p.gather(1, token[:, None])[:, 0])
            step = self.model.prepare_embeddings_for_image_generation(token.repeat(repeats))[:, None]
            hidden = self.language_model(inputs_embeds=step, cache=cache, use_cache=True).last_hidden_state
        return torch.stack(tokens, dim=1), torch.stack(log_probs, dim=1)

    def log_probs(self, prompt: str, tokens: Tensor) -> Tensor:
        """Teacher-forced log-probs ``[G, n]`` of ``tokens`` (with gradient to the trainable parameters)."""
        ids = self._rows(prompt, tokens.shape[0], tokens.device)
        repeats = ids.shape[0] // tokens.shape[0]
        prompt_embeds = self.model.get_input_embeddings()(ids)
        image_embeds = self.model.prepare_embeddings_for_image_generation(tokens[:, :-1].repeat(repeats, 1))
        embeds = torch.cat([prompt_embeds, image_embeds.to(prompt_embeds.dtype)], dim=1)
        hidden = self.language_model(inputs_embeds=embeds).last_hidden_state[:, ids.shape[1] - 1 :]
        return self._log_policy(hidden).gather(2, tokens[..., None])[..., 0]

    @torch.no_grad()
    def decode(self, tokens: Tensor) -> Tensor:
        """Pixels ``[G, 3, H, W]`` in [0, 1] of image tokens ``[G, n]`` (the VQ decoder's [-1, 1] mapped)."""
        images = self.model.decode_image_tokens(tokens).float()  # [G, H, W, 3]
        return ((images + 1.0) / 2.0).clamp(0, 1).permute(0, 3, 1, 2).contiguous()

    @torch.no_grad()
    def yes_probability(self, views: Sequence[Tensor], questions: Sequence[str]) -> Tensor:
        """The model's own ``P(yes | yes or no)`` ``[N]`` answering ``questions[i]`` about ``views[i]``."""
        texts = [JUDGE_PROMPT.format(question=question) for question in questions]
        encoded = self.processor(
            text=texts, images=[to_pil(view) for view in views], padding=True, return_tensors="pt"
        )
        encoded = encoded.to(next(self.model.parameters()).device)
        logits = self.model(**encoded).logits[:, -1].float()
        return yes_probability(logits, self.yes_ids, self.no_ids, "yes_no")

    def self_reward(
        self,
        pixels: Tensor,
        prompt: str,
        metadata: dict,
        question: str | None = None,
        objects_key: str | None = None,
    ) -> tuple[Tensor, Tensor]:
        """SRUM reward ``[G]`` and the global ``P(yes)`` ``[G]`` of one group's images, judged by the model itself.

        Without objects in ``metadata`` the reward is the global ``P(yes)``; with objects, SRUM's map mean
        ``P_g * max(1/2, P_k on box_k)`` (``rewards.srum``), local questions on cropped regions.
        """
        template = question or self.config.question
        question = format_question(template, prompt, metadata)
        global_p = self.yes_probability(list(pixels), [question] * len(pixels)).double()
        objects = metadata.get(objects_key or self.config.objects_key) or []
        if not objects:
            return global_p.float(), global_p.float()
        height, width = pixels.shape[-2:]
        boxes = [pixel_box(item.get("box", (0, 0, 1, 1)), height, width) for item in objects]
        views = [region_view(image, box, "crop") for image in pixels for box in boxes]
        local_questions = [format_question(template, item["name"], metadata) for item in objects]
        local_p = self.yes_probability(views, local_questions * len(pixels)).double().view(len(pixels), -1)
        rewards = [
            reward_map(
                float(global_p[i]), list(zip(local_p[i].tolist(), boxes, strict=True)), height, width
            ).mean()
            for i in range(len(pixels))
        ]
        return torch.stack(rewards).float(), global_p.float()


@dataclass
class SelfRewardGroup:
    """One prompt's group: sampled image tokens ``[G, n]``, their sampling log-probs ``[G, n]``, decoded pixels
    ``[G, 3, H, W]`` and (after :func:`score_group`) the self-reward ``[G]`` and the global ``P(yes)`` ``[G]``."""

    prompt: str
    metadata: dict
    tokens: Tensor
    old_log_probs: Tensor
    pixels: Tensor
    reward: Tensor | None = None
    global_p: Tensor | None = None
    terms: dict[str, Tensor] | None = None


def sample_group(
    policy: UnifiedPolicy, prompt: str, metadata: dict, group_size: int, generator: torch.Generator
) -> SelfRewardGroup:
    """Sample ``group_size`` images of ``prompt`` (tokens, log-probs) and decode them (the rollout phase)."""
    tokens, old_log_probs = policy.sample(prompt, group_size, generator)
    return SelfRewardGroup(prompt, metadata, tokens, old_log_probs, policy.decode(tokens))


def score_group(policy: UnifiedPolicy, group: SelfRewardGroup, terms: Sequence[dict] | None = None) -> None:
    """Set the group's self-reward ``sum_k w_k r_k`` (SRUM: each ``r_k`` judged by the policy itself).

    ``terms``: dicts ``{name: srum | vlm_judge, weight, question?, objects_key?}``; ``srum`` uses the objects of
    the metadata (global x local map mean), ``vlm_judge`` only the global ``P(yes)``. Default: one ``srum`` term
    with the policy config's question.
    """
    terms = terms or [{"name": "srum", "weight": 1.0}]
    total, per_term, global_p = None, {}, None
    for term in terms:
        metadata = group.metadata if term["name"] == "srum" else {}
        reward, global_p = policy.self_reward(
            group.pixels, group.prompt, metadata, term.get("question"), term.get("objects_key")
        )
        per_term[term["name"]] = reward
        weighted = float(term.get("weight", 1.0)) * reward
        total = weighted if total is None else total + weighted
    group.reward, group.global_p, group.terms = total, global_p, per_term


def batch_advantages(
    groups: Sequence[SelfRewardGroup], std_mode: str = "group", eps: float = 1e-4, clip: float | None = None
) -> Tensor:
    """GRPO group-relative advantages ``[sum G]`` of the groups' rewards (shared core ``group_advantages``)."""
    rewards = torch.cat([group.reward for group in groups])
    group_ids = torch.cat([torch.full((len(group.reward),), i) for i, group in enumerate(groups)])
    return group_advantages(rewards, group_ids, std_mode=std_mode, eps=eps, clip=clip).advantages.float()


@dataclass
class UpdateSettings:
    """How a step's batch becomes optimizer updates (the trainer's ``train.*`` / ``algorithm.*`` keys)."""

    loss: str = "grpo"
    clip_low: float = 0.2
    clip_high: float = 0.2
    inner_epochs: int = 1
    samples_per_update: int = 0  # 0: the whole batch
    microbatch_size: int = 0  # 0: the whole update
    max_grad_norm: float = 0.0
    kl_coef: float = 0.0
    kl_estimator: str = "k3"


def _rows_log_probs(
    policy: UnifiedPolicy, groups: Sequence[SelfRewardGroup], rows: Sequence[tuple[int, int]]
):
    """Teacher-forced log-probs ``[len(rows), n]`` of (group, row) pairs: one forward per group present."""
    pieces = []
    for index in sorted({g for g, _ in rows}, key=[g for g, _ in rows].index):
        members = [r for g, r in rows if g == index]
        pieces.append(policy.log_probs(groups[index].prompt, groups[index].tokens[members]))
    return torch.cat(pieces)


def policy_update(
    policy: UnifiedPolicy,
    optimizer: torch.optim.Optimizer,
    groups: Sequence[SelfRewardGroup],
    advantages: Tensor,
    settings: UpdateSettings,
    reference: UnifiedPolicy | None = None,
    parameters: Sequence[torch.nn.Parameter] = (),
) -> dict[str, float]:
    """``inner_epochs`` passes of optimizer updates over the batch in order (``samples_per_update`` images each,
    accumulated over microbatches whose losses use the whole update's denominators), with the shared token-level
    objective ``gen_rl.vlm.objectives.policy_loss`` over image tokens (and a KL to ``reference``)."""
    rows = [(g, r) for g, group in enumerate(groups) for r in range(len(group.tokens))]
    per_update = settings.samples_per_update or len(rows)
    per_micro = settings.microbatch_size or per_update
    length = policy.num_image_tokens
    old = torch.cat([group.old_log_probs for group in groups])
    losses, kls, clipped, norms_seen = [], [], [], []
    for _ in range(settings.inner_epochs):
        for start in range(0, len(rows), per_update):
            update = list(range(start, start + per_update))
            norms = MiniBatchNorms.of(torch.ones(len(update), length, dtype=torch.bool))
            optimizer.zero_grad(set_to_none=True)
            total, kl, clip = 0.0, 0.0, 0.0
            for micro_start in range(0, len(update), per_micro):
                indices = update[micro_start : micro_start + per_micro]
                picked = [rows[i] for i in indices]
                log_probs = _rows_log_probs(policy, groups, picked)
                ref = None
                if reference is not None and settings.kl_coef > 0:
                    with torch.no_grad():
                        ref = _rows_log_probs(reference, groups, picked)
                output = policy_loss(
                    settings.loss,
                    log_probs,
                    old[indices],
                    advantages[indices],
                    torch.ones_like(log_probs, dtype=torch.bool),
                    clip_low=settings.clip_low,
                    clip_high=settings.clip_high,
                    max_completion_length=length,
                    norms=norms,
                    ref_log_probs=ref,
                    kl_coef=settings.kl_coef if ref is not None else 0.0,
                    kl_estimator=settings.kl_estimator,
                )
                output.loss.backward()
                share = len(indices) / len(update)
                total += float(output.loss.detach())
                kl += float(output.kl.detach())
                clip += share * float(output.stats.get("clip_fraction", 0.0))
            if settings.max_grad_norm > 0:
                norms_seen.append(
                    float(torch.nn.utils.clip_grad_norm_(list(parameters), settings.max_grad_norm))
                )
            optimizer.step()
            losses.append(total)
            kls.append(kl)
            clipped.append(clip)
    stats = {
        "loss/total": sum(losses) / len(losses),
        "loss/kl": sum(kls) / len(kls),
        "policy/clip_fraction": sum(clipped) / len(clipped),
        "optim/updates": float(len(losses)),
    }
    if norms_seen:
        stats["optim/grad_norm"] = sum(norms_seen) / len(norms_seen)
    return stats


def train_self_rewarding(
    policy: UnifiedPolicy,
    prompts: Sequence[str],
    metadata: Sequence[dict] | None = None,
    gold: Any = None,
) -> list[dict[str, float]]:
    """Self-rewarded GRPO over ``prompts`` (every prompt a group each step); one record per step.

    The phases of ``gen_rl.unified.trainer.UnifiedTrainer`` without its run folder: :func:`sample_group`,
    :func:`score_group`, :func:`batch_advantages`, :func:`policy_update` (one optimizer update per group). Records
    hold ``reward/mean`` (the self-reward), ``reward/global/mean``, ``eval/gold/<name>`` (the held-out gold reward
    on the same images, when ``gold`` is given), ``loss/total``, ``policy/clip_fraction`` and ``step``.
    """
    config = policy.config
    records = [{} for _ in prompts] if metadata is None else [dict(record) for record in metadata]
    parameters = policy.trainable_parameters()
    optimizer = torch.optim.Adam(parameters, lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    settings = UpdateSettings(
        loss=config.loss,
        clip_low=config.clip_low,
        clip_high=config.clip_high,
        inner_epochs=config.inner_epochs,
        samples_per_update=config.group_size,
    )
    history = []
    for step in range(config.num_steps):
        groups = [
            sample_group(policy, prompt, record, config.group_size, generator)
            for prompt, record in zip(prompts, records, strict=True)
        ]
        for group in groups:
            score_group(policy, group)
        advantages = batch_advantages(groups)
        record_out: dict[str, float] = {
            "step": float(step),
            "reward/mean": float(torch.cat([group.reward for group in groups]).mean()),
            "reward/global/mean": float(torch.cat([group.global_p for group in groups]).mean()),
        }
        if gold is not None:
            record_out[f"eval/gold/{type(gold).__name__}"] = gold_score(gold, groups)
        update = policy_update(policy, optimizer, groups, advantages, settings)
        record_out["loss/total"] = update["loss/total"]
        record_out["policy/clip_fraction"] = update["policy/clip_fraction"]
        history.append(record_out)
    return history


def gold_score(gold: Any, groups: Sequence[SelfRewardGroup]) -> float:
    """Mean of a held-out (not optimised) reward over the groups' decoded images."""
    pixels = torch.cat([group.pixels for group in groups])
    names = [group.prompt for group in groups for _ in range(len(group.pixels))]
    extra = [group.metadata for group in groups for _ in range(len(group.pixels))]
    return float(score_reward(gold, pixels, names, extra).scores.float().nanmean())
