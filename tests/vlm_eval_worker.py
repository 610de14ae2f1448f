"""Run by ``accelerate launch`` from test_vlm_eval.py (and in-process for the one-process side): one held-out
evaluation of the tiny model; the main process saves the metrics and the eval completions."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from trainer_helpers import finish_processes

from gen_rl.core.config import load_config
from gen_rl.vlm.config import VLMConfig
from gen_rl.vlm.trainer import VLMTrainer

TINY = Path(__file__).resolve().parent.parent / "configs" / "vlm" / "tiny_colour_cpu.yaml"
OVERRIDES = (
    "sample.groups_per_step=2",
    "sample.group_size=2",
    "eval.every_steps=1",
    "eval.synthetic=colour",
    "eval.synthetic_records=7",  # uneven split: 4 records on rank 0, 3 on rank 1
    "eval.num_samples=2",
    "log.progress=false",
)


def evaluate(output: Path) -> dict:
    """The eval metrics of the untrained tiny model after "step 1" (the run folder is ``output``)."""
    config = load_config(VLMConfig, TINY, [f"log.output_dir={output}", *OVERRIDES])
    trainer = VLMTrainer(config)
    return trainer.evaluate(1)


if __name__ == "__main__":
    folder = Path(sys.argv[1])
    metrics = evaluate(folder)
    if metrics and folder.joinpath("eval_completions.jsonl").exists():
        folder.joinpath("metrics.json").write_text(json.dumps(metrics))
    finish_processes()
