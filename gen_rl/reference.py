"""Reference pages generated from the code, so they cannot drift from it: the config keys of each task (defaults,
choices, meaning), one page per registered algorithm (its docstring: equations and conventions; its options), one
per model family (sampler docstring, step kinds, tiny models, recipes), the rewards and the recipes.

``docs/hooks.py`` calls :func:`pages` when ``mkdocs build`` runs; ``python -m gen_rl.reference OUT`` writes the
same pages to a folder.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import sys
import typing
from pathlib import Path
from typing import Any

from gen_rl.core.config import literal_choices

ROOT = Path(__file__).resolve().parents[1]
TASKS = {
    "generation": "Generation (diffusion / flow)",
    "vlm": "Vision-language models",
    "reward_model": "Reward models",
}


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def config_table(cls: type, where: str = "") -> list[str]:
    """Markdown rows ``| key | default | choices | meaning |`` for every field of ``cls``, sections recursively."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = f"{where}.{f.name}" if where else f.name
        if dataclasses.is_dataclass(hints[f.name]):
            section = (
                type(f.default_factory()) if f.default_factory is not dataclasses.MISSING else hints[f.name]
            )
            rows.extend(config_table(section, name))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        choices = " \\| ".join(map(str, literal_choices(hints[f.name])))
        rows.append(
            f"| `{name}` | `{_cell(repr(default))}` | {choices} | {_cell(f.metadata.get('doc', ''))} |"
        )
    return rows


def config_page(task: str) -> str:
    """The config reference of one task (the keys ``gen_rl/train.py`` reads from YAML)."""
    from gen_rl.train import config_class_of

    cls = config_class_of(task)
    lines = [f"# Config reference: {TASKS[task]}", "", (cls.__doc__ or "").strip(), ""]
    lines += ["Generated from the config dataclasses. Every key can be given in the YAML or as `key=value` on the "
              "command line.", ""]  # fmt: skip
    lines += ["| key | default | choices | meaning |", "|---|---|---|---|", *config_table(cls)]
    if task == "generation":
        lines += ["", "The `algorithm` section holds the options of the algorithm `algorithm.name` names; each "
                  "algorithm's page lists them."]  # fmt: skip
    return "\n".join(lines) + "\n"


def algorithm_pages() -> dict[str, str]:
    """``algorithms/<name>.md`` for each registered algorithm: its class docstring and its options."""
    from gen_rl.algorithms import ALGORITHMS
    from gen_rl.algorithms.options import BUILTIN_OPTIONS
    from gen_rl.core.registry import resolve

    pages = {}
    for name in sorted(ALGORITHMS):
        algorithm = resolve({}, ALGORITHMS[name], "algorithm")
        options = BUILTIN_OPTIONS.get(name, algorithm.Options)
        module = sys.modules[algorithm.__module__]
        lines = [
            f"# `{name}`",
            "",
            f"`{ALGORITHMS[name]}`",
            "",
            inspect.cleandoc(algorithm.__doc__ or ""),
            "",
        ]
        lines += ["## The module", "", inspect.cleandoc(module.__doc__ or ""), ""]
        needs = ", ".join(sorted(algorithm.needs)) or "nothing beyond the samples"
        lines += [f"**Rollout records it needs:** {needs}.", ""]
        lines += ["## Options", "", inspect.cleandoc(options.__doc__ or ""), ""]
        lines += [
            "| key | default | choices | meaning |",
            "|---|---|---|---|",
            *config_table(options, "algorithm"),
        ]
        recipes = _recipes_where(("algorithm", "name"), "flow_grpo", name)
        if recipes:
            lines += ["", "## Recipes", "", *[f"- `{recipe}`" for recipe in recipes]]
        pages[f"algorithms/{name}.md"] = "\n".join(lines) + "\n"
    return pages


