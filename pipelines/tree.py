"""Tree rollouts (BranchGRPO, Li et al. 2025, arXiv 2509.06040; also TempFlow-GRPO's single branch point).

Each prompt's group is a tree. It starts from one initial noise; at every branch step each node's transition is
drawn ``factor`` times with independent noise (one child per draw); between branch steps each node takes one step
(an SDE step, or the ODE with ``ode_between_branches``). A step's denoiser call covers the nodes that exist at that
grid point only, so the shared prefix of the leaves is computed once: before the first split a tree costs one row
per step, not one per leaf.

The result is an ordinary :class:`~pipelines.base.Rollout` with one row per leaf (``members`` = leaf index, the
first split's child as the most significant digit in base ``factor``): each row holds its full path (the shared
states repeated), its log-probs and its conditioning, so ``Sampler.log_prob`` recomputes every edge exactly as
for a flat rollout (ratio == 1 before any update).

Composed from the sampler's hooks (``encode_prompts``, ``initial_latents``, ``noise_grid``, ``predict``,
``_transition``, ``_deterministic_transition``, ``decode``); ``pipelines/base.py`` is not changed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from gen_rl.core.seeding import derive_seed, draw_noise, make_generators
from pipelines.base import Rollout, RolloutOptions
from pipelines.sde import gaussian_log_prob


@dataclass(frozen=True)
class Tree:
    """The shape of every prompt's tree: split at ``branch_steps`` into ``factor`` children each."""

    branch_steps: tuple[int, ...]
    factor: int
    ode_between_branches: bool = False

    def __post_init__(self) -> None:
        steps = tuple(self.branch_steps)
        if not steps or list(steps) != sorted(set(steps)) or steps[0] < 0:
            raise ValueError(
                f"branch_steps {list(steps)} must be distinct, increasing, non-negative step indices"
            )
        if self.factor < 2:
            raise ValueError(f"a tree needs factor >= 2 children per split, got {self.factor}")

    @property
    def depth(self) -> int:
        """Number of splits."""
        return len(self.branch_steps)

    @property
    def leaves(self) -> int:
        """Leaves per tree, ``factor ** depth``."""
        return self.factor**self.depth

    def splits_before(self, grid_point: int) -> int:
        """Splits done before grid point ``grid_point`` (a tree has ``factor ** splits`` states there)."""
        return sum(1 for step in self.branch_steps if step < grid_point)

    def node_of(self, leaves: Tensor, grid_point: int) -> Tensor:
        """Index (within its tree) of the node at ``grid_point`` on the path of each leaf in ``leaves``."""
        return torch.div(
            leaves, self.factor ** (self.depth - self.splits_before(grid_point)), rounding_mode="floor"
        )

    def owns_edge(self, leaves: Tensor, step: int) -> Tensor:
        """Whether each leaf is the first of the leaves sharing the edge of ``step`` (one row trains an edge)."""
        return leaves % self.factor ** (self.depth - self.splits_before(step + 1)) == 0

    def stochastic(self, step: int) -> bool:
        """Whether ``step`` is an SDE step: every split is, the others unless ``ode_between_branches``."""
        return step in self.branch_steps or not self.ode_between_branches


@torch.no_grad()
def tree_rollout(
    sampler: Any,
    prompts: Sequence[str],
    options: RolloutOptions,
    tree: Tree,
    *,
    group_size: int,
    epoch: int = 0,
    prompt_keys: Sequence[str] | None = None,
    metadata: Sequence[dict[str, Any]] | None = None,
) -> Rollout:
    """Sample one tree per prompt (``group_size`` must equal ``tree.leaves``) and record every leaf's path.

    Seeds derive from ``(options.seed, epoch, prompt key)``: the root noise from ``"initial"`` (as a rollout with
    shared initial noise), each node's step noise from ``("tree", step, node)``. ``options.sde_window`` and
    ``share_initial_noise`` are ignored (the tree decides which steps are stochastic).
    """
    prompts = list(prompts)
    prompt_keys = list(prompts if prompt_keys is None else prompt_keys)
    if group_size != tree.leaves:
        raise ValueError(
            f"a tree with {tree.depth} splits into {tree.factor} has {tree.leaves} leaves, but group_size is "
            f"{group_size}; set sample.group_size: {tree.leaves}"
        )
    sampler._validate_rollout_request(prompts, options, group_size, prompt_keys, metadata)
    cached = sampler._device is None
    if cached:
        sampler._device = sampler.pipeline._execution_device
    try:
        return _sample_tree(sampler, prompts, options, tree, epoch, prompt_keys, metadata)
    finally:
        if cached:
            sampler._device = None


