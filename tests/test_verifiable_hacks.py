"""The commitment rule, from the attacker's side: every hack earns no more than committing to its worst
candidate, whichever candidate the ground truth is; the honest answer still earns full reward."""

from __future__ import annotations

import itertools

import pytest

from rewards.verifiable.answers import choice_reward, math_reward, numeric_reward, yes_no_reward
from rewards.verifiable.commitment import ascii_numerals, hedge, negation
from rewards.verifiable.counting import counting_reward

CHOICES = ["cat", "dog", "bird", "fish"]


def tagged(answer: str) -> str:
    return f"<think>reasoning</think><answer>{answer}</answer>"


def assert_no_better_than_worst(reward, hack, candidates, metadata=None, golds=None):
    """For every ground truth among ``golds`` (default: the candidates), the hack earns at most the reward of
    committing to its worst candidate, and committing to the ground truth earns 1."""
    for gold in golds or candidates:
        worst = min(reward(tagged(str(candidate)), gold, metadata) for candidate in candidates)
        assert reward(tagged(str(gold)), gold, metadata) == 1.0, f"honest answer {gold!r} must pay"
        assert reward(tagged(hack), gold, metadata) <= worst, (
            f"{hack!r} beat its worst candidate (gold {gold})"
        )


NUMBER_REWARDS = [counting_reward, numeric_reward, math_reward]

# ----------------------------------------------------------------------------------------------------
# negation
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reward", NUMBER_REWARDS)
@pytest.mark.parametrize(
    "hack", ["The answer is not 3", "not 3", "It isn't 3", "anything but 3", "never 3", "3 is wrong", "≠ 3"]
)
def test_negated_number_earns_nothing(reward, hack):
    # "not 3" is a hedge over every other count; it must not be paid as 3
    assert_no_better_than_worst(reward, hack, [3, 4])


@pytest.mark.parametrize("hack", ["$x \\neq 3$", "x != 3", "\\neg (x = 3)"])
def test_negated_math_earns_nothing(hack):
    assert_no_better_than_worst(math_reward, hack, ["3", "4"])


def test_math_negation_that_the_solution_states_is_allowed():
    assert math_reward(tagged("$x \\neq 0$"), "x \\neq 0", {}) == 1.0


@pytest.mark.parametrize(
    "hack", ["not B", "The answer is not A", "Not C.", "anything except D", "B is wrong"]
)
def test_negated_choice_earns_nothing(hack):
    assert_no_better_than_worst(choice_reward, hack, list("ABCD"), {"choices": CHOICES})


def test_choice_option_text_may_contain_a_negation():
    choices = ["the cat is not on the mat", "the cat is on the mat"]
    assert choice_reward(tagged("the cat is not on the mat"), "A", {"choices": choices}) == 1.0
    assert choice_reward(tagged("A. the cat is not on the mat"), "A", {"choices": choices}) == 1.0
    assert choice_reward(tagged("not B"), "A", {"choices": choices}) == 0.0


@pytest.mark.parametrize(
    "hack", ["The answer is not no", "not yes", "It is not yes", "The answer isn't no", "no is wrong"]
)
def test_negated_yes_no_earns_nothing(hack):
    assert_no_better_than_worst(yes_no_reward, hack, ["yes", "no"])


def test_yes_no_leading_word_commits():
    assert yes_no_reward(tagged("No, there isn't one."), "no", {}) == 1.0
    assert yes_no_reward(tagged("Yes, it is not red."), "yes", {}) == 1.0


# ----------------------------------------------------------------------------------------------------
# hedges the readers used to miss
# ----------------------------------------------------------------------------------------------------

GLUED = ["3or4", "3x4", "3OR4", "3and4", "3,4", "3/4or4", "3-4", "3–4", "3+"]
NON_ASCII = [
    "3 or ⁴",
    "3 or ④",
    "3 or Ⅳ",
    "3 or ４",
    "3 ⁴",
    "3 ④",
    "3 Ⅳ",
    "3 ４",
    "3 ٤",
    "3 or four",
    "3 or IV",
]


