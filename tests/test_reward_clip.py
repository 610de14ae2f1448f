"""CLIP-based rewards (clip_score, pickscore, aesthetic) and dino_similarity on tiny random backbones.

The tiny models are saved in the real formats and loaded through the same code as real weights; every score is
checked against an independent computation with the transformers models and processors on PIL images.
"""

from __future__ import annotations

import inspect
import re

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import BitImageProcessor, CLIPModel, CLIPProcessor, Dinov2Model

from rewards.aesthetic import AESTHETIC_HEAD_FILE, AestheticMLP, AestheticReward
from rewards.base import REWARDS, build_reward
from rewards.clip_similarity import CLIPScore, PickScore
from rewards.dino import DinoSimilarity  # registers dino_similarity (rewards/__init__ does not yet)
from rewards.preprocess import OPENAI_CLIP_STD
from rewards.tiny import save_tiny_aesthetic, save_tiny_clip, save_tiny_dino
from rewards.weights import MissingWeightsError

PROMPTS = ["a red cube on a table", "a dog", "an astronaut riding a horse on mars"]
# Shortest edge 40 = the tiny processors' resize target: no resize; 47 - 32 = 15 makes floor(7.5) and
# round(7.5) crop offsets differ, so the crop rounding is checked too.
NO_RESIZE_SHAPES = [(40, 47), (47, 40), (40, 47)]


