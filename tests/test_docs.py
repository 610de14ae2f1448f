"""The documentation site builds without warnings, and its generated reference pages list what the code accepts."""

from __future__ import annotations

import os
import subprocess
import sys

from trainer_helpers import ROOT

from gen_rl.reference import config_page, pages


def test_the_site_builds_strictly(tmp_path):
    environment = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "HF_HUB_OFFLINE": "1"}
    built = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=environment,
    )  # fmt: skip
    assert built.returncode == 0, built.stdout + built.stderr
    assert "WARNING" not in built.stderr, built.stderr
    page = (tmp_path / "site" / "algorithms" / "flow_grpo" / "index.html").read_text()
    assert "clip_low" in page
    assert (tmp_path / "site" / "reference" / "config-generation" / "index.html").is_file()


def test_generated_pages_cover_every_registered_name():
    from gen_rl.algorithms import ALGORITHMS
    from pipelines.families import FAMILIES
    from rewards import REWARDS

    generated = pages()
    assert {f"algorithms/{name}.md" for name in ALGORITHMS} <= set(generated)
    assert {f"families/{name}.md" for name in FAMILIES} <= set(generated)
    rewards = generated["reference/rewards.md"]
    assert all(f"| `{name}` |" in rewards for name in REWARDS)


def test_the_config_reference_lists_keys_defaults_and_choices():
    text = config_page("generation")
    assert "| `sample.sde_type` | `'flow_grpo'` | flow_grpo \\| dance_grpo \\| cps \\| ddim |" in text
    assert "| `train.cpu_threads` | `0` |" in text
