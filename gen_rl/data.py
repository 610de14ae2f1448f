"""Prompt sets: a text file (one prompt per line) or JSONL (``prompt`` plus metadata passed to rewards)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gen_rl.seeding import derive_seed


@dataclass(frozen=True)
class PromptSet:
    """Prompts with per-prompt metadata (JSONL keys other than ``prompt``; empty for text files)."""

    prompts: list[str]
    metadata: list[dict[str, Any]]
    source: str = ""

    def __len__(self) -> int:
        return len(self.prompts)


def load_prompts(path: str | Path) -> PromptSet:
    """Read ``.txt`` (one prompt per non-blank line) or ``.jsonl`` (``{"prompt": ..., **metadata}``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"prompt file {str(path)!r} does not exist; check data.train_prompts / eval_prompts"
        )
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise ValueError(f"prompt file {str(path)!r} is empty; put one prompt per line (or JSONL records)")
    if path.suffix == ".jsonl":
        return _from_jsonl(path, lines)
    return PromptSet(prompts=lines, metadata=[{} for _ in lines], source=str(path))


def _from_jsonl(path: Path, lines: list[str]) -> PromptSet:
    prompts, metadata = [], []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not valid JSON ({error.msg})") from error
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str) or not record["prompt"]:
            raise ValueError(f"{path}:{number}: each JSONL record needs a non-empty string 'prompt' key")
        prompts.append(record.pop("prompt"))
        metadata.append(record)
    return PromptSet(prompts=prompts, metadata=metadata, source=str(path))


def prompt_indices_for_step(num_prompts: int, step: int, groups_per_step: int, seed: int) -> list[int]:
    """Dataset indices of the ``groups_per_step`` prompts of training step ``step``.

    The dataset is walked in epochs, each a fresh permutation seeded by ``(seed, "prompts", epoch)``; step
    ``t`` takes positions ``[t * G, (t + 1) * G)`` of that endless sequence, so every prompt is used once per
    epoch and the choice depends only on the seed and the step (which makes resume and multi-process exact).
    """
    permutations: dict[int, list[int]] = {}
    indices = []
    for position in range(step * groups_per_step, (step + 1) * groups_per_step):
        epoch, offset = divmod(position, num_prompts)
        if epoch not in permutations:
            generator = torch.Generator().manual_seed(derive_seed(seed, "prompts", epoch))
            permutations[epoch] = torch.randperm(num_prompts, generator=generator).tolist()
        indices.append(permutations[epoch][offset])
    return indices
