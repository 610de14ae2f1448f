"""Preference records: every bad record (missing or unreadable image, the same image twice, bad JSON or label) is
reported with its line number, then the run aborts (exit 2 through the entry point) or skips it; the Pick-a-Pic
and HPD layouts read from local files give the pairs and rankings they hold."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from PIL import Image

from gen_rl.data import DataError
from gen_rl.reward_model.data import load_comparisons
from gen_rl.train import cli


def _image(path: Path, colour: tuple[int, int, int]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)
    return path.name


def _bad_file(tmp_path: Path) -> Path:
    _image(tmp_path / "red.png", (255, 0, 0))
    _image(tmp_path / "blue.png", (0, 0, 255))
    (tmp_path / "broken.png").write_text("not an image")
    records = [
        {"prompt": "p", "image_a": "red.png", "image_b": "blue.png", "label": 1},  # 1: good
        {"prompt": "p", "image_a": "red.png", "image_b": "gone.png", "label": 0},  # 2: missing image
        {"prompt": "p", "image_a": "broken.png", "image_b": "blue.png", "label": 1},  # 3: unreadable
        {"prompt": "p", "image_a": "red.png", "image_b": "red.png", "label": 0.5},  # 4: same image twice
        {"prompt": "p", "chosen": "blue.png", "rejected": "red.png"},  # 5: good
        {"prompt": "p", "image_a": "red.png", "image_b": "blue.png", "label": 2},  # 6: bad label
    ]
    lines = [json.dumps(record) for record in records] + ["{broken", ""]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_bad_records_abort_with_every_line_number(tmp_path):
    path = _bad_file(tmp_path)
    with pytest.raises(DataError) as error:
        load_comparisons(path, "pairs")
    message = str(error.value)
    assert f"{path}:2: image {tmp_path / 'gone.png'} does not exist" in message
    assert f"{path}:3: image {tmp_path / 'broken.png'} cannot be read as an image" in message
    assert f"{path}:4: the same image twice ({tmp_path / 'red.png'})" in message
    assert f"{path}:6: 'label' must be 1 (image_a preferred), 0 (image_b) or 0.5 (a tie); got 2" in message
    assert f"{path}:7: not valid JSON" in message
    assert "(5 bad records of 7)" in message and f"{path}:1:" not in message and f"{path}:5:" not in message


def test_bad_records_are_skipped_with_one_warning_each(tmp_path, caplog):
    path = _bad_file(tmp_path)
    with caplog.at_level(logging.WARNING):
        kept = load_comparisons(path, "pairs", bad_records="skip")
    assert [(item.line, item.images[0].name, item.label) for item in kept] == [
        (1, "red.png", 1.0),
        (5, "blue.png", 1.0),
    ]
    warned = [record.getMessage() for record in caplog.records if "skipping" in record.getMessage()]
    assert [message.split(": ")[0].rsplit(":", 1)[1] for message in warned] == ["2", "3", "4", "6", "7"]


def test_the_entry_point_stops_before_training_naming_the_records(tmp_path, capsys):
    path = _bad_file(tmp_path)
    status = cli(
        [
            "--config",
            str(Path(__file__).resolve().parents[1] / "configs/reward_model/tiny_colour_preference_cpu.yaml"),
            "data.synthetic=",
            f"data.train_file={path}",
            f"data.eval_file={path}",
            f"log.output_dir={tmp_path / 'run'}",
        ]
    )
    error = capsys.readouterr().err
    assert status == 2
    assert error.startswith("error: ") and len(error.strip().splitlines()) == 1
    assert f"{path}:2: image" in error and f"{path}:4: the same image twice" in error
    assert not (tmp_path / "run" / "model").exists()


def test_pickapic_rows_give_pairs_with_ties_and_refuse_unlabelled_or_identical_rows(tmp_path, caplog):
    _image(tmp_path / "images" / "u1.jpg", (255, 0, 0))
    _image(tmp_path / "images" / "u2.jpg", (0, 255, 0))
    rows = [
        {"caption": "a cat", "jpg_0": "u1.jpg", "jpg_1": "u2.jpg", "label_0": 0, "label_1": 1},
        {"caption": "a dog", "image_0_uid": "u2", "image_1_uid": "u1", "label_0": 0.5, "label_1": 0.5},
        {"caption": "a cow", "jpg_0": "u1.jpg", "jpg_1": "u2.jpg", "label_0": 1, "has_label": False},
        {"caption": "a pig", "jpg_0": "u1.jpg", "jpg_1": "u1.jpg", "label_0": 1, "are_different": False},
    ]
    path = tmp_path / "pickapic.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    kept = load_comparisons(path, "pickapic", image_root=str(tmp_path / "images"), bad_records="skip")
    root = tmp_path / "images"
    assert [(c.prompt, c.images, c.label) for c in kept] == [
        ("a cat", (root / "u1.jpg", root / "u2.jpg"), 0.0),
        ("a dog", (root / "u2.jpg", root / "u1.jpg"), 0.5),
    ]
    messages = " ".join(record.getMessage() for record in caplog.records)
    assert f"{path}:3: has_label is false" in messages and f"{path}:4: the same image twice" in messages


def test_hpd_entries_give_pairs_from_the_preferred_image_and_rankings_from_ranks(tmp_path):
    names = [_image(tmp_path / f"{i}.png", (60 * i, 0, 0)) for i in range(3)]
    entries = [
        {"prompt": "a", "image_path": names, "human_preference": [0, 1, 0]},
        {"prompt": "b", "image_path": names, "rank": [2, 0, 1]},  # lower is better: 1.png, 2.png, 0.png
    ]
    path = tmp_path / "train.json"
    path.write_text(json.dumps(entries))
    kept = load_comparisons(path, "hpd")
    shown = [(c.prompt, [p.name for p in c.images], c.label, c.line) for c in kept]
    assert shown == [
        ("a", ["1.png", "0.png"], 1.0, 1),
        ("a", ["1.png", "2.png"], 1.0, 1),
        ("b", ["1.png", "2.png", "0.png"], None, 2),
    ]


def test_implicit_feedback_files_become_pairs_within_each_context(tmp_path):
    names = [_image(tmp_path / f"{i}.png", (40 * i, 0, 0)) for i in range(4)]
    rows = [
        {"prompt": "p", "image": names[0], "engagement": 40, "group": "u1", "category": "art"},
        {"prompt": "p", "image": names[1], "engagement": 3, "group": "u1", "category": "art"},
        {"prompt": "q", "image": names[2], "engagement": 1000, "group": "u2"},  # alone in its context
        {"prompt": "q", "image": names[3], "engagement": -1, "group": "u2"},  # bad count
    ]
    path = tmp_path / "implicit.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(DataError, match=f"{path}:4: 'engagement' must be a count >= 0; got -1"):
        load_comparisons(path, "implicit")
    kept = load_comparisons(path, "implicit", bad_records="skip")
    assert [([p.name for p in c.images], c.label, c.line, c.category) for c in kept] == [
        (["0.png", "1.png"], 1.0, 1, "art")
    ]
