"""Adv-GRPO's adversarial reward ("The Image as Its Own Reward", Mao et al. 2025); registered ``adversarial``.

A frozen DINOv2 (transformers ``Dinov2Model``, preprocessed by its own image processor) turns an image into
tokens: the class token ``c`` and the patch tokens ``p_1 .. p_N`` of the last layer (layer-normed). Every token
is L2-normalised, ``t / (||t|| + 1e-6)``, by one function used both when the head trains and when it scores
(the reference code normalises only when scoring). A discriminator head ``h`` (``D -> hidden -> 1``, GELU, one
head shared by class and patch tokens, as in the reference) scores a sample

    r(x) = w h(c) + (1 - w) mean_j h(p_j),                     w = cls_weight (0.7 in the paper's code)

over all patch tokens (the expectation of the reference's random patch sample, so scoring is deterministic).

Training (``update``, once per policy step, identical on every process): the step's generated samples (all
processes, gathered) are negatives and as many reference images (drawn from the folder with the reward's own
saved generator) are positives; the hinge loss of the reference code,

    L = L_cls + patch_weight * L_patch,   L_x = 1/2 [mean relu(1 - h(real)) + mean relu(1 + h(fake))],

takes ``updates_per_step`` Adam steps, where ``L_patch`` uses ``num_patches`` patch tokens drawn per image.
``schedule="always"`` trains every step; ``"while_ahead"`` trains only while the policy's mean reward exceeds
the references' mean score (under the current head) minus ``margin``. The head's weights, Adam state and the
generator are the state (``state_dict``), so a resumed run draws, scores and updates exactly as before.

Combine it with a fixed reward by weight through the trainer's ``reward.terms`` (each term has a ``weight``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gen_rl.core.dtypes import resolve_device, resolve_dtype
from rewards.base import LearningReward, RewardOutput, RewardStateError, RewardUpdate, register_reward
from rewards.dino import DINO_PUBLISHED, load_reference_images
from rewards.preprocess import ImagePreprocess
from rewards.weights import load_pretrained

SCHEDULES = ("always", "while_ahead")
LOSSES = ("hinge", "bce")


def normalise_tokens(tokens: Tensor, eps: float = 1e-6) -> Tensor:
    """Each token ``[..., D]`` divided by its L2 norm (+ ``eps``): the one normalisation of train and score."""
    return tokens / (tokens.norm(dim=-1, keepdim=True) + eps)


class DiscriminatorHead(nn.Module):
    """``h``: ``Linear(D, hidden) -> GELU -> Linear(hidden, 1)`` applied to every token (``[..., D] -> [...]``)."""

    def __init__(self, dimension: int, hidden: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(dimension, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def forward(self, tokens: Tensor) -> Tensor:
        return self.layers(tokens).squeeze(-1)


def hybrid_score(head: nn.Module, tokens: Tensor, cls_weight: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(r, h(c), mean_j h(p_j))`` ``[B]`` each, for normalised tokens ``[B, 1 + N, D]`` (class token first)."""
    logits = head(tokens)  # [B, 1 + N]
    cls_logit = logits[:, 0]
    patch_logit = logits[:, 1:].mean(dim=1) if logits.shape[1] > 1 else cls_logit
    return cls_weight * cls_logit + (1.0 - cls_weight) * patch_logit, cls_logit, patch_logit


def discriminator_loss(real: Tensor, fake: Tensor, loss: str) -> Tensor:
    """``1/2 [mean relu(1 - real) + mean relu(1 + fake)]`` (hinge) or the logistic (BCE) loss of the logits."""
    if loss == "hinge":
        return 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())
    return 0.5 * (F.softplus(-real).mean() + F.softplus(fake).mean())


def sample_patches(tokens: Tensor, count: int, generator: torch.Generator) -> Tensor:
    """``count`` patch tokens per image drawn with replacement (``[B, count, D]``), from the CPU ``generator``."""
    batch, patches = tokens.shape[0], tokens.shape[1] - 1
    index = torch.randint(0, patches, (batch, min(count, patches)), generator=generator).to(tokens.device)
    return torch.gather(tokens[:, 1:], 1, index[..., None].expand(-1, -1, tokens.shape[-1]))


