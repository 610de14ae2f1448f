"""OCR (edit distance, ANLS) and preference-judgment rewards."""

from __future__ import annotations

import random

import pytest

from rewards.verifiable.ocr import edit_distance, normalized_edit_similarity, ocr_reward
from rewards.verifiable.preference import preference_reward, preferred_label


def tagged(answer: str) -> str:
    return f"<think>reasoning</think><answer>{answer}</answer>"


def reference_levenshtein(a, b) -> int:
    """Textbook full-table dynamic programme, independent of the vectorised implementation."""
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a) + 1):
        table[i][0] = i
    for j in range(len(b) + 1):
        table[0][j] = j
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            table[i][j] = min(
                table[i - 1][j] + 1, table[i][j - 1] + 1, table[i - 1][j - 1] + (a[i - 1] != b[j - 1])
            )
    return table[-1][-1]


# ----------------------------------------------------------------------------------------------------
# edit distance
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "distance"),
    [
        ("kitten", "sitting", 3),  # k->s, e->i, +g
        ("flaw", "lawn", 2),  # -f, +n
        ("", "abc", 3),
        ("abc", "", 3),
        ("abc", "abc", 0),
        ("abc", "cba", 2),
        ("intention", "execution", 5),
        (
            ["the", "cat", "sat"],
            ["the", "dog", "sat", "down"],
            2,
        ),  # word level: one substitution, one insertion
    ],
)
def test_edit_distance_hand_cases(a, b, distance):
    assert edit_distance(a, b) == distance
    assert edit_distance(b, a) == distance


def test_edit_distance_matches_the_textbook_table():
    rng = random.Random(0)
    for _ in range(200):
        a = "".join(rng.choice("abc") for _ in range(rng.randint(0, 9)))
        b = "".join(rng.choice("abc") for _ in range(rng.randint(0, 9)))
        assert edit_distance(a, b) == reference_levenshtein(a, b), (a, b)


def test_normalized_similarity():
    assert normalized_edit_similarity("kitten", "sitting") == pytest.approx(1 - 3 / 7)
    assert normalized_edit_similarity("", "") == 1.0


# ----------------------------------------------------------------------------------------------------
# OCR reward (ANLS)
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("Hello World", 1.0),
        ("  Hello   World ", 1.0),  # whitespace runs collapse
        ("Hello Wor1d", 1 - 1 / 11),
        ("Helo World", 1 - 1 / 11),
        ("hello world", 1 - 2 / 11),  # case counts by default
        ("Hxxxx World", 1 - 4 / 11),  # NL 4/11 < 0.5
        ("Hxxxxxxorld", 0.0),  # NL 6/11 >= 0.5: ANLS cuts it to 0
        ("zzzzz qqqqq", 0.0),  # same-length garbage
        ("", 0.0),
    ],
)
def test_ocr_reward(answer, expected):
    assert ocr_reward(tagged(answer), "Hello World", {}) == pytest.approx(expected)


def test_ocr_options():
    assert ocr_reward(tagged("hello world"), "Hello World", {"ignore_case": True}) == 1.0
    assert ocr_reward(tagged("hello world"), "Hello World", {}, ignore_case=True) == 1.0
    # the plain similarity without the ANLS cut
    assert ocr_reward(tagged("Hxxxxxxorld"), "Hello World", {}, threshold=1.0) == pytest.approx(1 - 6 / 11)
    assert ocr_reward(tagged("STOP"), ["STOP", "ST0P"], {}) == 1.0
    assert ocr_reward(tagged("ST0P"), "<answer>STOP</answer>", {}) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="non-empty"):
        ocr_reward(tagged("x"), "", {})


# ----------------------------------------------------------------------------------------------------
# preference
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "label"),
    [
        ("Image 1 is better", "1"),
        ("1", "1"),
        ("Image 2 is better than Image 1.", "2"),
        ("I prefer the second image: Image 2.", "2"),
        ("Answer 2", "2"),
        ("Image 1 or Image 2", None),  # both
        ("Both 1 and 2 are good", None),
        ("Image 1 is worse than Image 2", None),  # negative phrasing is not interpreted
        ("not 1", None),
        ("Image 12 is better", None),  # no such candidate
        ("the left one", None),
        ("Image 1.5", None),
    ],
)
def test_preferred_label(answer, label):
    assert preferred_label(answer) == label


@pytest.mark.parametrize(
    ("answer", "solution", "expected"),
    [
        ("Image 1 is better", "1", 1.0),
        ("Image 1 is better", 1, 1.0),
        ("Image 1 is better", "<answer>Image 1 is better</answer>", 1.0),
        ("Image 1 is better", "2", 0.0),
        ("Image 2 is better than Image 1", "2", 1.0),
        ("Image 2 is better than Image 1", "1", 0.0),
        ("Image 1 is worse than Image 2", "2", 0.0),  # right in meaning but not read: never misread either
        ("Image 1 is worse than Image 2", "1", 0.0),
        ("1 or 2", "1", 0.0),  # hedge
        ("1 or 2", "2", 0.0),
        ("", "1", 0.0),
    ],
)
def test_preference_reward(answer, solution, expected):
    assert preference_reward(tagged(answer), solution, {}) == expected


def test_preference_with_letter_labels():
    meta = {"choices": ["A", "B"]}
    assert preference_reward(tagged("Response B is better than Response A"), "B", meta) == 1.0
    assert preference_reward(tagged("B"), "A", meta) == 0.0
    assert preference_reward(tagged("a better one is A"), "A", meta) == 1.0  # the article "a" is no label
    with pytest.raises(ValueError, match="names none of the labels"):
        preference_reward(tagged("A"), "C", meta)
