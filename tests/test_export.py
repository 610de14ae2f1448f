"""LoRA export: a saved adapter loaded into a fresh pipeline with diffusers reproduces the trained model."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from safetensors.torch import load_file

from gen_rl.export import LORA_WEIGHT_NAME, lora_target_modules, merge_lora, save_lora
from pipelines import build_sampler
from pipelines.tiny import tiny_flux_pipeline, tiny_sd3_pipeline

BUILDERS = {"flux": tiny_flux_pipeline, "sd3": tiny_sd3_pipeline}
RANK, ALPHA = 4, 8  # scale alpha / r = 2, so an export that dropped the scale would not reproduce the model


def _fresh_pipeline(family: str):
    pipeline = BUILDERS[family](seed=0)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _trained_sampler(family: str, seed: int = 1):
    """A tiny sampler with a LoRA adapter whose B weights (zero at init in some modes) are random."""
    sampler = build_sampler(family, _fresh_pipeline(family))
    config = LoraConfig(
        r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian", target_modules=lora_target_modules(family)
    )
    sampler.transformer.add_adapter(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in sampler.transformer.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
    return sampler


def _final_latents(pipeline) -> torch.Tensor:
    """Two denoising steps from a fixed seed; latents, so no clamping in the VAE hides a difference."""
    return pipeline(
        prompt="a red apple",
        num_inference_steps=2,
        height=32,
        width=32,
        max_sequence_length=16,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    ).images


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_saved_lora_loads_into_fresh_pipeline(tmp_path, family):
    sampler = _trained_sampler(family)
    trained = _final_latents(sampler.pipeline)
    folder = save_lora(sampler, tmp_path / "lora")
    assert folder == tmp_path / "lora" and [p.name for p in folder.iterdir()] == [LORA_WEIGHT_NAME]

    fresh = _fresh_pipeline(family)
    untrained = _final_latents(fresh)
    fresh.load_lora_weights(folder)
    loaded = _final_latents(fresh)
    torch.testing.assert_close(loaded, trained, rtol=0, atol=1e-6)
    assert (untrained - trained).abs().max() > 1e-2


def test_exported_update_is_b_times_a_with_unit_scale(tmp_path):
    """Readers that ignore the adapter config (ComfyUI: no alpha key means scale 1) get the same update."""
    sampler = _trained_sampler("flux")
    folder = save_lora(sampler, tmp_path / "lora")
    weights = load_file(folder / LORA_WEIGHT_NAME)
    with safe_open(folder / LORA_WEIGHT_NAME, "pt") as handle:
        stored_config = json.loads(handle.metadata()["lora_adapter_metadata"])
    assert stored_config["transformer.r"] == RANK and stored_config["transformer.lora_alpha"] == RANK
    layers = {name: m for name, m in sampler.transformer.named_modules() if isinstance(m, LoraLayer)}
    assert len(weights) == 2 * len(layers) and not any("alpha" in key for key in weights)
    for name, layer in layers.items():
        update = weights[f"transformer.{name}.lora_B.weight"] @ weights[f"transformer.{name}.lora_A.weight"]
        expected = ALPHA / RANK * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        torch.testing.assert_close(update, expected.detach())


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_default_targets_exist_in_the_architecture(family):
    if family == "flux":
        transformer = tiny_flux_pipeline(seed=0).transformer
    else:  # two blocks: only blocks before the last (context-pre-only) one have to_add_out
        transformer = tiny_sd3_pipeline(seed=0, num_layers=2).transformer
    names = [name for name, _ in transformer.named_modules()]
    for target in lora_target_modules(family):
        matches = [name for name in names if name.endswith("." + target)]
        assert matches and all(isinstance(transformer.get_submodule(m), torch.nn.Linear) for m in matches)
    with pytest.raises(
        ValueError, match="no default LoRA target modules for family 'not_a_family'; known: flux, sd3"
    ):
        lora_target_modules("not_a_family")


def test_saving_again_replaces_the_folder_and_leaves_no_temporaries(tmp_path):
    first, second = _trained_sampler("flux", seed=1), _trained_sampler("flux", seed=2)
    save_lora(first, tmp_path / "lora")
    (tmp_path / "lora" / "stale.txt").write_text("from the first export")
    folder = save_lora(second, tmp_path / "lora")
    assert [p.name for p in tmp_path.iterdir()] == ["lora"]
    assert [p.name for p in folder.iterdir()] == [LORA_WEIGHT_NAME]
    key = "transformer.transformer_blocks.0.attn.to_q.lora_B.weight"
    expected = ALPHA / RANK * second.transformer.transformer_blocks[0].attn.to_q.lora_B["default"].weight
    torch.testing.assert_close(load_file(folder / LORA_WEIGHT_NAME)[key], expected.detach())


def test_save_without_adapter_names_the_fix(tmp_path):
    sampler = build_sampler("flux", _fresh_pipeline("flux"))
    with pytest.raises(ValueError, match=r"train\.lora is off.*save_pretrained"):
        save_lora(sampler, tmp_path / "lora")
    with pytest.raises(ValueError, match="no LoRA adapter 'other'"):
        save_lora(_trained_sampler("flux"), tmp_path / "lora", adapter_name="other")
    assert not list(tmp_path.iterdir())


def test_merge_lora_keeps_the_outputs_and_removes_the_layers():
    sampler = _trained_sampler("flux")
    trained = _final_latents(sampler.pipeline)
    merge_lora(sampler)
    assert not any(isinstance(module, LoraLayer) for module in sampler.transformer.modules())
    torch.testing.assert_close(_final_latents(sampler.pipeline), trained, rtol=0, atol=1e-5)
