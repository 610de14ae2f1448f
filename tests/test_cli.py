"""The ``gen-rl`` command: one test per subcommand, each checking what the command produced, not that it ran."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import entry_points

import pytest
import torch
from trainer_helpers import DEMO, ROOT

from gen_rl.cli import main

SMALL = (
    "log.tracker=none",
    "log.progress=false",
    "sample.num_steps=3",
    "sample.height=16",
    "sample.width=16",
    "sample.group_size=2",
    "sample.groups_per_step=2",
    "sample.groups_per_rollout=1",
    "train.samples_per_update=4",
    "train.microbatch_size=2",
    "eval.every_steps=2",
    "eval.max_prompts=2",
    "eval.samples_per_prompt=1",
    "checkpoint.every_steps=2",
    "log.monitors=false",
)


def _gen_rl(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(
        [sys.executable, "-m", "gen_rl.cli", *args], cwd=ROOT, env=environment, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """A 2-step demo run through ``gen-rl train`` in this process (tiny FLUX with the pixel decoder)."""
    out = tmp_path_factory.mktemp("cli") / "run"
    status = main(["train", str(DEMO), f"log.output_dir={out}", "train.num_steps=2", *SMALL])
    assert status == 0
    return out


def test_the_console_script_is_declared():
    scripts = {entry.name: entry.value for entry in entry_points(group="console_scripts")}
    assert scripts.get("gen-rl") == "gen_rl.cli:main"


def test_train_on_two_processes_really_runs_two_and_equals_one(tmp_path, demo_run):
    """Two CPU processes (gloo) launched with the shipped DDP accelerate config split each step's groups; rewards
    are gathered, the gradient is all-reduced, so the records equal the one-process run's (one update per step
    over all samples in both)."""
    two = tmp_path / "two"
    finished = _gen_rl(
        "train", str(DEMO), "--num-processes", "2", "--accelerate-config", "examples/accelerate/ddp.yaml",
        f"log.output_dir={two}", "train.num_steps=2", *SMALL,
        "train.samples_per_update=2", "train.microbatch_size=2",
    )  # fmt: skip
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "process 0 of 2 ready" in finished.stdout and "process 1 of 2 ready" in finished.stdout
    one = [json.loads(line) for line in (demo_run / "metrics.jsonl").read_text().splitlines()]
    both = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    for single, double in zip(one, both, strict=True):
        for key in ("reward/mean", "eval/reward/mean", "loss/policy"):
            if key in single:
                assert double[key] == pytest.approx(single[key], abs=1e-5), key
    assert one[-1]["eval/reward/mean"] != one[0]["eval/reward/mean"]  # training moved the model


def test_sample_from_a_base_model_and_from_a_checkpoint(tmp_path, demo_run):
    prompts = ["--prompt", "a red hat", "--prompt", "a blue hat", "--samples-per-prompt", "2"]
    size = ["--steps", "3", "--height", "16", "--width", "16"]
    assert (
        main(["sample", "--model", "tiny:flux-pixel", *prompts, *size, "--out", str(tmp_path / "base")]) == 0
    )
    checkpoint = demo_run / "checkpoints" / "checkpoint-000002"
    assert (
        main(["sample", "--checkpoint", str(checkpoint), *prompts, *size, "--out", str(tmp_path / "ckpt")])
        == 0
    )
    import numpy as np
    from PIL import Image

    names = sorted(path.name for path in (tmp_path / "base").iterdir())
    assert names == ["grid.png"] + [f"prompt-{p:02d}-sample-{m}.png" for p in range(2) for m in range(2)]
    base = np.asarray(Image.open(tmp_path / "base" / "prompt-00-sample-0.png"), dtype=float)
    trained = np.asarray(Image.open(tmp_path / "ckpt" / "prompt-00-sample-0.png"), dtype=float)
    assert base.shape == (16, 16, 3) and np.abs(base - trained).max() > 0  # the LoRA changed the sample


def test_eval_compares_base_and_checkpoint(tmp_path, demo_run, capsys):
    assert main(["eval", str(demo_run), "--out", str(tmp_path / "cmp"), "eval.samples_per_prompt=2"]) == 0
    out = capsys.readouterr().out
    assert "| base |" in out and "| run/checkpoint-000002 |" in out
    rows = (tmp_path / "cmp" / "scores.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 2 * 2  # header + models x prompts x samples


def test_export_lora_and_merged_reproduce_the_checkpoint(tmp_path, demo_run):
    from diffusers import FluxPipeline

    from pipelines.tiny import tiny_flux_pipeline

    assert main(["export", str(demo_run), "--format", "lora", "--out", str(tmp_path / "lora")]) == 0
    assert main(["export", str(demo_run), "--format", "merged", "--out", str(tmp_path / "merged")]) == 0

    def final_latents(pipeline):
        call = {"num_inference_steps": 2, "height": 16, "width": 16, "output_type": "latent"}
        return pipeline("a red hat", generator=torch.Generator().manual_seed(0), **call).images

    with_lora = tiny_flux_pipeline(seed=0, pixel_decoder=True)
    base = final_latents(with_lora)
    with_lora.load_lora_weights(tmp_path / "lora")
    expected = final_latents(with_lora)
    merged = FluxPipeline.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(final_latents(merged), expected, rtol=0, atol=1e-5)
    assert (expected - base).abs().max() > 1e-4
    assert not any("lora" in name for name, _ in merged.transformer.named_parameters())


def test_describe_and_bad_input(capsys):
    assert main(["describe"]) == 0
    text = capsys.readouterr().out
    assert "sample.sde_type" in text and "train.cpu_threads" in text
    assert main(["sample", "--model", "tiny:flux"]) == 2
    assert "give at least one --prompt" in capsys.readouterr().err
    assert main(["sample", "--model", "some/model", "--prompt", "x"]) == 2
    assert "give --family for --model some/model" in capsys.readouterr().err
    assert main(["train", str(DEMO), "--num-processes", "0"]) == 2
    assert main(["export", "/nonexistent/run", "--out", "x"]) == 2
    assert "neither a checkpoint folder" in capsys.readouterr().err


ACCELERATE = sorted((ROOT / "examples" / "accelerate").glob("*.yaml"))


@pytest.mark.parametrize("path", ACCELERATE, ids=[path.name for path in ACCELERATE])
def test_shipped_accelerate_configs(path):
    """Every accelerate config opens with its command and parses; DeepSpeed files name their ZeRO stage; an FSDP
    file wraps block classes that occur in its family's (tiny) denoiser, and no class it does not have."""
    import yaml

    from pipelines.families import TINY_MODELS, build_tiny_pipeline

    text = path.read_text()
    config = yaml.safe_load(text)
    assert text.startswith("# ") and "examples/accelerate/" + path.name in "".join(text.splitlines()[:3])
    if config["distributed_type"] == "DEEPSPEED":
        assert config["deepspeed_config"]["zero_stage"] == int(path.stem[-1])
    if config["distributed_type"] != "FSDP":
        return
    family = path.stem.removeprefix("fsdp_")
    tiny = next(name for name, model in TINY_MODELS.items() if model.family == family)
    pipeline = build_tiny_pipeline(tiny, family)
    from pipelines import SAMPLERS

    denoiser = getattr(pipeline, SAMPLERS[family].denoiser_component)
    present = {type(module).__name__ for module in denoiser.modules()}
    wrapped = set(config["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"].split(","))
    assert wrapped <= present, wrapped - present
