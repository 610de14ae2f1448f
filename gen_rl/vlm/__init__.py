"""GRPO-family training of vision-language models (Qwen2-VL / Qwen2.5-VL first) on verifiable rewards.

Modules by role: ``config`` (the ``task: vlm`` config tree), ``data`` (JSONL records, curriculum),
``policy`` (loading through the Auto classes, LoRA, frozen vision tower, KL reference), ``rollout`` (prompt
batching, sampling, completion masks, token log-probs), ``scoring`` (verifiable rewards -> advantages),
``objectives`` (GRPO / Dr.GRPO / DAPO / GSPO losses on the shared core), ``trainer`` (the loop),
``tiny`` and ``synthetic`` (tiny Qwen2-VL / Qwen2.5-VL and a synthetic task for tests, the CPU demo and the
benchmark), ``compat`` (loading Qwen processors where torchvision is not installed).
Entry point: ``accelerate launch gen_rl/train.py --config configs/vlm/<run>.yaml``.
"""