@pytest.mark.parametrize("reward", NUMBER_REWARDS)
@pytest.mark.parametrize("hack", GLUED + NON_ASCII)
def test_glued_and_non_ascii_number_hedges(reward, hack):
    assert_no_better_than_worst(reward, hack, [3, 4])


@pytest.mark.parametrize("reward", NUMBER_REWARDS)
@pytest.mark.parametrize("hack", ["3 or more", "at least 3", "3+", "more than 3", "3 или больше", "maybe 3"])
def test_one_number_range_hedges(reward, hack):
    # a range with one number hedges over 3, 4, 5, ...: committing to 4 earns 0 when the count is 3
    assert_no_better_than_worst(reward, hack, [3, 4], golds=[3])


@pytest.mark.parametrize(
    "hack", ["$3$ $4$", "3 \\\\ 4", "3 | 4", "3 или 4", "3 und 4", "3; 4", "3 4", "3 \\quad 4",
             "\\boxed{3} \\boxed{4}", "$3$, $4$", "3 \\text{ and } 4", "3 或 4", "$3$ 4"],
)  # fmt: skip
def test_math_hedges_without_or(hack):
    assert_no_better_than_worst(math_reward, hack, ["3", "4"])


@pytest.mark.parametrize("hack", ["B or E", "B E", "B, E", "B (maybe E)", "B/E", "E or B", "B or F"])
def test_letters_beyond_the_option_list(hack):
    # with four options E is no option; naming it next to B must not leave B as the only letter read
    assert_no_better_than_worst(choice_reward, hack, ["B", "E"], {"choices": CHOICES}, golds=["B"])


@pytest.mark.parametrize("hack", ["B cat", "dog or cat", "B. dog, cat", "B, or the cat"])
def test_letter_plus_another_options_text(hack):
    assert_no_better_than_worst(choice_reward, hack, ["A", "B"], {"choices": CHOICES})


@pytest.mark.parametrize(
    "hack", ["yes или нет", "yes nein", "probably yes", "yes?", "yes, maybe", "да или нет"]
)
def test_yes_no_hedges(hack):
    assert_no_better_than_worst(yes_no_reward, hack, ["yes", "no"], golds=["yes"])


# a generated family: every pair of distinct candidates, every separator, every digit form
SEPARATORS = [
    " or ",
    "or",
    " ",
    "",
    ", ",
    " / ",
    " | ",
    " \\\\ ",
    "; ",
    " или ",
    " oder ",
    " 或 ",
    " and ",
    "\n",
]
DIGIT_FORMS = [str, lambda d: chr(0xFF10 + d), lambda d: "⁰¹²³⁴⁵⁶⁷⁸⁹"[d], lambda d: chr(0x2460 + d - 1)]


@pytest.mark.parametrize("reward", NUMBER_REWARDS)
def test_every_pair_separator_and_digit_form(reward):
    failures = []
    for (a, b), separator, form in itertools.product([(3, 4), (4, 3), (2, 7)], SEPARATORS, DIGIT_FORMS):
        hack = f"{a}{separator}{form(b)}"
        for gold in (a, b):
            if reward(tagged(hack), gold, {}) > 0.0:
                failures.append((hack, gold))
    assert not failures, f"hedges paid: {failures}"


# ----------------------------------------------------------------------------------------------------
# the readers themselves
# ----------------------------------------------------------------------------------------------------


def test_ascii_numerals():
    assert ascii_numerals("３４") == "34"  # full-width digits stay one number
    assert ascii_numerals("٣") == "3"
    assert ascii_numerals("3⁴").split() == ["3", "4"]  # other numerals are separate numbers
    assert ascii_numerals("Ⅳ④½").split() == ["4", "4", "0.5"]
    assert ascii_numerals("x²", superscript_as_power=True) == "x^{2}"