# ----- images ------------------------------------------------------------------------------------------------
def _noise_image(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def _smooth_image(height: int, width: int, seed: int) -> np.ndarray:
    """A low-frequency sinusoid per channel (about one period across the image), uint8 [H, W, 3]."""
    rng = np.random.default_rng(seed)
    rows, cols = np.meshgrid(np.arange(height) / height, np.arange(width) / width, indexing="ij")
    channels = []
    for _ in range(3):
        phase, freq_y, freq_x = rng.uniform(0, 2 * np.pi), rng.uniform(0.5, 1.2), rng.uniform(0.5, 1.2)
        channels.append(0.5 + 0.4 * np.sin(2 * np.pi * (freq_y * rows + freq_x * cols) + phase))
    return np.round(np.stack(channels, axis=-1) * 255).astype(np.uint8)


def _as_pixels(images: list[np.ndarray]) -> torch.Tensor:
    """``[H, W, 3]`` uint8 arrays (same size) to ``[B, 3, H, W]`` floats in [0, 1]."""
    return torch.stack([torch.from_numpy(image).permute(2, 0, 1) for image in images]).float() / 255


def _no_resize_images(seed: int = 0) -> list[np.ndarray]:
    return [_noise_image(h, w, seed + index) for index, (h, w) in enumerate(NO_RESIZE_SHAPES)]


# ----- fixtures ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Folders of a tiny CLIP, a tiny CLIP + aesthetic head and a tiny DINOv2, saved once for the module."""
    root = tmp_path_factory.mktemp("tiny_clip_rewards")
    aesthetic_clip, aesthetic_head = save_tiny_aesthetic(root / "aesthetic", seed=2)
    return {
        "clip": save_tiny_clip(root / "clip", seed=0),
        "aesthetic_clip": aesthetic_clip,
        "aesthetic_head": aesthetic_head,
        "dino": save_tiny_dino(root / "dino", seed=0),
    }


@pytest.fixture(scope="module")
def reference_clip(tiny):
    """The tiny CLIP and its processor loaded directly with transformers (the independent computation)."""
    return CLIPModel.from_pretrained(tiny["clip"]).eval(), CLIPProcessor.from_pretrained(tiny["clip"])


@pytest.fixture(scope="module")
def pickscore(tiny):
    """``pickscore`` loaded by name from the tiny folder, through the same code as the real weights."""
    folder = str(tiny["clip"])
    return build_reward("pickscore", model=folder, processor=folder, device="cpu")


def _reference_logits(reference_clip, images: list[np.ndarray], prompts: list[str]) -> torch.Tensor:
    """``logit_scale.exp() * cos`` of each image with its prompt, from ``CLIPModel`` on PIL images."""
    model, processor = reference_clip
    inputs = processor(
        text=prompts, images=[Image.fromarray(image) for image in images], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        return model(**inputs).logits_per_image.diagonal()


# ----- tokenizer ---------------------------------------------------------------------------------------------
def test_tiny_clip_tokenizer_ids_equal_open_clip(reference_clip):
    open_clip = pytest.importorskip("open_clip")
    reference_tokenizer = open_clip.get_tokenizer("ViT-B-32")
    sentences = [
        "a photo of a cat",
        "An astronaut riding a HORSE, on Mars!!  2024 edition",
        "it's the dog's ball: café naïve résumé",
        " ".join(["photorealistic"] * 40 + ["end"]),  # longer than 77 tokens: truncated to 75 + start + end
    ]
    tokenizer = reference_clip[1].tokenizer
    for sentence in sentences:
        ids = tokenizer(sentence, truncation=True, max_length=77)["input_ids"]
        expected = [token for token in reference_tokenizer([sentence])[0].tolist() if token != 0]
        assert ids == expected, sentence
    assert len(tokenizer) == 49408


# ----- preprocessing -----------------------------------------------------------------------------------------
def test_preprocess_equals_the_clip_processor_when_no_resize_is_needed(pickscore, reference_clip):
    processor = reference_clip[1]
    for index, image in enumerate(_no_resize_images()):
        expected = processor(images=Image.fromarray(image), return_tensors="pt")["pixel_values"]
        got = pickscore.preprocess(_as_pixels([image]))
        assert got.shape == expected.shape == (1, 3, 32, 32), index
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_preprocess_is_within_one_grey_level_of_the_processor_on_a_smooth_resized_image(
    pickscore, reference_clip
):
    # The transformers torchvision backend resizes uint8 images and rounds the result to uint8; the reward
    # resizes floats. On a smooth image they agree to about a grey level; on noise, bicubic overshoot and the
    # rounding differ more, so this check uses a low-frequency image.
    processor = reference_clip[1]
    tolerance = 1.5 / 255 / min(OPENAI_CLIP_STD)
    for height, width in [(64, 83), (83, 64), (57, 57)]:
        image = _smooth_image(height, width, seed=height + width)
        expected = processor(images=Image.fromarray(image), return_tensors="pt")["pixel_values"]
        got = pickscore.preprocess(_as_pixels([image]))
        assert got.shape == expected.shape == (1, 3, 32, 32)
        assert (got - expected).abs().max().item() < tolerance, (height, width)


# ----- clip_score / pickscore --------------------------------------------------------------------------------
def test_rewards_are_registered_with_their_published_defaults():
    assert REWARDS["clip_score"] is CLIPScore and REWARDS["pickscore"] is PickScore
    assert REWARDS["aesthetic"] is AestheticReward and REWARDS["dino_similarity"] is DinoSimilarity

    pick_defaults = inspect.signature(PickScore.__init__).parameters
    assert pick_defaults["model"].default == "yuvalkirstain/PickScore_v1"
    assert pick_defaults["processor"].default == "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    assert (
        inspect.signature(CLIPScore.__init__).parameters["model"].default == "openai/clip-vit-large-patch14"
    )


def test_pickscore_equals_clip_model_logits(pickscore, reference_clip):
    images = _no_resize_images(seed=10)
    # the images differ in size (40x47, 47x40): the reward scores one size per call
    expected = _reference_logits(reference_clip, images, PROMPTS)
    got = torch.cat(
        [
            pickscore(_as_pixels([image]), [prompt]).scores
            for image, prompt in zip(images, PROMPTS, strict=True)
        ]
    )
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    logit_scale = reference_clip[0].logit_scale.exp().item()
    assert pickscore.logit_scale == pytest.approx(logit_scale, rel=1e-6)
    assert not torch.allclose(got, got[0])  # the prompts and images matter


def test_clip_score_is_the_cosine_and_batches_and_repeats_prompts_consistently(tiny, reference_clip):
    images = [_noise_image(40, 47, seed) for seed in range(5)]
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[0], PROMPTS[2], PROMPTS[0]]
    logit_scale = reference_clip[0].logit_scale.exp()
    expected_cosine = _reference_logits(reference_clip, images, prompts) / logit_scale
    reward = build_reward("clip_score", model=str(tiny["clip"]), device="cpu", batch_size=2)
    output = reward(_as_pixels(images), prompts)
    torch.testing.assert_close(output.scores, expected_cosine, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(output.components["clip_cosine"], expected_cosine, rtol=1e-5, atol=1e-6)
    assert output.scores.abs().max() <= 1.0


def test_embed_images_returns_unit_norm_projected_features(pickscore, reference_clip):
    images = [_noise_image(40, 47, seed) for seed in range(3)]
    model, processor = reference_clip
    pixel_values = processor(images=[Image.fromarray(image) for image in images], return_tensors="pt")
    with torch.no_grad():
        projected = model.get_image_features(**pixel_values).pooler_output
    embeds = pickscore.embed_images(_as_pixels(images))
    assert embeds.shape == (3, model.config.projection_dim)
    torch.testing.assert_close(embeds.norm(dim=-1), torch.ones(3), rtol=0, atol=1e-5)
    torch.testing.assert_close(embeds, torch.nn.functional.normalize(projected, dim=-1), rtol=0, atol=1e-5)


def test_clip_at_zero_clamps_negative_cosines_and_scale_multiplies(tiny):
    images = [_noise_image(40, 47, seed) for seed in range(8)]
    prompts = [PROMPTS[index % 3] for index in range(8)]
    pixels = _as_pixels(images)
    cosine = build_reward("clip_score", model=str(tiny["clip"]), device="cpu")(pixels, prompts).scores
    assert (cosine < 0).any() and (cosine > 0).any()  # the data exercises the clamp both ways
    reward = build_reward("clip_score", model=str(tiny["clip"]), device="cpu", scale=2.5, clip_at_zero=True)
    output = reward(pixels, prompts)
    torch.testing.assert_close(output.scores, 2.5 * cosine.clamp(min=0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(output.components["clip_cosine"], cosine, rtol=1e-5, atol=1e-6)


def test_pickscore_divide_by(tiny, pickscore):
    pixels, prompts = _as_pixels([_noise_image(40, 47, seed) for seed in range(2)]), PROMPTS[:2]
    folder = str(tiny["clip"])
    divided = build_reward("pickscore", model=folder, processor=folder, device="cpu", divide_by=26.0)
    torch.testing.assert_close(divided(pixels, prompts).scores, pickscore(pixels, prompts).scores / 26)
    with pytest.raises(ValueError, match="divide_by"):
        build_reward("pickscore", model=folder, processor=folder, device="cpu", divide_by=0)


def test_pickscore_reads_the_logit_scale_in_float32_before_casting_to_the_model_dtype(tiny, reference_clip):
    folder = str(tiny["clip"])
    reward = build_reward("pickscore", model=folder, processor=folder, device="cpu", dtype="bfloat16")
    assert reward.model.logit_scale.dtype == torch.bfloat16
    assert reward.logit_scale == pytest.approx(reference_clip[0].logit_scale.exp().item(), rel=1e-6)


# ----- aesthetic ---------------------------------------------------------------------------------------------
def test_aesthetic_equals_a_hand_computation(tiny):
    images = _no_resize_images(seed=20)
    reward = build_reward(
        "aesthetic", clip_model=str(tiny["aesthetic_clip"]), head=str(tiny["aesthetic_head"]), device="cpu"
    )
    got = torch.cat([reward(_as_pixels([image]), ["unused"]).scores for image in images])

    model = CLIPModel.from_pretrained(tiny["aesthetic_clip"])
    processor = CLIPProcessor.from_pretrained(tiny["aesthetic_clip"])
    inputs = processor(images=[Image.fromarray(image) for image in images], return_tensors="pt")
    with torch.no_grad():
        features = model.get_image_features(**inputs).pooler_output
    hidden = features / features.norm(dim=-1, keepdim=True)
    weights = torch.load(tiny["aesthetic_head"], weights_only=True)
    for layer in (0, 2, 4, 6, 7):  # dropout is the identity at inference; the head has no activations
        hidden = hidden @ weights[f"layers.{layer}.weight"].T + weights[f"layers.{layer}.bias"]
    torch.testing.assert_close(got, hidden.squeeze(-1), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, got[0])


def test_aesthetic_head_folder_and_wrong_heads(tiny, tmp_path):
    clip_folder = str(tiny["aesthetic_clip"])
    pixels = _as_pixels([_noise_image(40, 47, 0)])
    from_file = build_reward(
        "aesthetic", clip_model=clip_folder, head=str(tiny["aesthetic_head"]), device="cpu"
    )
    from_folder = build_reward(
        "aesthetic", clip_model=clip_folder, head=str(tiny["aesthetic_head"].parent), device="cpu"
    )
    torch.testing.assert_close(from_folder(pixels, ["x"]).scores, from_file(pixels, ["x"]).scores)

    narrow_head = tmp_path / "narrow.pth"
    torch.save(AestheticMLP(16).state_dict(), narrow_head)
    with pytest.raises(
        ValueError, match=r"(?s)input width 32 \(the CLIP model's projection_dim\).*size mismatch"
    ):
        build_reward("aesthetic", clip_model=clip_folder, head=str(narrow_head), device="cpu")
    renamed_head = tmp_path / "renamed.pth"
    torch.save({f"mlp.{key}": value for key, value in AestheticMLP(32).state_dict().items()}, renamed_head)
    with pytest.raises(ValueError, match=r"(?s)does not fit.*Missing key"):
        build_reward("aesthetic", clip_model=clip_folder, head=str(renamed_head), device="cpu")
    not_torch = tmp_path / "notes.pth"
    not_torch.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="cannot read it as a torch state dict"):
        build_reward("aesthetic", clip_model=clip_folder, head=str(not_torch), device="cpu")


# ----- missing weights ---------------------------------------------------------------------------------------
def test_missing_clip_weights_name_the_expected_model_and_where_it_is_published(tiny, tmp_path):
    absent = str(tmp_path / "absent")
    with pytest.raises(
        MissingWeightsError, match=r"(?s)does not exist.*huggingface\.co/openai/clip-vit-large-patch14"
    ):
        build_reward("clip_score", model=absent, device="cpu")
    pickscore_published = r"huggingface\.co/yuvalkirstain/PickScore_v1"
    with pytest.raises(
        MissingWeightsError, match=rf"(?s)PickScore model.*no-such-pickscore.*{pickscore_published}"
    ):
        build_reward("pickscore", model="gen-rl-tests/no-such-pickscore", device="cpu")
    with pytest.raises(
        MissingWeightsError, match=r"(?s)processor.*no-such-processor.*huggingface\.co/laion/CLIP-ViT-H-14"
    ):
        build_reward(
            "pickscore", model=str(tiny["clip"]), processor="gen-rl-tests/no-such-processor", device="cpu"
        )


def test_missing_aesthetic_weights_name_the_file_and_where_it_is_published(tiny, tmp_path):
    published = r"github\.com/christophschuhmann/improved-aesthetic-predictor"
    clip_folder = str(tiny["aesthetic_clip"])
    with pytest.raises(
        MissingWeightsError, match=rf"(?s){re.escape(AESTHETIC_HEAD_FILE)}.*no-such-head.*{published}"
    ):
        build_reward("aesthetic", clip_model=clip_folder, head="gen-rl-tests/no-such-head", device="cpu")
    with pytest.raises(MissingWeightsError, match=rf"(?s)expected the file.*linearMSE\.pth.*{published}"):
        build_reward("aesthetic", clip_model=clip_folder, head=str(tmp_path), device="cpu")
    with pytest.raises(
        MissingWeightsError, match=r"(?s)does not exist.*huggingface\.co/openai/clip-vit-large"
    ):
        build_reward(
            "aesthetic", clip_model=str(tmp_path / "absent"), head=str(tiny["aesthetic_head"]), device="cpu"
        )


# ----- dino_similarity ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dino_references(tmp_path_factory):
    """A folder of three PNG reference images (40x47, no resize needed) and a stray non-image file."""
    folder = tmp_path_factory.mktemp("dino_references")
    images = [_noise_image(40, 47, seed) for seed in (100, 101, 102)]
    for index, image in enumerate(images):
        Image.fromarray(image).save(folder / f"ref_{index}.png")
    (folder / "notes.txt").write_text("not an image")
    return folder, images


def _dino_features(folder, images: list[np.ndarray]) -> torch.Tensor:
    """Unit-norm ``Dinov2Model`` pooler outputs of PIL images through ``BitImageProcessor``."""
    processor = BitImageProcessor.from_pretrained(folder)
    inputs = processor(images=[Image.fromarray(image) for image in images], return_tensors="pt")
    with torch.no_grad():
        pooled = Dinov2Model.from_pretrained(folder)(**inputs).pooler_output
    return torch.nn.functional.normalize(pooled, dim=-1)


def test_dino_similarity_equals_independent_cosines(tiny, dino_references):
    folder, reference_images = dino_references
    candidates = [_noise_image(40, 47, seed) for seed in (200, 201)] + [reference_images[1]]
    similarity = _dino_features(tiny["dino"], candidates) @ _dino_features(tiny["dino"], reference_images).T
    pixels = _as_pixels(candidates)

    mean_reward = build_reward(
        "dino_similarity", references=str(folder), model=str(tiny["dino"]), device="cpu"
    )
    output = mean_reward(pixels, ["p"] * 3)
    torch.testing.assert_close(output.scores, similarity.mean(dim=1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(output.components["dino_max_similarity"], similarity.max(dim=1).values)
    assert output.components["dino_max_similarity"][2].item() == pytest.approx(1.0, abs=1e-5)  # itself

    max_reward = build_reward(
        "dino_similarity", references=str(folder), model=str(tiny["dino"]), reduce="max", device="cpu"
    )
    max_scores = max_reward(pixels, ["p"] * 3).scores
    torch.testing.assert_close(max_scores, similarity.max(dim=1).values, rtol=1e-5, atol=1e-5)
    assert (max_scores - output.scores).min() > 1e-4  # mean and max differ on this data

    two_files = [str(folder / "ref_0.png"), str(folder / "ref_2.png")]
    listed = build_reward("dino_similarity", references=two_files, model=str(tiny["dino"]), device="cpu")
    expected_listed = similarity[:, [0, 2]].mean(dim=1)
    torch.testing.assert_close(listed(pixels, ["p"] * 3).scores, expected_listed, rtol=1e-5, atol=1e-5)


def test_dino_similarity_reference_errors(tiny, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no reference images"):
        build_reward("dino_similarity", references=str(empty), model=str(tiny["dino"]), device="cpu")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_reward(
            "dino_similarity", references=str(tmp_path / "absent"), model=str(tiny["dino"]), device="cpu"
        )
    with pytest.raises(ValueError, match="reduce"):
        build_reward("dino_similarity", references=str(empty), model=str(tiny["dino"]), reduce="median")
