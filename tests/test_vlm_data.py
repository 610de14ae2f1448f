"""VLM data: JSONL records with an image root, curriculum stages, a resumable seeded prompt stream."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from gen_rl.vlm.data import (
    Curriculum,
    PromptStream,
    Stage,
    VLMRecord,
    load_images,
    parse_record,
    read_records,
)
from gen_rl.vlm.synthetic import COLOUR_QUESTION, write_colour_dataset


def _records(count: int, task: str = "t") -> list[VLMRecord]:
    return [
        VLMRecord(images=[], problem=f"p{i}", solution=str(i), task=task, key=str(i)) for i in range(count)
    ]


def test_records_resolve_images_against_the_root(tmp_path):
    Image.new("RGB", (8, 6), (1, 2, 3)).save(tmp_path / "a.png")
    Image.new("L", (4, 4), 9).save(tmp_path / "b.png")
    lines = [
        {"image": "a.png", "problem": "q1", "solution": "s", "task": "colour", "metadata": {"k": 1}},
        {"images": ["a.png", str(tmp_path / "b.png")], "problem": "q2", "solution": [1, 2, 3, 4]},
        {"image": None, "problem": "q3", "solution": 7, "id": "text-only"},
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    records = read_records(path, image_root=tmp_path)
    assert [record.images for record in records] == [
        [str(tmp_path / "a.png")],
        [str(tmp_path / "a.png"), str(tmp_path / "b.png")],
        [],
    ]
    assert records[0].task == "colour" and records[0].metadata == {"k": 1}
    assert records[1].solution == [1, 2, 3, 4] and records[2].key == "text-only"
    images = load_images(records[1])
    assert [image.mode for image in images] == ["RGB", "RGB"] and images[0].size == (8, 6)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"problem": "q"}, "missing"),
        ({"problem": "q", "solution": "s", "image": 3}, "'image' must be"),
        ({"problem": "q", "solution": "s", "metadata": [1]}, "'metadata' must be"),
    ],
)
def test_bad_records_are_reported(raw, message):
    with pytest.raises(ValueError, match=message):
        parse_record(raw, where="f.jsonl:3")


def test_bad_json_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"problem": "q", "solution": 1}\n{not json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_records(path)


def test_curriculum_runs_stages_in_order():
    curriculum = Curriculum(
        [
            Stage("perception", _records(3), steps=2),
            Stage("grounding", _records(3), steps=3),
            Stage("math", _records(3)),
        ]
    )
    names = [curriculum.stage_at(step).name for step in range(8)]
    assert names == ["perception"] * 2 + ["grounding"] * 3 + ["math"] * 3
    with pytest.raises(ValueError, match="no records"):
        Curriculum([Stage("empty", [])])


def test_prompt_stream_visits_every_record_each_epoch_and_resumes():
    curriculum = Curriculum([Stage("a", _records(5), steps=2), Stage("b", _records(4, task="u"))])
    stream = PromptStream(curriculum, seed=3)
    first_epoch = stream.draw(0, 5)
    assert sorted(record.key for record in first_epoch) == ["0", "1", "2", "3", "4"]
    assert [record.key for record in first_epoch] != ["0", "1", "2", "3", "4"]  # shuffled
    state = stream.state_dict()
    continued = [record.key for record in stream.draw(1, 3) + stream.draw(2, 2)]

    restored = PromptStream(curriculum, seed=3)
    restored.load_state_dict(state)
    assert [record.key for record in restored.draw(1, 3) + restored.draw(2, 2)] == continued
    assert all(record.task == "u" for record in restored.draw(5, 2))  # stage b serves step 5
    unshuffled = PromptStream(curriculum, seed=3, shuffle=False)
    assert [record.key for record in unshuffled.draw(0, 6)] == ["0", "1", "2", "3", "4", "0"]


def test_colour_dataset_is_readable_records(tmp_path):
    path = write_colour_dataset(tmp_path, num_records=8, seed=0)
    records = read_records(path, image_root=tmp_path)
    assert [record.solution for record in records[:4]] == ["red", "green", "blue", "yellow"]
    assert all(record.problem == COLOUR_QUESTION and record.task == "colour" for record in records)
    red = load_images(records[0])[0].getpixel((10, 10))
    assert red[0] > 150 and red[1] < 100 and red[2] < 100
