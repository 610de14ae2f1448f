"""Answer rewards: exact string, multiple choice, yes/no, numeric (with tolerance) and math (math-verify).

Every reward reads the answer with :func:`rewards.verifiable.format.answer_text` (the last ``<answer>``
block, or the completion without its reasoning when there is no tag) and unwraps a ground truth given as
``"<answer>...</answer>"``. An empty answer scores 0 everywhere. A ground truth that cannot be read (no
number in a numeric solution, say) raises ``ValueError``: that is a data bug, not a bad completion.

Anti-hedging rule shared by the choice, yes/no, numeric and counting rewards: an answer that names more than
one candidate ("A B C D", "A, B, C or D", "yes or no", "3 or 4") scores 0, whatever the ground truth.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from rewards.verifiable.format import answer_text, extract_solution

__all__ = [
    "normalize_text",
    "parse_numbers",
    "single_number",
    "mentioned_labels",
    "choice_letter",
    "exact_reward",
    "choice_reward",
    "yes_no_reward",
    "numeric_reward",
    "math_reward",
    "DEFAULT_REL_TOL",
    "DEFAULT_ABS_TOL",
]

DEFAULT_REL_TOL = 1e-2
DEFAULT_ABS_TOL = 1e-6

_EDGE_PUNCTUATION = " \t\n\r.,;:!?\"'`“”‘’()[]{}"


def normalize_text(text: Any) -> str:
    """Casefold, collapse whitespace and strip quotes, brackets and sentence punctuation from both ends."""
    text = " ".join(str(text).split()).casefold()
    return text.strip(_EDGE_PUNCTUATION)


# ---------------------------------------------------------------------------------------------------------
# numbers
# ---------------------------------------------------------------------------------------------------------

_NUMBER = r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+(?:[eE][-+]?\d+)?"
# a number must not continue a word or a decimal (``x2``, ``v1.2``): the look-behind rejects those
_NUMBER_TOKEN = re.compile(
    rf"(?<![A-Za-z_.\d])(?:(?P<num>{_NUMBER})\s*/\s*(?P<den>{_NUMBER})|(?P<single>{_NUMBER}))"
)
_NUMBER_WORDS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
    "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15,
    "sixteen": 16, "seventeen": 17, "eighteen": 18, "nineteen": 19, "twenty": 20, "thirty": 30, "forty": 40,
    "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90, "hundred": 100,
}  # fmt: skip
_NUMBER_WORD = re.compile(r"\b(" + "|".join(_NUMBER_WORDS) + r")\b", re.IGNORECASE)


def _to_float(token: str) -> float:
    return float(token.replace(",", ""))


def parse_numbers(text: Any) -> list[float]:
    """All numbers in ``text``, in order.

    Understands ``"1,234"`` (thousands separators: groups of exactly three digits), ``"3.5"``, ``"-2"``,
    ``"1e3"``, ``".5"``, fractions ``"3/4"`` (one number, 0.75) and the unicode minus; ``"50%"`` reads 50.
    Number words (``"three"``, ``"twenty"``) are read only when the text has no digits at all.
    """
    if isinstance(text, bool):
        return [float(text)]
    if isinstance(text, int | float):
        return [float(text)]
    text = str(text).replace("\u2212", "-")
    values = []
    for match in _NUMBER_TOKEN.finditer(text):
        if match.group("single") is not None:
            values.append(_to_float(match.group("single")))
            continue
        denominator = _to_float(match.group("den"))
        if denominator == 0:
            values.extend([_to_float(match.group("num")), denominator])  # "1/0" is two numbers, not inf
        else:
            values.append(_to_float(match.group("num")) / denominator)
    if not values and not re.search(r"\d", text):
        values = [float(_NUMBER_WORDS[word.lower()]) for word in _NUMBER_WORD.findall(text)]
    return [value for value in values if math.isfinite(value)]


def single_number(text: Any) -> float | None:
    """The one number ``text`` states, or ``None`` when it states none or several distinct values.

    Repeating the same value ("3 cats, so 3") is one number; "3 or 4" is two and gives ``None``.
    """
    distinct = set(parse_numbers(text))
    return distinct.pop() if len(distinct) == 1 else None


def _close(value: float, target: float, rel_tol: float, abs_tol: float) -> bool:
    return abs(value - target) <= max(abs_tol, rel_tol * abs(target))


# ---------------------------------------------------------------------------------------------------------
# labels (choice letters, preference candidates)
# ---------------------------------------------------------------------------------------------------------


def _label_pattern(label: str) -> re.Pattern[str]:
    escaped = re.escape(label.strip())
    flags = 0 if len(label.strip()) == 1 and label.strip().isalpha() else re.IGNORECASE
    # a label is a whole token: not inside a word, and a number label not inside a longer number ("1" in "1.5")
    return re.compile(rf"(?<![A-Za-z0-9_]){escaped}(?![A-Za-z0-9_]|\.\d)", flags)


def mentioned_labels(text: str, labels: Sequence[str]) -> list[str]:
    """The labels of ``labels`` that occur in ``text`` as whole tokens, in ``labels`` order.

    Single-letter labels are case-sensitive (so the article "a" is not option "A"); longer labels are not.
    """
    return [label for label in labels if _label_pattern(label).search(text)]


def _letters(count: int) -> list[str]:
    return [chr(ord("A") + index) for index in range(max(0, min(count, 26)))]


_OPTION_PREFIX = re.compile(r"^\s*\(?([A-Za-z])\s*[).:]\s+")


def _strip_option_prefix(choice: str) -> str:
    return _OPTION_PREFIX.sub("", str(choice), count=1)


def choice_letter(text: str, letters: Sequence[str], choices: Sequence[str] | None = None) -> str | None:
    """Read which single option ``text`` picks, or ``None`` if it picks none or more than one.

    1. A lone letter (``"b"``, ``"(B)"``, ``"B."``) is that option, whatever its case.
    2. Otherwise the upper-case option letters standing alone in the text are collected ("B", "(B) dog",
       "The answer is B"); exactly one distinct letter is the pick, several ("A B C D", "A, B, C or D") none.
    3. With no letter and the option texts given, an answer equal to one option's text picks it; failing
       that, an answer containing exactly one option text (as whole words) picks it.
    """
    stripped = text.strip(_EDGE_PUNCTUATION)
    if len(stripped) == 1 and stripped.upper() in letters:
        return stripped.upper()
    found = mentioned_labels(text, letters)
    if found:
        return found[0] if len(found) == 1 else None
    if not choices:
        return None
    options = [normalize_text(_strip_option_prefix(choice)) for choice in choices]
    answer = normalize_text(text)
    exact = [letter for letter, option in zip(letters, options, strict=False) if option and option == answer]
    if len(exact) == 1:
        return exact[0]
    contained = [
        letter
        for letter, option in zip(letters, options, strict=False)
        if option and re.search(rf"(?<!\w){re.escape(option)}(?!\w)", answer)
    ]
    return contained[0] if len(contained) == 1 else None


# ---------------------------------------------------------------------------------------------------------
# rewards
# ---------------------------------------------------------------------------------------------------------


def _as_list(solution: Any) -> list[Any]:
    if isinstance(solution, list | tuple):
        return [extract_solution(item) for item in solution]
    return [extract_solution(solution)]


def exact_reward(completion: str, solution: Any, metadata: Mapping[str, Any] | None = None) -> float:
    """1.0 if the answer equals the solution after :func:`normalize_text` (case, spacing, edge punctuation).

    ``solution`` may be a list of acceptable answers (any one pays).
    """
    answer = normalize_text(answer_text(completion, metadata))
    if not answer:
        return 0.0
    return 1.0 if any(answer == normalize_text(gold) for gold in _as_list(solution)) else 0.0


def _gold_letter(solution: Any, choices: Sequence[str] | None) -> str | None:
    gold = str(extract_solution(solution)).strip()
    stripped = gold.strip(_EDGE_PUNCTUATION)
    if len(stripped) == 1 and stripped.isalpha():
        return stripped.upper()
    prefixed = _OPTION_PREFIX.match(gold + " ")
    if prefixed:
        return prefixed.group(1).upper()
    if choices:
        options = [normalize_text(_strip_option_prefix(choice)) for choice in choices]
        if normalize_text(gold) in options:
            return _letters(len(options))[options.index(normalize_text(gold))]
    return None


def choice_reward(completion: str, solution: Any, metadata: Mapping[str, Any] | None = None) -> float:
    """Multiple choice: 1.0 if the answer picks exactly the solution's option, else 0.

    ``solution``: a letter (``"B"``, ``"(B)"``, ``"B. dog"``) or, with ``metadata["choices"]``, an option's
    text. ``metadata["choices"]``: the option texts in letter order (``["cat", "dog", ...]`` or
    ``["A. cat", "B. dog", ...]``); it fixes which letters exist (A.. for its length) and lets a bare option
    text answer. Without it the letters A..max(D, solution letter) are options. The answer is read by
    :func:`choice_letter`: naming several options scores 0. A solution that is no option letter is compared
    as text, as :func:`exact_reward`.
    """
    metadata = metadata or {}
    choices = metadata.get("choices")
    answer = answer_text(completion, metadata)
    if not answer.strip(_EDGE_PUNCTUATION):
        return 0.0
    gold = _gold_letter(solution, choices)
    if gold is None:
        return exact_reward(completion, solution, metadata)
    if choices and ord(gold) - ord("A") >= len(choices):
        raise ValueError(
            f"choice solution {solution!r} is not among the {len(choices)} options {list(choices)}"
        )
    count = len(choices) if choices else max(4, ord(gold) - ord("A") + 1)
    return 1.0 if choice_letter(answer, _letters(count), choices) == gold else 0.0


_YES_WORDS = {"yes"}
_NO_WORDS = {"no"}
_BARE_BOOLEANS = {"true": "yes", "false": "no"}


def _polarity(text: str) -> str | None:
    bare = _BARE_BOOLEANS.get(normalize_text(text))
    if bare is not None:
        return bare
    words = set(re.findall(r"[a-z]+", str(text).casefold()))
    said_yes, said_no = bool(words & _YES_WORDS), bool(words & _NO_WORDS)
    if said_yes == said_no:
        return None
    return "yes" if said_yes else "no"


def yes_no_reward(completion: str, solution: Any, metadata: Mapping[str, Any] | None = None) -> float:
    """1.0 if the answer says exactly one of yes / no and it is the solution's.

    "yes" / "no" count as whole words in any case ("Yes, there is a cat." is yes); "true" / "false" only as
    the whole answer (so "not true" is not read as yes). An answer with both ("yes or no") or neither
    scores 0. ``solution``: "yes" / "no" / "true" / "false" (any case, optionally tagged) or a bool.
    """
    gold_value = extract_solution(solution)
    gold = ("yes" if gold_value else "no") if isinstance(gold_value, bool) else _polarity(gold_value)
    if gold is None:
        raise ValueError(f"yes/no solution must say yes or no, got {solution!r}")
    return 1.0 if _polarity(answer_text(completion, metadata)) == gold else 0.0


def numeric_reward(
    completion: str,
    solution: Any,
    metadata: Mapping[str, Any] | None = None,
    *,
    rel_tol: float | None = None,
    abs_tol: float | None = None,
) -> float:
    """1.0 if the answer states one number within tolerance of the solution: ``|a - g| <= max(abs_tol, rel_tol |g|)``.

    Defaults ``rel_tol = 1e-2`` (1 %), ``abs_tol = 1e-6``; ``metadata["rel_tol"]`` / ``metadata["abs_tol"]``
    override them per sample, keyword arguments override both (ChartQA's relaxed accuracy is rel_tol 0.05).
    Numbers are read by :func:`parse_numbers`; an answer with several distinct numbers scores 0.
    """
    metadata = metadata or {}
    rel_tol = rel_tol if rel_tol is not None else float(metadata.get("rel_tol", DEFAULT_REL_TOL))
    abs_tol = abs_tol if abs_tol is not None else float(metadata.get("abs_tol", DEFAULT_ABS_TOL))
    gold = single_number(extract_solution(solution))
    if gold is None:
        raise ValueError(f"numeric solution must state exactly one number, got {solution!r}")
    value = single_number(answer_text(completion, metadata))
    return 1.0 if value is not None and _close(value, gold, rel_tol, abs_tol) else 0.0


_LATEX_DELIMITERS = ("$", "\\(", "\\[", "\\boxed")
_HEDGE = re.compile(r"\bor\b|\beither\b|\\lor\b|\\vee\b", re.IGNORECASE)
MATH_MAX_ANSWER_CHARS = 2000


def _math_parse(text: str, timeout: int | None):
    from math_verify import parse

    if not any(delimiter in text for delimiter in _LATEX_DELIMITERS):
        text = f"${text}$"  # a bare final answer is one LaTeX expression: "3 or 4" then reads {3, 4}, not 4
    return parse(text, parsing_timeout=timeout)


def _timeout_seconds(requested: int) -> int | None:
    # math-verify times out with signal.alarm, which exists only on the main thread; elsewhere run without
    return requested if threading.current_thread() is threading.main_thread() else None


def math_reward(
    completion: str, solution: Any, metadata: Mapping[str, Any] | None = None, *, timeout: int = 5
) -> float:
    """1.0 if math-verify finds the answer mathematically equal to the solution (``verify(parse(g), parse(a))``).

    A bare answer or solution (no ``$``, ``\\(``, ``\\[`` or ``\\boxed``) is parsed as one LaTeX expression.
    Hedged answers (containing "or", "either", ``\\lor``, ``\\vee``) score 0 -- math-verify would otherwise
    pick one alternative of "The answer is 3 or 4" -- so several solutions must be given as a set or list.
    Answers over 2000 characters score 0. Any parse or verification error scores 0. On the main thread
    parsing and each comparison time out after ``timeout`` seconds (math-verify's ``signal.alarm``); on other
    threads that mechanism is unavailable and math-verify runs without a timeout.
    Needs ``math-verify`` (``pip install math-verify`` or the ``vlm`` extra).
    """
    try:
        from math_verify import verify
    except ImportError as error:
        raise ImportError(
            "the 'math' reward needs math-verify: pip install math-verify (or gen-rl[vlm])"
        ) from error
    answer = answer_text(completion, metadata)
    if not answer or len(answer) > MATH_MAX_ANSWER_CHARS or _HEDGE.search(answer):
        return 0.0
    seconds = _timeout_seconds(timeout)
    try:
        gold = _math_parse(str(extract_solution(solution)), seconds)
    except Exception:  # a reward must not crash training; an unreadable solution is reported below
        gold = []
    if not gold:
        raise ValueError(f"math-verify cannot parse the math solution {solution!r}")
    try:
        predicted = _math_parse(answer, seconds)
        return 1.0 if predicted and verify(gold, predicted, timeout_seconds=seconds) else 0.0
    except Exception:  # a parse error or timeout on an odd completion scores 0, it does not stop training
        return 0.0