class DinoTokens:
    """Normalised DINOv2 tokens ``[B, 1 + N, D]`` (class token first) of pixels ``[B, 3, H, W]`` in [0, 1]."""

    def __init__(self, model: str, device: str | None = None, dtype: str = "float32") -> None:
        from transformers import Dinov2Model

        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        what = f"DINOv2 model {model!r}"
        self.model = load_pretrained(Dinov2Model.from_pretrained, model, what=what, published=DINO_PUBLISHED)
        self.model.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        self.preprocess = ImagePreprocess.from_pretrained(model, what=what, published=DINO_PUBLISHED)
        self.dimension = int(self.model.config.hidden_size)

    @torch.no_grad()
    def __call__(self, pixels: Tensor) -> Tensor:
        inputs = self.preprocess(pixels.to(self.device)).to(self.dtype)
        return normalise_tokens(self.model(pixel_values=inputs).last_hidden_state.float())

    def of_images(self, images: list[Tensor]) -> Tensor:
        """Tokens of 8-bit images ``[3, H, W]`` of any sizes (one batch per size), in the order given."""
        rows: dict[tuple[int, ...], list[int]] = {}
        for index, image in enumerate(images):
            rows.setdefault(tuple(image.shape), []).append(index)
        tokens: list[Tensor | None] = [None] * len(images)
        for indices in rows.values():
            batch = self(torch.stack([images[index] for index in indices]).float() / 255.0)
            for position, index in enumerate(indices):
                tokens[index] = batch[position]
        return torch.stack(tokens)  # type: ignore[arg-type]


