"""``task: unified``: self-rewarded image-token RL of a unified multimodal model (SRUM's unified path, Janus).

Config: :mod:`gen_rl.unified.config` (torch-free); trainer: :mod:`gen_rl.unified.trainer`."""
