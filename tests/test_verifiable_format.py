"""Format reward, answer extraction and the verifiable-reward registry."""

from __future__ import annotations

import inspect

import pytest

from rewards.verifiable import VERIFIABLE_REWARDS, get_verifiable_reward
from rewards.verifiable.boxes import iou_reward
from rewards.verifiable.format import answer_text, extract_answer, extract_solution, format_reward

REQUIRED = [
    "format",
    "exact",
    "choice",
    "yes_no",
    "numeric",
    "math",
    "iou",
    "giou",
    "detection_f1",
    "detection_weighted",
    "counting",
    "ocr",
    "rotation",
    "jigsaw",
    "preference",
]


# ----------------------------------------------------------------------------------------------------
# format reward
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "completion",
    [
        "<think>a cat on a mat</think><answer>B</answer>",
        "  <think>\nline 1\nline 2\n</think>\n<answer>\n[1, 2, 3, 4]\n</answer>\n",
        "<think></think><answer>yes</answer>",  # empty reasoning is allowed
    ],
)
def test_format_accepts_think_then_answer(completion):
    assert format_reward(completion, None, {}) == 1.0


@pytest.mark.parametrize(
    "completion",
    [
        "",
        "B",
        "<answer>B</answer>",  # no reasoning block
        "<think>x</think>",  # no answer block
        "<answer>B</answer><think>x</think>",  # wrong order
        "<think>x</think><answer>B</answer> and some more text",  # trailing text
        "preamble <think>x</think><answer>B</answer>",  # leading text
        "<think>x</think><answer>   </answer>",  # empty answer
        "<think>x</think><answer>A</answer><answer>B</answer>",  # two answers
        "<think>x<think>y</think></think><answer>B</answer>",  # nested reasoning
        "<think>x</think><answer>B",  # truncated
        "<THINK>x</THINK><ANSWER>B</ANSWER>",  # the tags are lower-case
    ],
)
def test_format_rejects_everything_else(completion):
    assert format_reward(completion, None, {}) == 0.0


def test_format_ignores_non_strings():
    assert format_reward(None, None, None) == 0.0  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------
# answer extraction
# ----------------------------------------------------------------------------------------------------


def test_last_answer_block_wins():
    text = "<think>maybe <answer>A</answer>?</think><answer>C</answer> <answer> D </answer>"
    assert extract_answer(text) == "D"


def test_without_tags_the_reasoning_is_removed():
    assert extract_answer("<think>it is 3</think> 4 ") == "4"
    assert extract_answer("  just 4  ") == "just 4"


def test_unclosed_answer_keeps_the_text_after_it():
    assert extract_answer("<think>x</think><answer> 42") == "42"


def test_unclosed_think_means_no_answer():
    assert extract_answer("<think>the answer is probably 42 and") == ""
    assert extract_answer("<think>a</think> <think>cut off 42") == ""


def test_require_tags():
    assert extract_answer("4", require_tags=True) == ""
    assert extract_answer("<answer>4", require_tags=True) == ""
    assert extract_answer("<answer>4</answer>", require_tags=True) == "4"
    assert answer_text("4", {"require_answer_tags": True}) == ""
    assert answer_text("4", {}) == "4"
    assert answer_text("4", None) == "4"


def test_require_tags_reaches_the_rewards():
    exact = VERIFIABLE_REWARDS["exact"]
    assert exact("Paris", "Paris", {}) == 1.0
    assert exact("Paris", "Paris", {"require_answer_tags": True}) == 0.0
    assert exact("<answer>Paris</answer>", "Paris", {"require_answer_tags": True}) == 1.0


def test_solution_unwrapping():
    assert extract_solution("<answer> B </answer>") == "B"
    assert extract_solution("  B ") == "B"
    assert extract_solution([1, 2, 3, 4]) == [1, 2, 3, 4]
    assert extract_solution(3) == 3


# ----------------------------------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------------------------------


def test_registry_has_the_contract_names_with_the_common_signature():
    for name in REQUIRED:
        assert name in VERIFIABLE_REWARDS, name
        parameters = list(inspect.signature(VERIFIABLE_REWARDS[name]).parameters.values())
        assert [p.name for p in parameters[:3]] == ["completion", "solution", "metadata"], name
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in parameters[3:]), name


def test_get_verifiable_reward():
    assert get_verifiable_reward("iou") is iou_reward
    assert get_verifiable_reward("rewards.verifiable.boxes:iou_reward") is iou_reward
    with pytest.raises(ValueError, match="Did you mean 'detection_f1'") as error:
        get_verifiable_reward("detection_f2")
    assert "jigsaw" in str(error.value)  # lists the known names
    with pytest.raises(ValueError, match="has no 'nope'"):
        get_verifiable_reward("rewards.verifiable.boxes:nope")


SMOKE = {
    "format": ("<think>x</think><answer>B</answer>", None, {}),
    "exact": ("<answer>Paris</answer>", "Paris", {}),
    "choice": ("<answer>B</answer>", "B", {}),
    "yes_no": ("<answer>yes</answer>", "yes", {}),
    "numeric": ("<answer>3.5</answer>", "3.5", {}),
    "math": ("<answer>\\frac{1}{2}</answer>", "0.5", {}),
    "iou": ("<answer>[0, 0, 10, 10]</answer>", [0, 0, 10, 10], {"box_format": "original"}),
    "giou": ("<answer>[0, 0, 10, 10]</answer>", [0, 0, 10, 10], {"box_format": "original"}),
    "detection_f1": ("<answer>[[0, 0, 10, 10]]</answer>", [[0, 0, 10, 10]], {"box_format": "original"}),
    "detection_weighted": ("<answer>[[0, 0, 10, 10]]</answer>", [[0, 0, 10, 10]], {"box_format": "original"}),
    "detection_map": ("<answer>[[0, 0, 10, 10]]</answer>", [[0, 0, 10, 10]], {"box_format": "original"}),
    "counting": ("<answer>3</answer>", 3, {}),
    "ocr": ("<answer>Hello</answer>", "Hello", {}),
    "rotation": ("<answer>90</answer>", "90", {}),
    "jigsaw": ("<answer>[1, 0, 3, 2]</answer>", "[1, 0, 3, 2]", {}),
    "preference": ("<answer>Image 2 is better</answer>", "2", {}),
    "temporal_iou": ("<answer>[2, 6]</answer>", [2, 6], {}),
}


@pytest.mark.parametrize("name", sorted(SMOKE))
def test_every_reward_pays_a_correct_answer_and_nothing_for_an_empty_one(name):
    completion, solution, metadata = SMOKE[name]
    reward = VERIFIABLE_REWARDS[name]
    value = reward(completion, solution, metadata)
    assert isinstance(value, float) and value == 1.0
    for empty in ("", "<think>long reasoning</think><answer></answer>", "<think>cut off"):
        assert reward(empty, solution, metadata) == 0.0, (name, empty)


def test_smoke_covers_every_registered_reward():
    assert set(SMOKE) == set(VERIFIABLE_REWARDS)
