"""Video inputs: frame sampling maths, frame folders and video files, records, encoding through the Qwen2-VL /
Qwen2.5-VL video processors, ratio 1 with video tokens, loud failure for models without video, and a tiny
video run whose reward rises."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from gen_rl.core.config import load_config
from gen_rl.vlm.config import VLMConfig
from gen_rl.vlm.data import load_videos, parse_record, read_records
from gen_rl.vlm.policy import eos_token_ids
from gen_rl.vlm.rollout import (
    SamplingSettings,
    collate_prompts,
    completion_log_probs,
    completion_mask,
    encode_prompt,
    generate_completions,
    sequence_inputs,
    vision_token_ids,
)
from gen_rl.vlm.tiny import tiny_llava, tiny_qwen2_5_vl, tiny_qwen2_vl
from gen_rl.vlm.video import VideoSampling, frame_files, read_video, sample_frame_indices

TINY_VIDEO = Path(__file__).resolve().parent.parent / "configs" / "vlm" / "tiny_video_colour_cpu.yaml"
RED, BLUE, GREEN = (220, 30, 30), (30, 40, 220), (30, 200, 40)


def _write_frames(folder: Path, colours, side: int = 56, pattern: str = "frame_{}.png") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for index, rgb in enumerate(colours):
        Image.new("RGB", (side, side), rgb).save(folder / pattern.format(index))
    return folder


# ---------------------------------------------------------------------------------------------------------
# frame sampling
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("count", "wanted"), [(100, 8), (10, 4), (7, 7), (5, 9), (64, 1)])
def test_sampling_by_count_takes_segment_centres(count, wanted):
    indices = sample_frame_indices(count, source_fps=25.0, num_frames=wanted)
    kept = min(wanted, count)
    assert len(indices) == kept
    for j, index in enumerate(indices):  # the centre of segment j of kept equal segments
        centre = (j + 0.5) * count / kept
        assert index == math.floor(centre)
        assert j * count / kept <= index < (j + 1) * count / kept
    assert indices == sorted(set(indices))


def test_sampling_by_fps_takes_window_centres():
    # 10 s at 30 fps, 2 frames per second: windows of 0.5 s centred at 0.25, 0.75, ... 9.75 s
    indices = sample_frame_indices(300, source_fps=30.0, fps=2.0)
    times = [0.25 + 0.5 * j for j in range(20)]
    assert indices == [math.floor(t * 30.0) for t in times]
    # 3 s at 4 fps sampled at 1 fps: centres 0.5, 1.5, 2.5 s -> frames 2, 6, 10
    assert sample_frame_indices(12, source_fps=4.0, fps=1.0) == [2, 6, 10]
    # asking for more frames per second than the source has keeps every frame once
    assert sample_frame_indices(5, source_fps=2.0, fps=10.0) == [0, 1, 2, 3, 4]
    # a clip shorter than one window still gives one frame
    assert sample_frame_indices(3, source_fps=30.0, fps=1.0) == [1]


def test_max_frames_caps_both_rules_evenly():
    assert sample_frame_indices(300, 30.0, fps=2.0, max_frames=4) == sample_frame_indices(
        300, 30.0, num_frames=4
    )
    assert sample_frame_indices(300, 30.0, num_frames=16, max_frames=4) == [37, 112, 187, 262]


def test_sampling_errors_name_the_fix():
    with pytest.raises(ValueError, match="num_frames > 0 or data.video.fps > 0"):
        sample_frame_indices(10, 25.0)
    with pytest.raises(ValueError, match="no frames"):
        sample_frame_indices(0, 25.0, num_frames=2)
    with pytest.raises(ValueError, match="frame rate"):
        sample_frame_indices(10, 0.0, num_frames=2)


# ---------------------------------------------------------------------------------------------------------
# reading videos
# ---------------------------------------------------------------------------------------------------------


def test_frame_folder_is_read_in_natural_order_with_its_frame_rate(tmp_path):
    # 12 frames: frame_10 / frame_11 must come after frame_9 (a plain sort would put them after frame_1)
    colours = [(index * 20, 0, 0) for index in range(12)]
    folder = _write_frames(tmp_path / "clip", colours)
    (folder / "notes.txt").write_text("not a frame")
    assert [path.name for path in frame_files(folder)][9:] == ["frame_9.png", "frame_10.png", "frame_11.png"]
    clip = read_video(
        folder, VideoSampling(num_frames=4, frames_fps=1.0), frames_fps=4.0
    )  # the record's rate
    assert clip.indices == [1, 4, 7, 10]
    assert [frame.getpixel((0, 0))[0] for frame in clip.frames] == [20, 80, 140, 200]
    assert clip.duration == pytest.approx(3.0) and clip.timestamps == pytest.approx([0.25, 1.0, 1.75, 2.5])
    assert clip.sampled_fps == pytest.approx(4 / 3.0)
    assert clip.metadata() == {
        "total_num_frames": 12,
        "fps": 4.0,
        "duration": 3.0,
        "frames_indices": [1, 4, 7, 10],
    }
    # without a record rate the config's frames_fps applies: 12 frames at 1 fps, 1 frame per 4 s
    slow = read_video(folder, VideoSampling(fps=0.25, frames_fps=1.0))
    assert slow.indices == [2, 6, 10] and slow.duration == 12.0


def test_missing_or_empty_videos_fail_with_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_video(tmp_path / "nowhere", VideoSampling(num_frames=2))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no frame images"):
        read_video(tmp_path / "empty", VideoSampling(num_frames=2))


def test_video_file_is_read_through_pyav(tmp_path):
    av = pytest.importorskip("av")
    path = tmp_path / "clip.mp4"
    colours = [RED] * 4 + [GREEN] * 4 + [BLUE] * 4  # 12 frames at 4 fps = 3 s
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width = stream.height = 64
        stream.pix_fmt = "yuv420p"
        for rgb in colours:
            frame = av.VideoFrame.from_image(Image.new("RGB", (64, 64), rgb))
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    clip = read_video(path, VideoSampling(num_frames=3))
    assert clip.num_source_frames == 12 and clip.source_fps == pytest.approx(4.0)
    assert clip.indices == [2, 6, 10] and clip.duration == pytest.approx(3.0)
    for frame, expected in zip(clip.frames, (RED, GREEN, BLUE), strict=True):
        assert frame.size == (64, 64)
        assert max(abs(a - b) for a, b in zip(frame.getpixel((32, 32)), expected, strict=True)) < 30


def test_records_carry_videos_resolved_against_the_root(tmp_path):
    _write_frames(tmp_path / "clips" / "a", [RED, BLUE])
    lines = [
        {"video": "clips/a", "video_fps": 2, "problem": "q", "solution": [0, 1], "task": "temporal"},
        {
            "videos": ["clips/a", str(tmp_path / "clips" / "a")],
            "image": None,
            "problem": "q",
            "solution": "s",
        },
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines))
    records = read_records(path, image_root=tmp_path)
    assert records[0].videos == [str(tmp_path / "clips" / "a")] and records[0].video_fps == 2.0
    assert len(records[1].videos) == 2 and records[1].video_fps == 0.0 and records[1].images == []
    clips = load_videos(records[0], VideoSampling(num_frames=8))
    assert len(clips) == 1 and len(clips[0].frames) == 2 and clips[0].duration == 1.0
    with pytest.raises(ValueError, match="'video' must be"):
        parse_record({"problem": "q", "solution": 1, "video": 3}, where="f.jsonl:2")
    with pytest.raises(ValueError, match="'video_fps' must be"):
        parse_record({"problem": "q", "solution": 1, "video": "a", "video_fps": -1}, where="f.jsonl:2")


# ---------------------------------------------------------------------------------------------------------
# encoding and log-probs
# ---------------------------------------------------------------------------------------------------------


def _clip(tmp_path: Path, colours, fps: float = 2.0, name: str = "clip"):
    folder = _write_frames(tmp_path / name, colours)
    return read_video(folder, VideoSampling(num_frames=len(colours)), frames_fps=fps)


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def qwen(request):
    builder = {"qwen2_vl": tiny_qwen2_vl, "qwen2_5_vl": tiny_qwen2_5_vl}[request.param]
    return request.param, *builder(seed=0)


def _settings(model, processor, max_new_tokens=6, temperature=0.7):
    return SamplingSettings(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        eos_token_ids=eos_token_ids(model, processor),
        pad_token_id=processor.tokenizer.pad_token_id,
        suppress_token_ids=vision_token_ids(model.config, processor),
    )


def test_video_prompts_carry_video_tokens_and_frame_times(qwen, tmp_path):
    family, _, processor = qwen
    clip = _clip(tmp_path, [RED, RED, BLUE, BLUE, GREEN, GREEN], fps=2.0)  # 6 frames, 3 s
    prompt = encode_prompt(processor, "what colour ?", [], videos=[clip])
    # 6 frames of 56 x 56: 3 temporal patches of 2 frames x 4 x 4 patches, 2 x 2 merged -> 12 video tokens
    assert prompt.visual["video_grid_thw"].tolist() == [[3, 4, 4]]
    assert prompt.visual["pixel_values_videos"].shape[0] == 3 * 4 * 4
    assert int((prompt.input_ids == processor.video_token_id).sum()) == 12
    assert int((prompt.input_ids == processor.image_token_id).sum()) == 0
    assert prompt.num_videos == 1 and prompt.processed_sizes == []
    assert prompt.token_fields["mm_token_type_ids"].tolist().count(2) == 12  # video tokens typed as video
    if family == "qwen2_5_vl":  # each temporal patch spans 2 frames / (2 frames per second) = 1 s
        assert prompt.visual["second_per_grid_ts"].tolist() == pytest.approx([2 / clip.sampled_fps])
        assert 2 / clip.sampled_fps == pytest.approx(1.0)


def test_pixels_per_frame_follow_the_config(qwen, tmp_path):
    """``data.video.max_pixels``: 56 x 56 frames capped at 28 x 28 pixels -> 1 x 1 merged tokens per 2 frames."""
    _, _, processor = qwen
    clip = _clip(tmp_path, [RED] * 4)
    small = encode_prompt(processor, "what colour ?", [], videos=[clip], video_pixels=(28 * 28, 28 * 28))
    assert small.visual["video_grid_thw"].tolist() == [[2, 2, 2]]
    assert int((small.input_ids == processor.video_token_id).sum()) == 2
    large = encode_prompt(processor, "what colour ?", [], videos=[clip], video_pixels=(112 * 112, 112 * 112))
    assert large.visual["video_grid_thw"].tolist() == [[2, 8, 8]]


def test_recomputed_log_probs_equal_sampling_log_probs_with_video_tokens(qwen, tmp_path):
    """Ratio 1 with video tokens: log-softmax of the scores ``generate`` sampled from == a forward pass on
    prompt + completion, in a left-padded batch mixing a video prompt, a video + image prompt and text."""
    _, model, processor = qwen
    settings = _settings(model, processor, max_new_tokens=8)
    clip = _clip(tmp_path, [RED, RED, BLUE, BLUE], name="a")
    other = _clip(tmp_path, [GREEN] * 6, fps=3.0, name="b")
    prompts = [
        encode_prompt(processor, "what colour ?", [], videos=[clip]),
        encode_prompt(
            processor, "what is the colour of this image ?", [Image.new("RGB", (56, 56), RED)], videos=[other]
        ),
        encode_prompt(processor, "what is the answer ?", []),
    ]
    prompts = [prompt for prompt in prompts for _ in range(3)]
    torch.manual_seed(0)
    completion_ids, scores = generate_completions(
        model, collate_prompts(prompts, settings.pad_token_id), settings, return_scores=True
    )
    mask, _ = completion_mask(completion_ids, settings.eos_token_ids)
    sampled = torch.log_softmax(scores.float(), dim=-1).gather(-1, completion_ids[..., None]).squeeze(-1)
    batch = sequence_inputs(prompts, completion_ids, mask, settings.pad_token_id)
    assert batch["pixel_values_videos"].shape[0] == 3 * (2 * 16) + 3 * (3 * 16)
    with torch.no_grad():
        recomputed = completion_log_probs(
            model, batch, completion_ids, settings.temperature, settings.suppress_token_ids
        )
    ratio = torch.exp(recomputed - sampled)[mask]
    assert float((ratio - 1).abs().max()) < 1e-5
    # the check has teeth: without the video tensors the same tokens get other log-probs
    blind = {name: value for name, value in batch.items() if "video" not in name}
    blind["input_ids"] = batch["input_ids"].masked_fill(batch["input_ids"] == processor.video_token_id, 0)
    blind["mm_token_type_ids"] = torch.where(batch["mm_token_type_ids"] == 2, 0, batch["mm_token_type_ids"])
    with torch.no_grad():
        without = completion_log_probs(
            model, blind, completion_ids, settings.temperature, settings.suppress_token_ids
        )
    assert float((without - sampled)[mask][: 3 * 8].abs().max()) > 1e-4


def test_the_frames_change_the_log_probs(qwen, tmp_path):
    """Guard: the tiny model's outputs depend on the video's pixels, so alignment tests can fail."""
    _, model, processor = qwen
    settings = _settings(model, processor)
    red = encode_prompt(processor, "what colour ?", [], videos=[_clip(tmp_path, [RED] * 4, name="r")])
    blue = encode_prompt(processor, "what colour ?", [], videos=[_clip(tmp_path, [BLUE] * 4, name="b")])
    completion = torch.tensor([[processor.tokenizer.convert_tokens_to_ids("red")] * 3])
    mask = torch.ones_like(completion, dtype=torch.bool)
    with torch.no_grad():
        values = [
            completion_log_probs(
                model, sequence_inputs([p], completion, mask, settings.pad_token_id), completion, 1.0, []
            )
            for p in (red, blue)
        ]
    assert float((values[0] - values[1]).abs().max()) > 1e-3


def test_a_video_never_silently_becomes_text(tmp_path):
    """A model whose processor takes no video (LLaVA) fails loudly on a video record: at trainer start-up,
    before any step, and in encode_prompt itself."""
    from gen_rl.vlm.trainer import VLMTrainer

    overrides = [f"log.output_dir={tmp_path / 'run'}", "model.name_or_path=builtin:tiny-llava"]
    with pytest.raises(ValueError, match="LlavaProcessor has no video processor"):
        VLMTrainer(load_config(VLMConfig, TINY_VIDEO, overrides))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    _, processor = tiny_llava()
    clip = _clip(tmp_path, [RED] * 4)
    with pytest.raises(ValueError, match="no video processor"):
        encode_prompt(processor, "what colour ?", [], videos=[clip])
    _, qwen_processor = tiny_qwen2_vl()
    from gen_rl.vlm.compat import placeholder_video_processor

    qwen_processor.video_processor = placeholder_video_processor()  # what loading without torchvision gives
    with pytest.raises(ValueError, match="torchvision"):
        encode_prompt(qwen_processor, "what colour ?", [], videos=[clip])


# ---------------------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------------------


def test_tiny_video_run_learns_the_colour_of_the_video(tmp_path):
    """configs/vlm/tiny_video_colour_cpu.yaml: Qwen2-VL on the synthetic video colour task. The only colour
    signal is in the frames, so a mean reward above 0.25 (naming any colour) needs the video; it rises from
    ~0.05 to > 0.5 in 40 steps, and the held-out greedy reward with it."""
    from gen_rl.vlm.trainer import VLMTrainer

    config = load_config(VLMConfig, TINY_VIDEO, [f"log.output_dir={tmp_path}", "log.progress=false"])
    trainer = VLMTrainer(config)
    record = trainer.stream.curriculum.stages[0].records[0]
    assert record.videos and not record.images  # the records really are videos
    prompt, metadata = trainer._encode_record(record)
    assert prompt.num_videos == 1 and "pixel_values_videos" in prompt.visual
    assert metadata["video_duration"] == pytest.approx(2.0)  # 4 frames at 2 fps
    summary = trainer.run()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 40
    assert summary["first_quarter_reward"] < 0.15
    assert summary["last_quarter_reward"] > 0.5
    assert all(record["policy/ratio_min"] == record["policy/ratio_max"] == 1.0 for record in records)
    greedy = [
        record["eval/reward/exact/greedy"] for record in records if "eval/reward/exact/greedy" in record
    ]
    assert len(greedy) == 4 and greedy[-1] > greedy[0]
