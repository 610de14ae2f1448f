"""mkdocs hooks: add the reference pages generated from the code (``gen_rl/reference.py``) and their nav entries."""

from __future__ import annotations

import sys
from pathlib import Path

from mkdocs.structure.files import File

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
_PAGES: dict[str, str] = {}


def on_config(config):
    """Generate the pages once and list the algorithm and family pages in the nav sections of those names."""
    from gen_rl.reference import pages

    _PAGES.update(pages())
    for entry in config["nav"]:
        if isinstance(entry, dict):
            ((title, items),) = entry.items()
            folder = {"Algorithms": "algorithms/", "Model families": "families/"}.get(title)
            if folder:
                entry[title] = [path for path in sorted(_PAGES) if path.startswith(folder)]
    return config


def on_files(files, config):
    """Append every generated page (config reference, algorithms, families, rewards, recipes)."""
    for path, text in _PAGES.items():
        files.append(File.generated(config, path, content=text))
    return files
