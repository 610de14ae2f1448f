"""DiffusionNFT (Zheng et al. 2025, "DiffusionNFT: Online Diffusion Reinforcement with Forward Process").

Likelihood-free: rollouts run the ODE and only their clean latents x0 and rewards are kept. Training noises x0 on
the rectified-flow forward process at the rollout's own grid times, ``x_t = (1 - t) x0 + t eps`` with target
``v = eps - x0``, and regresses two implicit policies built from the trained velocity ``v_theta`` and a frozen,
slowly moving "old" velocity ``v_old`` (paper eq. 5):

    v+ = (1 - beta) v_old + beta v_theta        (implicit positive policy)
    v- = (1 + beta) v_old - beta v_theta        (implicit negative policy)
    L  = r ||v+ - v||^2 + (1 - r) ||v- - v||^2,  r in [0, 1] the optimality probability of the sample

whose minimiser is ``v_old + (2 / beta) Delta`` (eq. 6), Delta the reinforcement guidance of eq. 4.

Practical choices of the paper (Sec. 3.3, unnumbered) as the reference code (NVlabs/DiffusionNFT,
``scripts/train_nft_sd3.py``) implements them, with the differences from the paper's text:

- optimality reward: ``r = 0.5 + 0.5 clip(A / c, -1, 1)`` from the trainer's group advantages A (already
  std-normalised; the paper writes the mean-centred reward over a normaliser Z_c), c = ``reward_clip`` = 5;
- adaptive weighting: each squared error is taken in x0 space, ``x0_hat = x_t - t v``, and divided by its
  stop-gradient ``mean |x0_hat - x0|`` (per sample, clamped at 1e-5); the code averages over elements where the
  paper writes a squared norm (a constant factor);
- the loss is ``c / beta x mean_b [r L+ + (1 - r) L-]`` (the code's scale; the paper's eq. 5 has neither factor),
  plus ``kl_coef x mean (v_theta - v_ref)^2`` to the LoRA-disabled reference (code only, 1e-4);
- soft update of the old policy ``theta_old <- eta_i theta_old + (1 - eta_i) theta`` with
  ``eta_i = min(rate (i - flat), max)`` (paper: min(0.001 i, 0.5)). The reference applies it once per sampling
  epoch with i = optimizer updates so far; here it runs after every optimizer update (the same when a training
  step makes one update, the reference's default);
- the trained times: ``floor(S x 0.99)`` of the S grid points per sample, drawn at random (9 of 10);
- CFG-free: training and rollouts use ``cfg_scale = 1`` (a config with CFG is refused).

Data collection uses the old policy, as in the paper (Algorithm 1) and the reference code: the trainer runs the
training rollouts inside :meth:`DiffusionNFT.rollout_context`, which swaps the old parameters in.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor

from gen_rl.algorithms.base import Algorithm, LossBatch, Policy, refuse
from gen_rl.algorithms.options import DiffusionNFTOptions
from gen_rl.core.seeding import derive_seed
from gen_rl.core.step_selection import num_trained_steps

# sampler families whose model is a rectified-flow velocity predictor (x_t = (1 - t) x0 + t eps)
FLOW_FAMILIES = frozenset({"flux", "sd3", "hunyuan_video", "wan"})
WEIGHT_FLOOR = 1e-5  # the reference's clamp of the adaptive weight


def is_rectified_flow(sampler: Any) -> bool:
    """Whether ``sampler`` predicts rectified-flow velocities: its ``rectified_flow`` flag if it has one; else
    not when it steps with DDIM (``step_kinds``, an epsilon / v-prediction family); else by its family name."""
    flag = getattr(sampler, "rectified_flow", None)
    if flag is not None:
        return bool(flag)
    if "ddim" in getattr(sampler, "step_kinds", ()):
        return False
    return getattr(sampler, "family", None) in FLOW_FAMILIES


def optimality_probability(advantages: Tensor, reward_clip: float) -> Tensor:
    """``r = 0.5 + 0.5 clip(A / c, -1, 1)`` in [0, 1] (paper Sec. 3.3 "Optimality Reward", Algorithm 1 line 5)."""
    return 0.5 + 0.5 * (advantages.float() / reward_clip).clamp(-1.0, 1.0)


def old_decay(update: int, rate: float, maximum: float, flat: int) -> float:
    """Soft-update coefficient ``eta_i`` after optimizer update ``i`` (paper Sec. 3.3 "Soft Update"):
    0 for ``i < flat``, else ``min(rate (i - flat), maximum)`` (reference ``return_decay``)."""
    if update < flat:
        return 0.0
    return min((update - flat) * rate, maximum)


def implicit_velocities(velocity: Tensor, old_velocity: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """Implicit positive / negative velocities (paper eq. 5): ``(1 - b) v_old + b v`` and ``(1 + b) v_old - b v``."""
    positive = beta * velocity + (1.0 - beta) * old_velocity
    negative = (1.0 + beta) * old_velocity - beta * velocity
    return positive, negative


def regression_loss(
    velocity: Tensor, noised: Tensor, clean: Tensor, target: Tensor, times: Tensor, adaptive: bool
) -> Tensor:
    """Per-sample flow-matching error ``[B]`` of one velocity prediction.

    ``adaptive``: the x0 regression ``mean (x0_hat - x0)^2 / sg(mean |x0_hat - x0|)`` with ``x0_hat = x_t - t v``
    (paper Sec. 3.3 "Adaptive Loss Weighting"); otherwise the plain ``mean (v - v_target)^2`` of eq. 5.
    """
    dims = tuple(range(1, velocity.ndim))
    if not adaptive:
        return (velocity - target).square().mean(dim=dims)
    error = noised - _expand(times, noised) * velocity - clean
    with torch.no_grad():
        weight = error.double().abs().mean(dim=dims).clamp(min=WEIGHT_FLOOR).to(error.dtype)
    return error.square().mean(dim=dims) / weight


class DiffusionNFT(Algorithm):
    """DiffusionNFT on a rectified-flow sampler (see the module docstring for the maths and the reference)."""

    Options = DiffusionNFTOptions
    needs = frozenset({"clean_latents"})
    options: DiffusionNFTOptions

    def __init__(self, options: DiffusionNFTOptions, *, seed: int, num_steps: int) -> None:
        super().__init__(options, seed=seed, num_steps=num_steps)
        self.old_tensors: list[Tensor] | None = None  # theta_old, float32, one per trained parameter
        self.updates = 0  # optimizer updates so far (i of the soft update)

    # ----- before training ---------------------------------------------------------------------------------------
    def check(self, sampler: Any, rewards: dict[str, Any], sample: Any) -> None:
        """Refuse a sampler without the rectified-flow forward process, and CFG (the paper trains CFG-free)."""
        if not is_rectified_flow(sampler):
            family = getattr(sampler, "family", type(sampler).__name__)
            raise refuse(
                f"diffusion_nft needs a rectified-flow model (x_t = (1 - t) x0 + t eps, velocity eps - x0); the "
                f"{family} sampler is not one. Use a FLUX or SD3 model, or a likelihood-ratio algorithm (flow_grpo)"
            )
        cfg_scale = getattr(sample, "cfg_scale", 1.0)
        if cfg_scale > 1.0:
            raise refuse(
                f"diffusion_nft trains CFG-free, but sample.cfg_scale is {cfg_scale}; set sample.cfg_scale: 1"
            )

    def setup(self, policy: Policy) -> None:
        """The old policy starts as a copy of the trained parameters (unless a checkpoint already restored it)."""
        if self.old_tensors is None:
            self.old_tensors = [param.detach().float().clone() for param in policy.parameters]
        else:
            self._check_shapes(self.old_tensors, policy.parameters)
            self.old_tensors = [
                _laid_out_like(param, old)
                for param, old in zip(policy.parameters, self.old_tensors, strict=True)
            ]

    def sampling(self, step: int) -> dict[str, Any]:
        """Rollouts run the deterministic ODE (the paper's and the reference's data collection)."""
        return {"noise_level": 0.0}

    def rollout_context(self, policy: Policy) -> AbstractContextManager[None]:
        """Rollouts with the old policy's parameters, as the reference collects data (Algorithm 1, line 3)."""
        return policy.swapped(self._old())

    # ----- training ----------------------------------------------------------------------------------------------
    def select(self, rollout: Any, step: int) -> Tensor:
        """``floor(S x step_fraction)`` distinct grid points ``[B, K]`` per sample, drawn from ``(seed, step)``."""
        grid_points = rollout.timesteps.shape[1]
        count = num_trained_steps(self.options.step_fraction, grid_points)
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "diffusion-nft-units", step))
        units = [torch.randperm(grid_points, generator=generator)[:count] for _ in range(len(rollout))]
        return torch.stack(units).sort(dim=1).values

    def loss(self, batch: LossBatch, policy: Policy) -> tuple[Tensor, dict[str, Tensor]]:
        """The DiffusionNFT loss of one microbatch at one grid point per sample (paper eq. 5, Sec. 3.3)."""
        options = self.options
        rollout = batch.rollout
        sampler = policy.sampler
        device = rollout.latents.device
        rows = torch.arange(len(rollout), device=device)
        units = batch.units[:, 0].to(device)
        model_dtype = rollout.latents.dtype

        clean = rollout.latents[:, -1].float()
        times = rollout.sigmas[rows, units].float()
        model_times = rollout.timesteps[rows, units]
        noise = self._noise(batch, clean)
        noised = (1.0 - _expand(times, clean)) * clean + _expand(times, clean) * noise
        target = noise - clean

        def predict() -> Tensor:
            return sampler.predict_velocity(
                noised.to(model_dtype), model_times, rollout.conditioning, 1.0, rollout.image_size
            ).float()

        # the frozen passes first: swapping tensors into the parameters after the graph of v_theta is built would
        # invalidate it (in-place changes to tensors saved for backward)
        with torch.no_grad(), policy.swapped(self._old()):
            old_velocity = predict()
        reference_velocity = None
        if options.kl_coef > 0:
            with torch.no_grad(), policy.reference():
                reference_velocity = predict()
        velocity = predict()
        positive, negative = implicit_velocities(velocity, old_velocity, options.beta)
        positive_loss = regression_loss(positive, noised, clean, target, times, options.adaptive_weight)
        negative_loss = regression_loss(negative, noised, clean, target, times, options.adaptive_weight)

        optimality = optimality_probability(batch.advantages.to(device), options.reward_clip)
        weight = batch.weight.to(device).float()
        per_sample = (optimality * positive_loss + (1.0 - optimality) * negative_loss) / options.beta
        policy_loss = options.reward_clip * (per_sample * weight).mean()
        dims = tuple(range(1, velocity.ndim))
        if reference_velocity is not None:
            kl = ((velocity - reference_velocity).square().mean(dim=dims) * weight).mean()
        else:
            kl = policy_loss.new_zeros(())
        loss = policy_loss + options.kl_coef * kl

        old_deviation = (velocity.detach() - old_velocity).square().mean(dim=dims)
        stats = {
            "loss/total": loss.detach(),
            "loss/policy": policy_loss.detach(),
            "loss/kl": kl.detach(),
            "nft/positive_loss": positive_loss.detach().mean(),
            "nft/negative_loss": negative_loss.detach().mean(),
            "nft/r_mean": optimality.mean(),
            "nft/old_deviation": old_deviation.mean(),
            "nft/old_deviation_max": old_deviation.max(),
            "nft/t_mean": times.mean(),
        }
        return loss, stats

    def after_update(self, policy: Policy) -> None:
        """Soft update of the old policy, ``theta_old <- eta_i theta_old + (1 - eta_i) theta`` (Sec. 3.3)."""
        self.updates += 1
        options = self.options
        decay = old_decay(self.updates, options.old_decay_rate, options.old_decay_max, options.old_decay_flat)
        with torch.no_grad():
            for old, param in zip(self._old(), policy.parameters, strict=True):
                old.lerp_(param.detach().float().to(old.device), 1.0 - decay)

    # ----- state -------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The old policy's tensors and the update counter (exact resume of the soft-update schedule)."""
        return {"updates": self.updates, "old_tensors": [tensor.clone() for tensor in self._old()]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the tensors must match the trained parameters when those are known."""
        tensors = [tensor.detach().float().clone() for tensor in state["old_tensors"]]
        if self.old_tensors is not None:
            self._check_shapes(tensors, self.old_tensors)
            tensors = [
                _laid_out_like(old, tensor) for old, tensor in zip(self.old_tensors, tensors, strict=True)
            ]
        self.old_tensors = tensors
        self.updates = int(state["updates"])

    # ----- helpers -----------------------------------------------------------------------------------------------
    def _old(self) -> list[Tensor]:
        if self.old_tensors is None:
            raise RuntimeError(
                "DiffusionNFT.setup(policy) must run before training (it builds the old policy)"
            )
        return self.old_tensors

    def _noise(self, batch: LossBatch, clean: Tensor) -> Tensor:
        """eps ``~ N(0, I)`` shaped like x0, from the batch's generator (or one seeded from (seed, step, units))."""
        generator = batch.generator
        if generator is None:
            seed = derive_seed(self.seed, "diffusion-nft-noise", batch.step, batch.units.flatten().tolist())
            generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(clean.shape, generator=generator, device=generator.device, dtype=torch.float32)
        return noise.to(clean.device)

    @staticmethod
    def _check_shapes(tensors: list[Tensor], expected: list[Tensor]) -> None:
        shapes = [tuple(tensor.shape) for tensor in tensors]
        wanted = [tuple(tensor.shape) for tensor in expected]
        if shapes != wanted:
            raise ValueError(
                f"DiffusionNFT old-policy state holds {len(shapes)} tensors that do not match the {len(wanted)} "
                "trained parameters (a different LoRA rank or target modules?); resume with the same model config"
            )


def _laid_out_like(reference: Tensor, value: Tensor) -> Tensor:
    """``value`` (whole, as a checkpoint holds it) as a float32 tensor laid out like ``reference``: on its device,
    and, when ``reference`` is an FSDP2 shard (DTensor), as this process's shard of the same mesh and placements."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    value = value.detach().float()
    if isinstance(reference, DTensor) and not isinstance(value, DTensor):
        return distribute_tensor(
            value.to(reference.device), reference.device_mesh, reference.placements, src_data_rank=None
        )
    return value.to(reference.device)


def _expand(values: Tensor, like: Tensor) -> Tensor:
    """``[B]`` values broadcast against ``[B, ...]`` tensors."""
    return values.view(-1, *([1] * (like.ndim - 1)))