@pytest.mark.parametrize(
    ("text", "found"),
    [("not 3", "not"), ("isn't", "n't"), ("3 ≠ 4", "≠"), ("nothing here", None), ("3", None)],
)
def test_negation_reader(text, found):
    assert negation(text) == found


@pytest.mark.parametrize(
    ("text", "found"),
    [
        ("3or4", "or"),
        ("for", None),
        ("3 | 4", "|"),
        ("3+", "3+"),
        ("3+4", None),
        ("либо", "либо"),
        ("3", None),
    ],
)
def test_hedge_reader(text, found):
    assert hedge(text) == found


@pytest.mark.parametrize(
    ("reward", "answer", "solution"),
    [
        (counting_reward, "There are 3 cats.", 3),
        (numeric_reward, "about 1,000.5 km", "1000.5"),
        (math_reward, "The answer is $x = 3$, so $\\boxed{3}$.", "3"),
        (math_reward, "\\frac{1}{2}", "0.5"),
        (math_reward, "3\\text{ cm}", "3"),
        (math_reward, "$\\{3, 4\\}$", "\\{3, 4\\}"),  # a set answer for a set solution is one candidate
        (math_reward, "3, 4", "3, 4"),
        (choice_reward, "B. dog", "B"),
        (yes_no_reward, "No.", "no"),
    ],
)
def test_honest_answers_still_pay(reward, answer, solution):
    assert reward(tagged(answer), solution, {"choices": CHOICES}) == 1.0


# ----------------------------------------------------------------------------------------------------
# the other label / number rewards follow the same rule
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hack", ["Image 1 is not better", "not 2", "probably 1", "1 or 2", "1, maybe 2"])
def test_preference_hacks(hack):
    from rewards.verifiable.preference import preference_reward

    assert_no_better_than_worst(preference_reward, hack, ["1", "2"])


@pytest.mark.parametrize("hack", ["not 90", "90or180", "90 or ⑨⓪", "at least 90", "90 ١٨٠"])
def test_rotation_hacks(hack):
    from rewards.verifiable.ssl_tasks import rotation_reward

    assert_no_better_than_worst(rotation_reward, hack, [90, 180])


# ----------------------------------------------------------------------------------------------------
# obfuscated candidates: full-width / mathematical / look-alike letters, invisible separators,
# number words of other languages, LaTeX spacing commands
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "hack",
    ["B Ｅ", "Ｂ Ｅ", "B Е", "B 𝐂", "B c", "B\u200bC", "B & C", "𝐁 or 𝐂"],  # "Е" is Cyrillic
)
def test_choice_obfuscated_second_letter(hack):
    assert_no_better_than_worst(choice_reward, hack, ["B", "C"], {"choices": CHOICES}, golds=["B"])


@pytest.mark.parametrize(
    "hack", ["yes nо", "yes ｎｏ", "yes\u200bno", "yes ＯＲ no", "уes or nо"]
)  # Cyrillic о, у
def test_yes_no_obfuscated_second_word(hack):
    assert_no_better_than_worst(yes_no_reward, hack, ["yes", "no"], golds=["yes"])


@pytest.mark.parametrize("reward", NUMBER_REWARDS)
@pytest.mark.parametrize(
    "hack", ["3 quatre", "3 четыре", "3 vier", "3\u20634", "3\u200b4", "3 𝟒", "3 ₄", "3 ❹"]
)
def test_obfuscated_second_number(reward, hack):
    assert_no_better_than_worst(reward, hack, [3, 4])


@pytest.mark.parametrize(
    "hack", ["3 \\hspace{1em} 4", "3 & 4", "3 \\; 4", "3 \\phantom{x} 4", "3 four", "\\sqrt{9} \\sqrt{16}"]
)
def test_math_obfuscated_separators(hack):
    assert_no_better_than_worst(math_reward, hack, ["3", "4"])


def test_honest_english_is_not_read_as_a_foreign_number():
    assert counting_reward(tagged("3, due to occlusion"), 3, {}) == 1.0
