"""Self-supervised tasks from an image folder: rotation and jigsaw generators and their rewards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rewards.verifiable.ssl_tasks import (
    ROTATION_ANGLES,
    assemble_tiles,
    jigsaw_reward,
    list_images,
    make_jigsaw_tasks,
    make_rotation_tasks,
    rotation_reward,
    shuffle_tiles,
    split_tiles,
    write_jsonl,
)


def tagged(answer: str) -> str:
    return f"<think>reasoning</think><answer>{answer}</answer>"


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """Three small random RGB images (one grey-scale, one in a sub-folder, one of odd size) and a non-image."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 256, (9, 7), dtype=np.uint8)).save(folder / "sub" / "b.PNG")  # grey, odd
    Image.fromarray(rng.integers(0, 256, (10, 4, 3), dtype=np.uint8)).save(folder / "c.bmp")
    (folder / "notes.txt").write_text("not an image")
    return folder


def load(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_list_images(image_folder, tmp_path):
    names = [path.relative_to(image_folder).as_posix() for path in list_images(image_folder)]
    assert names == ["a.png", "c.bmp", "sub/b.PNG"]
    with pytest.raises(ValueError, match="does not exist"):
        list_images(tmp_path / "missing")


# ----------------------------------------------------------------------------------------------------
# rotation
# ----------------------------------------------------------------------------------------------------


def test_rotation_images_equal_np_rot90_of_the_original(image_folder, tmp_path):
    out = tmp_path / "rotation"
    records = make_rotation_tasks(image_folder, out, all_angles=True)
    sources = list_images(image_folder)
    assert len(records) == 4 * len(sources)
    for k, record in enumerate(records):
        assert set(record) == {"image", "problem", "solution", "task"}
        assert record["task"] == "rotation"
        assert Path(record["image"]).parent == out
        angle = int(record["solution"])
        assert angle == ROTATION_ANGLES[k % 4]
        original = load(sources[k // 4])
        np.testing.assert_array_equal(load(record["image"]), np.rot90(original, k=angle // 90))
    assert len({record["image"] for record in records}) == len(records)  # no file overwritten


def test_rotation_one_random_angle_per_image_is_deterministic(image_folder, tmp_path):
    first = make_rotation_tasks(image_folder, tmp_path / "r1", seed=3)
    again = make_rotation_tasks(image_folder, tmp_path / "r2", seed=3)
    assert len(first) == 3
    assert [r["solution"] for r in first] == [r["solution"] for r in again]
    many = [make_rotation_tasks(image_folder, tmp_path / f"s{seed}", seed=seed) for seed in range(8)]
    assert len({r["solution"] for records in many for r in records}) > 1  # the seed matters
    with pytest.raises(ValueError, match="angles"):
        make_rotation_tasks(image_folder, tmp_path / "bad", angles=(45,))


@pytest.mark.parametrize("angle", ROTATION_ANGLES)
def test_rotation_reward_accepts_only_the_right_angle(angle):
    assert rotation_reward(tagged(str(angle)), str(angle), {}) == 1.0
    assert rotation_reward(tagged(f"{angle} degrees"), f"<answer>{angle}</answer>", {}) == 1.0
    assert rotation_reward(tagged(f"{angle}°"), angle, {}) == 1.0
    for other in ROTATION_ANGLES:
        if other != angle:
            assert rotation_reward(tagged(str(other)), str(angle), {}) == 0.0
    assert rotation_reward(tagged("0 90 180 270"), str(angle), {}) == 0.0  # every option
    assert rotation_reward(tagged(f"{angle} or 90"), str(angle), {}) == 0.0  # "or" hedges, even "90 or 90"
    assert rotation_reward(tagged(""), str(angle), {}) == 0.0


def test_rotation_reward_rejects_bad_solution():
    with pytest.raises(ValueError, match="rotation solution"):
        rotation_reward(tagged("45"), "45", {})


# ----------------------------------------------------------------------------------------------------
# jigsaw
# ----------------------------------------------------------------------------------------------------


def test_tiles_round_trip():
    array = np.arange(6 * 9 * 3).reshape(6, 9, 3)
    tiles = split_tiles(array, 3)
    assert len(tiles) == 9 and tiles[1][0, 0, 0] == array[0, 3, 0] and tiles[3][0, 0, 0] == array[2, 0, 0]
    np.testing.assert_array_equal(assemble_tiles(tiles, 3), array)
    with pytest.raises(ValueError, match="does not split"):
        split_tiles(array, 4)
    with pytest.raises(ValueError, match="not a permutation"):
        shuffle_tiles(array, [0, 0, 1, 2, 3, 4, 5, 6, 7], 3)


@pytest.mark.parametrize("grid", [2, 3])
def test_jigsaw_tiles_reassemble_to_the_original_with_the_solution(image_folder, tmp_path, grid):
    out = tmp_path / f"jigsaw{grid}"
    records = make_jigsaw_tasks(image_folder, out, grid=grid, seed=1)
    sources = list_images(image_folder)
    assert len(records) == len(sources)
    for record, source in zip(records, sources, strict=True):
        assert set(record) == {"image", "problem", "solution", "task"} and record["task"] == "jigsaw"
        permutation = json.loads(record["solution"])
        assert sorted(permutation) == list(range(grid * grid))
        assert permutation != sorted(permutation)  # never the unshuffled image
        original = load(source)
        height, width = original.shape[0] // grid * grid, original.shape[1] // grid * grid
        cropped = original[:height, :width]  # top-left crop to a multiple of the grid
        shown = load(record["image"])
        assert shown.shape == cropped.shape
        shown_tiles = split_tiles(shown, grid)
        restored = [None] * (grid * grid)
        for position, tile_index in enumerate(permutation):  # position p shows original tile solution[p]
            restored[tile_index] = shown_tiles[position]
        np.testing.assert_array_equal(assemble_tiles(restored, grid), cropped)
        assert not np.array_equal(shown, cropped)  # random images: a shuffle changes the pixels


def test_jigsaw_never_shows_the_unshuffled_image_unless_allowed(image_folder, tmp_path):
    identity = [0, 1, 2, 3]
    for seed in range(200):  # 1 draw in 24 is the identity: find a seed whose draws include one
        allowed = make_jigsaw_tasks(image_folder, tmp_path / "a", grid=2, seed=seed, allow_identity=True)
        if any(json.loads(r["solution"]) == identity for r in allowed):
            break
    else:
        pytest.fail("no seed drew the identity")
    default = make_jigsaw_tasks(image_folder, tmp_path / "d", grid=2, seed=seed)
    assert all(json.loads(r["solution"]) != identity for r in default)


def test_jigsaw_reward_accepts_the_solution_and_rejects_others(image_folder, tmp_path):
    record = make_jigsaw_tasks(image_folder, tmp_path / "j", grid=2, seed=0)[0]
    solution = record["solution"]
    permutation = json.loads(solution)
    assert jigsaw_reward(tagged(solution), solution, {}) == 1.0
    assert jigsaw_reward(tagged(" ".join(map(str, permutation))), solution, {}) == 1.0
    assert jigsaw_reward(tagged(", ".join(map(str, permutation))), f"<answer>{solution}</answer>", {}) == 1.0
    swapped = permutation.copy()
    swapped[0], swapped[1] = swapped[1], swapped[0]
    assert jigsaw_reward(tagged(str(swapped)), solution, {}) == 0.0
    assert jigsaw_reward(tagged("[0, 1, 2, 3]"), "[1, 0, 3, 2]", {}) == 0.0
    assert jigsaw_reward(tagged(str(permutation + permutation)), solution, {}) == 0.0  # listing twice
    assert jigsaw_reward(tagged(""), solution, {}) == 0.0


def test_jigsaw_partial_credit():
    solution = "[1, 0, 3, 2]"
    assert jigsaw_reward(tagged("[1, 0, 2, 3]"), solution, {"partial_credit": True}) == 0.5
    assert jigsaw_reward(tagged("[1, 0, 2, 3]"), solution, {}, partial=True) == 0.5
    assert jigsaw_reward(tagged("[1, 0, 2, 3]"), solution, {}) == 0.0
    assert (
        jigsaw_reward(tagged("[1, 1, 1, 1]"), solution, {"partial_credit": True}) == 0.0
    )  # not a permutation
    with pytest.raises(ValueError, match="permutation"):
        jigsaw_reward(tagged("[0, 1]"), "[0, 0]", {})


def test_write_jsonl(image_folder, tmp_path):
    records = make_rotation_tasks(image_folder, tmp_path / "r", seed=0)
    path = write_jsonl(records, tmp_path / "out" / "rotation.jsonl")
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == records