def family_pages() -> dict[str, str]:
    """``families/<name>.md`` for each model family: sampler docstring, step kinds, tiny models, recipes."""
    from pipelines.families import FAMILIES, TINY_MODELS, load_object

    pages = {}
    for name, family in sorted(FAMILIES.items()):
        sampler = load_object(family.sampler)
        module = sys.modules[sampler.__module__]
        tiny = [key for key, model in TINY_MODELS.items() if model.family == name]
        lines = [f"# `{name}`", "", f"`{family.sampler}`", "", inspect.cleandoc(module.__doc__ or ""), ""]
        lines += [inspect.cleandoc(sampler.__doc__ or ""), ""]
        lines += [f"- **Step kinds** (`sample.sde_type`): {', '.join(family.step_kinds)}"]
        lines += [f"- **Default LoRA targets**: {', '.join(sampler.lora_target_modules) or 'none'}"]
        lines += [f"- **Video**: {'yes' if sampler.video else 'no'}"]
        conditions = getattr(sampler, "conditions", ())
        if conditions:
            lines += [f"- **Per-prompt conditions** (JSONL keys): {', '.join(conditions)}"]
        lines += [f"- **Tiny models built in code**: {', '.join(f'`{key}`' for key in tiny) or 'none'}"]
        recipes = _recipes_where(("model", "family"), "flux", name)
        if recipes:
            lines += ["", "## Recipes", "", *[f"- `{recipe}`" for recipe in recipes]]
        pages[f"families/{name}.md"] = "\n".join(lines) + "\n"
    return pages


def rewards_page() -> str:
    """Every registered reward: its class, constructor arguments and first docstring line."""
    from rewards import REWARDS

    lines = ["# Rewards", "", "Registered names for `reward.terms[].name` (and `eval.gold`); arguments go in "
             "`kwargs`. Any `package.module:Class` subclassing `rewards.Reward` works too.", ""]  # fmt: skip
    lines += ["| name | class | arguments | what it scores |", "|---|---|---|---|"]
    for name, reward in sorted(REWARDS.items()):
        parameters = [p for p in inspect.signature(reward.__init__).parameters.values() if p.name != "self"]
        arguments = ", ".join(
            f"`{p.name}={p.default!r}`" if p.default is not p.empty else f"`{p.name}`"
            for p in parameters
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        )
        summary = inspect.cleandoc(reward.__doc__ or "").split("\n")[0]
        lines.append(
            f"| `{name}` | `{reward.__module__}.{reward.__name__}` | {_cell(arguments)} | {_cell(summary)} |"
        )
    return "\n".join(lines) + "\n"


def recipes_page() -> str:
    """Every shipped config: its path and the comment block it opens with (command, paper settings)."""
    lines = ["# Recipes", "", "Every YAML under `configs/`, with the comment it opens with.", ""]
    for path in sorted((ROOT / "configs").rglob("*.yaml")):
        comment = []
        for line in path.read_text().splitlines():
            if not line.startswith("#"):
                break
            comment.append(line[1:].strip())
        lines += [f"## `{path.relative_to(ROOT)}`", "", "\n".join(comment) or "(no comment)", ""]
    return "\n".join(lines) + "\n"


def _recipes_where(key: tuple[str, str], default: str, value: str) -> list[str]:
    """Generation recipes whose ``section.key`` (``default`` when absent) equals ``value``."""
    found = []
    for path, config in _generation_recipes():
        if config.get(key[0], {}).get(key[1], default) == value:
            found.append(path)
    return found


@functools.cache
def _generation_recipes() -> tuple[tuple[str, dict], ...]:
    import yaml

    recipes = []
    for path in sorted((ROOT / "configs").rglob("*.yaml")):
        config = yaml.safe_load(path.read_text()) or {}
        if config.get("task", "generation") == "generation":
            recipes.append((str(path.relative_to(ROOT)), config))
    return tuple(recipes)


def pages() -> dict[str, str]:
    """Every generated page: relative path under the docs folder -> Markdown."""
    generated = {f"reference/config-{task.replace('_', '-')}.md": config_page(task) for task in TASKS}
    generated["reference/rewards.md"] = rewards_page()
    generated["reference/recipes.md"] = recipes_page()
    generated.update(algorithm_pages())
    generated.update(family_pages())
    return generated


def write_pages(folder: str | Path) -> list[Path]:
    """Write :func:`pages` under ``folder``; returns the files."""
    written = []
    for relative, text in pages().items():
        path = Path(folder) / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written


if __name__ == "__main__":
    for page in write_pages(sys.argv[1] if len(sys.argv) > 1 else "docs"):
        print(page)
