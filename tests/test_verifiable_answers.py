"""Exact / choice / yes-no / numeric / math / counting rewards: hand cases and the known hacks."""

from __future__ import annotations

import threading

import pytest

from rewards.verifiable.answers import (
    choice_reward,
    exact_reward,
    math_reward,
    numeric_reward,
    parse_numbers,
    single_number,
    yes_no_reward,
)
from rewards.verifiable.counting import counting_reward


def tagged(answer: str) -> str:
    return f"<think>reasoning</think><answer>{answer}</answer>"


# ----------------------------------------------------------------------------------------------------
# exact
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("answer", ["Paris", "paris.", "  PARIS  ", '"Paris"'])
def test_exact_normalises_case_spacing_and_edge_punctuation(answer):
    assert exact_reward(tagged(answer), "<answer>Paris</answer>", {}) == 1.0


@pytest.mark.parametrize("answer", ["", "Paris, France", "Pari", "London"])
def test_exact_rejects(answer):
    assert exact_reward(tagged(answer), "Paris", {}) == 0.0


def test_exact_accepts_any_of_a_list():
    assert exact_reward(tagged("two"), ["2", "two"], {}) == 1.0
    assert exact_reward(tagged("three"), ["2", "two"], {}) == 0.0


# ----------------------------------------------------------------------------------------------------
# multiple choice
# ----------------------------------------------------------------------------------------------------

CHOICES = ["cat", "dog", "bird", "fish"]


@pytest.mark.parametrize(
    "answer",
    ["B", "b", "(B)", "B.", "B. dog", "(B) dog", "The answer is B", "I think it is B", "dog", "a dog"],
)
def test_choice_reads_the_picked_option(answer):
    assert choice_reward(tagged(answer), "B", {"choices": CHOICES}) == 1.0


@pytest.mark.parametrize("solution", ["B", "(B)", "<answer>B</answer>", "B. dog", "dog"])
def test_choice_solution_forms(solution):
    assert choice_reward(tagged("B"), solution, {"choices": CHOICES}) == 1.0
    assert choice_reward(tagged("C"), solution, {"choices": CHOICES}) == 0.0


@pytest.mark.parametrize(
    "answer",
    [
        "",  # empty
        "A B C D",  # every option
        "A, B, C or D",
        "A/B/C/D",
        "B or C",
        "(A) (B) (C) (D)",
        "ABCD",  # not a letter at all
        "cat dog bird fish",  # every option text
        "C",  # plainly wrong
        "E",  # not an option: no letter is read, and "E" is no option text
    ],
)
def test_choice_hacks_and_wrong_answers_get_nothing(answer):
    assert choice_reward(tagged(answer), "B", {"choices": CHOICES}) == 0.0


def test_choice_without_choices_uses_letters_a_to_d():
    assert choice_reward(tagged("I pick B"), "B", {}) == 1.0  # "I" is no option among A..D
    assert choice_reward(tagged("A B C D"), "B", {}) == 0.0
    assert choice_reward(tagged("F"), "F", {}) == 1.0  # the solution letter extends the range


def test_choice_solution_outside_the_options_is_a_data_error():
    with pytest.raises(ValueError, match="not among the 4 options"):
        choice_reward(tagged("E"), "E", {"choices": CHOICES})


def test_choice_with_prefixed_option_texts():
    choices = ["A. cat", "B. dog"]
    assert choice_reward(tagged("dog"), "B", {"choices": choices}) == 1.0
    assert choice_reward(tagged("cat"), "B", {"choices": choices}) == 0.0


# ----------------------------------------------------------------------------------------------------
# yes / no
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "solution", "expected"),
    [
        ("Yes", "yes", 1.0),
        ("yes.", "<answer>Yes</answer>", 1.0),
        ("Yes, there is a cat.", "yes", 1.0),
        ("No, there is none.", "no", 1.0),
        ("no", True, 0.0),
        ("yes", True, 1.0),
        ("No", "yes", 0.0),
        ("yes or no", "yes", 0.0),  # hedging
        ("yes or no", "no", 0.0),
        ("Yes/No", "no", 0.0),
        ("", "yes", 0.0),
        ("maybe", "no", 0.0),
        ("nobody knows", "no", 0.0),  # "no" must be a whole word
        ("True", "yes", 1.0),
        ("false", "no", 1.0),
        ("It is not true", "yes", 0.0),  # "true" counts only as the whole answer
    ],
)
def test_yes_no(answer, solution, expected):
    assert yes_no_reward(tagged(answer), solution, {}) == expected


def test_yes_no_rejects_unreadable_solution():
    with pytest.raises(ValueError, match="yes or no"):
        yes_no_reward(tagged("yes"), "perhaps", {})


