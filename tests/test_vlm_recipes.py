"""Every shipped VLM recipe trains two steps: each real YAML as shipped (loss, KL and reference, LoRA, curriculum
stages, reward functions by task, bf16, gradient checkpointing) pointed at the tiny Qwen2-VL / Qwen2.5-VL built in
code and at a few records of its own tasks written here."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from PIL import Image

from gen_rl.core.config import load_config
from gen_rl.train import task_of

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "vlm"
RECIPES = sorted(p for p in CONFIGS.glob("*.yaml") if task_of(str(p), []) == "vlm" and "tiny" not in p.name)

# One record per task the recipes train: an answer a tiny random model can be scored on.
RECORDS = {
    "grounding": {"problem": "the red square", "solution": "<answer>[0, 0, 28, 28]</answer>"},
    "counting": {"problem": "How many red squares?", "solution": "1"},
    "math": {"problem": "What is 1 + 1?", "solution": "2"},
    "temporal": {
        "problem": "the screen turns red",
        "solution": "[0.5, 1.5]",
        "video": "clip",
        "video_fps": 2.0,
    },
}


# the task each reward function scores
TASK_OF = {"iou": "grounding", "counting": "counting", "math": "math", "temporal_iou": "temporal"}


def _write_stage(folder: Path, name: str, tasks: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (56, 56), (200, 30, 30)).save(folder / "red.png")
    (folder / "clip").mkdir(exist_ok=True)
    for index, colour in enumerate([(0, 0, 0), (200, 30, 30), (200, 30, 30), (0, 0, 0)]):
        Image.new("RGB", (56, 56), colour).save(folder / "clip" / f"{index:03d}.png")
    records = [{"task": task, **RECORDS[task]} for task in tasks for _ in range(4)]
    lines = [
        json.dumps(record if "video" in record else {"image": "red.png", **record}) for record in records
    ]
    path = folder / f"{name}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_vlm_recipe_trains_two_steps_on_a_tiny_model(path, tmp_path, fresh_accelerator):
    from gen_rl.vlm.config import VLMConfig
    from gen_rl.vlm.trainer import train

    shipped = load_config(VLMConfig, path)
    tiny = "builtin:tiny-qwen2.5-vl" if "2.5" in shipped.model.name_or_path else "builtin:tiny-qwen2-vl"
    overrides = [
        f"model.name_or_path={tiny}",
        "model.attn_implementation=sdpa",
        "model.min_pixels=3136",
        "model.max_pixels=3136",
        f"data.image_root={tmp_path / 'data'}",
        "data.max_prompt_length=0",
        "sample.groups_per_step=2",
        "sample.group_size=2",
        "sample.max_new_tokens=8",
        "sample.mask_truncated=false",  # a random tiny model rarely stops within 8 tokens
        "sample.generation_batch_size=0",
        "train.num_steps=2",
        "train.samples_per_update=0",
        "train.microbatch_size=2",
        f"log.output_dir={tmp_path / 'run'}",
        "log.progress=false",
        "checkpoint.every_steps=1",
        "accelerator.cpu=true",
        "eval.every_steps=0",  # held-out evaluation has its own tests (test_vlm_eval.py)
    ]
    config = load_config(VLMConfig, path, overrides)
    scored = [TASK_OF[function.name] for function in config.reward.terms if function.name in TASK_OF]
    for stage in config.data.stages:
        stage.files = [str(_write_stage(tmp_path / "data", stage.name, stage.tasks or scored))]
        stage.steps = min(stage.steps, 1)
    train(config)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss/total" in r]
    assert len(steps) == 2
    assert all(math.isfinite(r["loss/total"]) and math.isfinite(r["reward/mean"]) for r in steps)
    assert all(
        r["reward/dropped_samples"] == 0 for r in steps
    )  # every reward function could score its records