@register_reward("adversarial", "adv_grpo")
class AdversarialReward(LearningReward):
    """Adv-GRPO: a discriminator on frozen DINOv2 tokens, references positive, the policy's samples negative."""

    weight_sources: ClassVar[dict[str, str]] = {"model": "config.json"}

    def __init__(
        self,
        references: str | list[str],
        model: str = "facebook/dinov2-base",
        hidden: int = 512,
        cls_weight: float = 0.7,
        patch_weight: float = 0.3,
        num_patches: int = 64,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        updates_per_step: int = 1,
        schedule: str = "always",
        margin: float = 0.0,
        loss: str = "hinge",
        seed: int = 0,
        device: str | None = None,
        dtype: str = "float32",
    ) -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"adversarial: schedule must be one of {SCHEDULES}; got {schedule!r}")
        if loss not in LOSSES:
            raise ValueError(f"adversarial: loss must be one of {LOSSES}; got {loss!r}")
        if not 0.0 <= float(cls_weight) <= 1.0:
            raise ValueError(f"adversarial: cls_weight must be in [0, 1]; got {cls_weight!r}")
        if not (isinstance(updates_per_step, int) and updates_per_step >= 1):
            raise ValueError(
                f"adversarial: updates_per_step must be an integer >= 1; got {updates_per_step!r}"
            )
        if not (isinstance(num_patches, int) and num_patches >= 1):
            raise ValueError(f"adversarial: num_patches must be an integer >= 1; got {num_patches!r}")
        self.cls_weight, self.patch_weight, self.num_patches = (
            float(cls_weight),
            float(patch_weight),
            num_patches,
        )
        self.updates_per_step, self.schedule, self.margin, self.loss = (
            updates_per_step,
            schedule,
            margin,
            loss,
        )
        self.tokens = DinoTokens(model, device, dtype)
        try:
            loaded = load_reference_images(references)
        except (FileNotFoundError, ValueError) as error:
            raise type(error)(str(error).replace("dino_similarity", "adversarial")) from error
        self.references = [(image * 255).round().to(torch.uint8) for image in loaded]  # each at its own size
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.head = DiscriminatorHead(self.tokens.dimension, hidden).to(self.tokens.device)
        self.optimizer = torch.optim.Adam(self.head.parameters(), lr=lr, betas=tuple(betas))
        self.generator = torch.Generator().manual_seed(seed)
        self.updates = 0  # update calls
        self.trained_steps = 0  # discriminator optimizer steps taken

    # ----- scoring ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def score(self, pixels: Tensor, prompts: list[str], metadata: list[dict]) -> RewardOutput:
        """``r(x) = w h(c) + (1 - w) mean_j h(p_j)`` on normalised DINOv2 tokens (the paper's hybrid score)."""
        scores, cls_logit, patch_logit = hybrid_score(self.head, self.tokens(pixels), self.cls_weight)
        return RewardOutput(scores=scores, components={"adv_cls": cls_logit, "adv_patch": patch_logit})

    # ----- learning --------------------------------------------------------------------------------------------
    def update(self, batch: RewardUpdate) -> dict[str, float]:
        """``updates_per_step`` hinge-loss steps: gathered samples negative, as many drawn references positive."""
        valid = (
            batch.valid if batch.valid is not None else torch.ones(batch.pixels.shape[0], dtype=torch.bool)
        )
        local_tokens = self.tokens(batch.pixels)
        tokens = batch.gather(local_tokens)
        keep = batch.gather(valid.to(local_tokens.device, torch.float32)) > 0.5
        scores = batch.gather(batch.scores.to(local_tokens.device)).float()
        fake = tokens[keep]
        self.updates += 1
        if fake.shape[0] == 0:
            return {"adv_trained": 0.0}
        drawn = torch.randint(0, len(self.references), (fake.shape[0],), generator=self.generator)
        real = self.tokens.of_images([self.references[int(index)] for index in drawn])
        with torch.no_grad():
            reference_mean = float(hybrid_score(self.head, real, self.cls_weight)[0].mean())
        finite = scores[keep][torch.isfinite(scores[keep])]
        policy_mean = float(finite.mean()) if finite.numel() else -math.inf
        stats = {"adv_policy_mean": policy_mean, "adv_reference_mean": reference_mean}
        if self.schedule == "while_ahead" and not policy_mean > reference_mean - self.margin:
            return {**stats, "adv_trained": 0.0}
        self.head.train()
        for _ in range(self.updates_per_step):
            loss, accuracy = self.discriminator_step(real, fake)
        self.head.eval()
        return {
            **stats,
            "adv_trained": float(self.updates_per_step),
            "adv_loss": loss,
            "adv_accuracy": accuracy,
        }

    def discriminator_step(self, real: Tensor, fake: Tensor) -> tuple[float, float]:
        """One Adam step on ``L_cls + patch_weight * L_patch``; returns the loss and the class-token accuracy."""
        real_patches = sample_patches(real, self.num_patches, self.generator)
        fake_patches = sample_patches(fake, self.num_patches, self.generator)
        real_cls, fake_cls = self.head(real[:, 0]), self.head(fake[:, 0])
        loss = discriminator_loss(real_cls, fake_cls, self.loss)
        if real.shape[1] > 1 and self.patch_weight:
            patch_loss = discriminator_loss(self.head(real_patches), self.head(fake_patches), self.loss)
            loss = loss + self.patch_weight * patch_loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.trained_steps += 1
        accuracy = 0.5 * (float((real_cls > 0).float().mean()) + float((fake_cls < 0).float().mean()))
        return float(loss.detach()), accuracy

    # ----- state -----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Head weights, Adam state, the reference-drawing generator and the counters."""
        return {
            "head": {key: value.detach().cpu().clone() for key, value in self.head.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "updates": self.updates,
            "trained_steps": self.trained_steps,
            "dimension": self.tokens.dimension,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``state_dict`` output; one line when it was learned on another feature width or is damaged."""
        if int(state.get("dimension", -1)) != self.tokens.dimension:
            raise RewardStateError(
                f"adversarial state was learned on {state.get('dimension')}-wide features but this backbone has "
                f"{self.tokens.dimension}; resume with the same DINOv2 model"
            )
        try:
            self.head.load_state_dict(dict(state["head"]))
        except RuntimeError as error:
            raise RewardStateError(
                f"adversarial state 'head' does not fit the head (hidden width?): {error}"
            ) from error
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"].clone())
        self.updates, self.trained_steps = int(state["updates"]), int(state["trained_steps"])

    def __repr__(self) -> str:
        return (
            f"AdversarialReward(references={len(self.references)}, schedule={self.schedule!r}, "
            f"updates_per_step={self.updates_per_step}, trained_steps={self.trained_steps})"
        )
