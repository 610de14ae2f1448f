"""Kohya-style LoRA export (``gen_rl.export_kohya``) for the UNet families: SD 1.x, SD 2.x and SDXL.

Two independent readers check the file: diffusers' ``load_lora_weights`` (which detects the ``lora_unet_`` keys and
converts them itself) and a merge written here the way ComfyUI maps kohya keys (``lora_unet_`` + the UNet's state-dict
key with dots turned into underscores, ``W + alpha / r * up @ down``).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from safetensors.torch import load_file

from gen_rl.export_kohya import KOHYA_UNET_PREFIX, kohya_lora_state_dict, save_kohya_lora
from pipelines import RolloutOptions, build_sampler
from pipelines.families import TINY_MODELS, build_tiny_pipeline

RANK, ALPHA = 4, 8  # scale 2: an export that dropped the scale would not reproduce the policy
MODELS = ["tiny:sd", "tiny:sd2", "tiny:sdxl"]
OPTIONS = RolloutOptions(num_steps=3, height=32, width=32, sde_type="ddim", noise_level=0.0, decode=False)


def _fresh(name: str):
    sampler = build_sampler(TINY_MODELS[name].family, build_tiny_pipeline(name))
    sampler.pipeline.set_progress_bar_config(disable=True)
    return sampler


def _trained(name: str, seed: int = 1, **lora):
    """A tiny sampler whose UNet LoRA has random (non-zero) B weights."""
    sampler = _fresh(name)
    config = dict(r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian")
    config.update(lora)
    sampler.denoiser.add_adapter(LoraConfig(target_modules=list(sampler.lora_target_modules), **config))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter_name, parameter in sampler.denoiser.named_parameters():
            if "lora_B" in parameter_name:
                parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
    return sampler


def _final_latents(sampler, cfg_scale: float = 1.0) -> torch.Tensor:
    options = dataclasses.replace(OPTIONS, cfg_scale=cfg_scale, negative_prompt="blurry")
    return sampler.rollout(["a red apple", "a blue sky"], options).latents[:, -1]


@pytest.mark.parametrize("name", MODELS)
def test_every_key_names_a_real_module_of_the_base_unet_and_none_is_left_over(name):
    sampler = _trained(name)
    tensors = kohya_lora_state_dict(sampler)
    base = _fresh(name).denoiser  # no LoRA layers: the names a UI sees in the checkpoint
    by_kohya_name = {}
    for module_path, module in base.named_modules():
        kohya = KOHYA_UNET_PREFIX + module_path.replace(".", "_")
        assert kohya not in by_kohya_name, (
            f"two modules map to {kohya}"
        )  # the underscore mapping is injective
        by_kohya_name[kohya] = module
    adapted = {
        KOHYA_UNET_PREFIX + path.replace(".", "_")
        for path, module in sampler.denoiser.named_modules()
        if isinstance(module, LoraLayer)
    }
    exported = {key.split(".")[0] for key in tensors}
    assert exported == adapted and len(adapted) > 10  # every adapted module, and nothing else
    assert len(tensors) == 3 * len(exported)
    for kohya in exported:
        module = by_kohya_name[kohya]
        assert isinstance(module, torch.nn.Linear)
        assert tensors[f"{kohya}.lora_down.weight"].shape == (RANK, module.in_features)
        assert tensors[f"{kohya}.lora_up.weight"].shape == (module.out_features, RANK)
        assert tensors[f"{kohya}.alpha"].shape == () and float(tensors[f"{kohya}.alpha"]) == RANK
    if name == "tiny:sdxl":  # cross-attention of the 2-layer transformer of SDXL's second block
        assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn2_to_out_0" in exported


@pytest.mark.parametrize("name", MODELS)
def test_diffusers_load_lora_weights_reproduces_the_trained_policy(name, tmp_path):
    sampler = _trained(name)
    trained = _final_latents(sampler, cfg_scale=3.0)
    path = save_kohya_lora(sampler, tmp_path / "policy.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["policy.safetensors"]
    fresh = _fresh(name)
    untrained = _final_latents(fresh, cfg_scale=3.0)
    fresh.pipeline.load_lora_weights(str(path))
    torch.testing.assert_close(_final_latents(fresh, cfg_scale=3.0), trained, atol=1e-5, rtol=0)
    assert (untrained - trained).abs().max() > 1e-2


def _comfy_style_merge(unet: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Merge a kohya file into ``unet`` as ComfyUI does: key map ``lora_unet_<state-dict key, dots -> _>``, then
    ``W += alpha / r * up @ down`` (r = rows of down); every key of the file must be used."""
    key_map = {
        KOHYA_UNET_PREFIX + key[: -len(".weight")].replace(".", "_"): key
        for key in unet.state_dict()
        if key.endswith(".weight")
    }
    state = unet.state_dict()
    used = set()
    for name in {key.split(".")[0] for key in tensors}:
        down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
        alpha = float(tensors[f"{name}.alpha"])
        state[key_map[name]] += alpha / down.shape[0] * (up.float() @ down.float())
        used.update({f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"})
    assert used == set(tensors)
    unet.load_state_dict(state)


@pytest.mark.parametrize("name", ["tiny:sd", "tiny:sdxl"])
def test_a_comfyui_style_merge_reproduces_the_trained_policy(name, tmp_path):
    """rsLoRA and a per-module rank: the scale each module trained with must reach the file."""
    sampler = _trained(name, use_rslora=True, rank_pattern={"attn2.to_k": 2}, alpha_pattern={"attn1.to_q": 3})
    trained = _final_latents(sampler)
    tensors = load_file(save_kohya_lora(sampler, tmp_path / "policy.safetensors"))
    assert any(t.shape[0] == 2 for k, t in tensors.items() if k.endswith("attn2_to_k.lora_down.weight"))
    fresh = _fresh(name)
    with torch.no_grad():
        _comfy_style_merge(fresh.denoiser, tensors)
    torch.testing.assert_close(_final_latents(fresh), trained, atol=1e-5, rtol=0)


def test_up_times_down_is_the_trained_update_and_the_cast_and_metadata():
    sampler = _trained("tiny:sd")
    tensors = kohya_lora_state_dict(sampler)
    half = kohya_lora_state_dict(sampler, dtype=torch.float16)
    layer = sampler.denoiser.down_blocks[1].attentions[0].transformer_blocks[0].attn2.to_v
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_v"
    update = float(tensors[f"{name}.alpha"]) / RANK * tensors[f"{name}.lora_up.weight"]
    update = update @ tensors[f"{name}.lora_down.weight"]
    expected = ALPHA / RANK * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    torch.testing.assert_close(update, expected.detach())
    assert (
        half[f"{name}.lora_up.weight"].dtype == torch.float16 and half[f"{name}.alpha"].dtype == torch.float32
    )


def test_metadata_names_the_rank(tmp_path):
    path = save_kohya_lora(_trained("tiny:sd2"), tmp_path / "policy.safetensors")
    with safe_open(path, "pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_network_dim"] == metadata["ss_network_alpha"] == str(RANK)
    assert metadata["ss_v_parameterization"] == "True"  # SD 2.x predicts v


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="names UNet modules .* transformer. Use gen_rl.export.save_lora"):
        kohya_lora_state_dict(_fresh("tiny:flux"))
    with pytest.raises(ValueError, match="one .safetensors file"):
        save_kohya_lora(_trained("tiny:sd"), tmp_path / "policy")
    with pytest.raises(ValueError, match=r"train\.lora is off"):
        save_kohya_lora(_fresh("tiny:sd"), tmp_path / "policy.safetensors")
    assert not list(tmp_path.iterdir())