# ----------------------------------------------------------------------------------------------------
# numbers
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "values"),
    [
        ("1,234", [1234.0]),
        ("3.5", [3.5]),
        ("-2", [-2.0]),
        ("\u22122", [-2.0]),  # unicode minus
        ("1e3", [1000.0]),
        (".5", [0.5]),
        ("3/4", [0.75]),
        ("50%", [50.0]),
        ("1,234,567.5 m", [1234567.5]),
        ("1, 2, 3", [1.0, 2.0, 3.0]),
        ("1,2", [1.0, 2.0]),  # not a thousands group
        ("three", [3.0]),
        ("3 and three", [3.0, 3.0]),  # number words count beside digits ("3 or four" is two numbers)
        ("x2 v1.2", [2.0, 1.2]),  # numbers glued to letters count ("3or4" is two numbers)
        ("1.2.5", [1.2, 5.0]),  # a dotted version is two numbers
        ("IV", [4.0]),  # upper-case Roman numerals of two or more letters
        ("I have 3", [3.0]),  # a lone "I" is the pronoun
        ("", []),
    ],
)
def test_parse_numbers(text, values):
    assert parse_numbers(text) == values


def test_single_number():
    assert single_number("3 cats, so 3") == 3.0
    assert single_number("3 or 4") is None
    assert single_number("none") is None


@pytest.mark.parametrize(
    ("answer", "solution"),
    [
        ("1,234", "1234"),
        ("3.5", 3.5),
        ("-2", "-2"),
        ("1e3", "1000"),
        ("about 1,000.5 km", "1000.5"),
        ("3/4", 0.75),
    ],
)
def test_numeric_matches(answer, solution):
    assert numeric_reward(tagged(answer), solution, {}) == 1.0


def test_numeric_tolerance():
    # default: |a - g| <= max(1e-6, 0.01 |g|)
    assert numeric_reward(tagged("100.9"), 100, {}) == 1.0
    assert numeric_reward(tagged("101.5"), 100, {}) == 0.0
    assert numeric_reward(tagged("0.0000001"), 0, {}) == 1.0
    assert numeric_reward(tagged("0.001"), 0, {}) == 0.0
    assert numeric_reward(tagged("104"), 100, {"rel_tol": 0.05}) == 1.0
    assert numeric_reward(tagged("104"), 100, {}, rel_tol=0.05) == 1.0
    assert numeric_reward(tagged("100.5"), 100, {}, rel_tol=0.0, abs_tol=0.1) == 0.0


@pytest.mark.parametrize("answer", ["", "3 or 4", "between 2 and 5", "1 2 3 4 5", "no idea"])
def test_numeric_hacks(answer):
    assert numeric_reward(tagged(answer), "3", {}) == 0.0


def test_numeric_rejects_unreadable_solution():
    with pytest.raises(ValueError, match="exactly one number"):
        numeric_reward(tagged("3"), "three or four", {})


# ----------------------------------------------------------------------------------------------------
# math (math-verify)
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "solution"),
    [
        ("\\frac{1}{2}", "0.5"),
        ("0.5", "\\frac{1}{2}"),
        ("$\\frac{1}{2}$", "1/2"),
        ("\\boxed{\\sqrt{2}}", "\\sqrt{2}"),
        ("1+x^2", "x^2+1"),
        ("x = 3", "3"),
        ("The answer is $3$.", "<answer>3</answer>"),
    ],
)
def test_math_equivalences(answer, solution):
    assert math_reward(tagged(answer), solution, {}) == 1.0


@pytest.mark.parametrize(
    "answer",
    [
        "",
        "4",
        "3 or 4",  # would read as one value without the hedge guard
        "The answer is 3 or 4",
        "either 3 or 4",
        "\\boxed{3} \\boxed{4}",
        "$3$ or $4$",
        "}{\\frac{",  # garbage: 0, not an exception
        "x" * 3000,  # over the length cap
    ],
)
def test_math_rejects(answer):
    assert math_reward(tagged(answer), "3", {}) == 0.0


def test_math_runs_off_the_main_thread():
    results = []

    def work():
        results.append(math_reward(tagged("\\frac{2}{4}"), "0.5", {}))
        results.append(math_reward(tagged("7"), "0.5", {}))

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(timeout=30)
    assert results == [1.0, 0.0]


def test_math_rejects_unreadable_solution():
    with pytest.raises(ValueError, match="cannot parse"):
        math_reward(tagged("3"), "", {})


# ----------------------------------------------------------------------------------------------------
# counting
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "solution", "expected"),
    [
        ("3", 3, 1.0),
        ("3", "<answer>3</answer>", 1.0),
        ("There are 3 cats. So the answer is 3.", "3", 1.0),
        ("three", 3, 1.0),
        ("none", 0, 1.0),
        ("0", [], 1.0),
        ("2", [[0, 0, 1, 1], [2, 2, 3, 3]], 1.0),  # a list of objects counts by its length
        ("4", 3, 0.0),
        ("3.5", 3, 0.0),
        ("2.9", 3, 0.0),  # no rounding
        ("3 or 4", 3, 0.0),  # several numbers
        ("1 2 3 4 5", 3, 0.0),
        ("2, 3", 3, 0.0),
        ("", 3, 0.0),
        ("many", 3, 0.0),
    ],
)
def test_counting(answer, solution, expected):
    assert counting_reward(tagged(answer), solution, {}) == expected


def test_counting_rejects_non_integer_solution():
    with pytest.raises(ValueError, match="non-negative integer"):
        counting_reward(tagged("3"), "2.5", {})
