"""RL on a few-step model's own grid: Flow-GRPO's clipped surrogate over every step of a 2-4 step schedule.

Deployed distilled models (FLUX.1-schnell, FLUX.2-klein, Z-Image-Turbo) sample in 2-4 CFG-free steps. Training
them "directly with the SDE of their own grid" is the likelihood-ratio objective of Flow-GRPO (eq. 8) on that
grid: each of the S steps is a Gaussian transition of the configured flow SDE (``sample.sde_type``; CPS keeps
the marginals of a coarse grid, its last step is deterministic), every stochastic step trains, and evaluation
runs the same S-step grid the model is deployed with. The declaration adds only the checks that make it a
few-step run (``FewStepOptions.validate``: S <= ``max_steps``, no CFG, every step trained); the maths is
``policy_gradient.PolicyGradient``'s.

Not here: distilling an RL-trained many-step teacher into a few-step student (DMD2, Yin et al. 2024).
"""

from __future__ import annotations

from gen_rl.algorithms.options_matching import FewStepOptions
from gen_rl.algorithms.policy_gradient import PolicyGradient


class FewStepGRPO(PolicyGradient):
    """Flow-GRPO on a distilled model's own 2-4 step grid (see the module docstring)."""

    Options = FewStepOptions
    options: FewStepOptions
