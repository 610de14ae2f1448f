"""GRPO-family training of vision-language models (Qwen2-VL / Qwen2.5-VL first) on verifiable rewards.

Modules by role: ``config`` (the ``task: vlm`` config tree), ``data`` (JSONL records, curriculum),
``video`` (frame folders / video files, frame sampling by count or fps), ``policy`` (loading through the Auto
classes, LoRA, frozen vision tower, KL reference), ``rollout`` (prompt batching with images and videos,
sampling, completion masks, token log-probs, processed image sizes for any processor), ``scoring`` (verifiable
rewards -> advantages), ``evaluation`` (held-out greedy / sampled evaluation, pass@k, mean@k),
``objectives`` (GRPO / Dr.GRPO / DAPO / GSPO losses on the shared core), ``trainer`` (the loop),
``tiny`` and ``synthetic`` (tiny Qwen2-VL / Qwen2.5-VL / LLaVA and synthetic image and video tasks for
tests, the CPU demos and the benchmark), ``compat`` (loading Qwen processors where torchvision is not installed).
Entry point: ``accelerate launch gen_rl/train.py --config configs/vlm/<run>.yaml``.
"""