def _sample_tree(
    sampler: Any,
    prompts: list[str],
    options: RolloutOptions,
    tree: Tree,
    epoch: int,
    prompt_keys: list[str],
    metadata: Sequence[dict[str, Any]] | None,
) -> Rollout:
    num_prompts, leaves = len(prompts), tree.leaves
    image_size = sampler._image_size(options)
    num_frames = sampler._num_frames(options)
    conditioning = sampler.encode_prompts(prompts, options, 1)
    if sampler.conditions:
        conditioning.update(
            sampler.encode_conditions(list(metadata or []), options, 1, image_size, num_frames)
        )
    initial_seeds = [derive_seed(options.seed, epoch, key, 0, "initial") for key in prompt_keys]
    latents = sampler.initial_latents(make_generators(initial_seeds), image_size, num_frames)
    latent_dtype, device = latents.dtype, latents.device
    grid = sampler.noise_grid(options, latents)
    sigmas = grid.sigmas.to(device, torch.float32)[None]
    timesteps = grid.timesteps.to(device, torch.float32)[None]
    alpha_bars = None if grid.alpha_bars is None else grid.alpha_bars.to(device, torch.float32)[None]
    levels = sampler._levels(sigmas, alpha_bars)
    sampler._check_levels(levels)
    num_steps = timesteps.shape[1]
    if tree.branch_steps[-1] >= num_steps:
        raise ValueError(f"branch step {tree.branch_steps[-1]} is outside the {num_steps}-step schedule")

    states = [latents]  # per grid point: [num_prompts * nodes, ...], prompt-major
    step_log_probs, step_stds = [], []  # per step: [rows at the next grid point]
    for index in range(num_steps):
        nodes = latents.shape[0] // num_prompts
        rows_conditioning = _repeat_rows(conditioning, nodes)
        output = sampler.predict(
            latents,
            timesteps[0, index].expand(len(latents)),
            rows_conditioning,
            options.cfg_scale,
            image_size,
        )
        if index in tree.branch_steps:
            latents = latents.repeat_interleave(tree.factor, dim=0)
            output = output.repeat_interleave(tree.factor, dim=0)
        rows = len(latents)
        level = levels[0, index].expand(rows)
        level_next = levels[0, index + 1].expand(rows)
        if tree.stochastic(index):
            per_prompt = rows // num_prompts
            seeds = [
                derive_seed(options.seed, epoch, key, "tree", index, node)
                for key in prompt_keys
                for node in range(per_prompt)
            ]
            noise = draw_noise(make_generators(seeds, device), tuple(latents.shape[1:]))
            out = sampler._transition(
                options.sde_type, latents, output, level, level_next, options.noise_level, noise, None
            )
            latents = out.next_sample.to(latent_dtype)
            log_prob = out.log_prob if latents.dtype == torch.float32 else None
            if log_prob is None:
                log_prob = gaussian_log_prob(latents.float(), out.mean, out.std)
            step_log_probs.append(log_prob)
            step_stds.append(out.std)
        else:
            latents = sampler._deterministic_transition(latents, output, level, level_next).next_sample
            latents = latents.to(latent_dtype)
            step_log_probs.append(torch.full((rows,), float("nan"), device=device))
            step_stds.append(torch.zeros(rows, device=device))
        states.append(latents)

    leaf_index = torch.arange(leaves, device=device)
    prompt_index = torch.arange(num_prompts, device=device)

    def leaf_rows(grid_point: int) -> Tensor:
        nodes = tree.factor ** tree.splits_before(grid_point)
        return (prompt_index[:, None] * nodes + tree.node_of(leaf_index, grid_point)[None]).flatten()

    trajectory = torch.stack([state[leaf_rows(point)] for point, state in enumerate(states)], dim=1)
    log_probs = torch.stack([values[leaf_rows(i + 1)] for i, values in enumerate(step_log_probs)], dim=1)
    stds = torch.stack([values[leaf_rows(i + 1)] for i, values in enumerate(step_stds)], dim=1)
    batch = num_prompts * leaves
    pixels = sampler.decode(latents, image_size) if options.decode else None
    return Rollout(
        latents=trajectory,
        sigmas=sigmas.expand(batch, -1).clone(),
        timesteps=timesteps.expand(batch, -1).clone(),
        log_probs=log_probs,
        stochastic=stds > 0,
        conditioning=_repeat_rows(conditioning, leaves),
        prompts=[prompt for prompt in prompts for _ in range(leaves)],
        group_ids=torch.arange(num_prompts).repeat_interleave(leaves),
        members=torch.arange(leaves).repeat(num_prompts),
        seeds=torch.tensor(initial_seeds).repeat_interleave(leaves),
        sde_type=options.sde_type,
        noise_level=options.noise_level,
        cfg_scale=options.cfg_scale,
        image_size=image_size,
        pixels=pixels,
        metadata=[dict(item) for item in metadata for _ in range(leaves)] if metadata else [],
        alpha_bars=None if alpha_bars is None else alpha_bars.expand(batch, -1).clone(),
        num_frames=num_frames,
        grid_checked=True,
    )


def _repeat_rows(conditioning: dict[str, Tensor], times: int) -> dict[str, Tensor]:
    """Batch-first conditioning with each prompt's row repeated ``times`` times (prompt-major)."""
    if times == 1:
        return conditioning
    return {key: value.repeat_interleave(times, dim=0) for key, value in conditioning.items()}
