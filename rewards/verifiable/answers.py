"""Answer rewards: exact string, multiple choice, yes/no, numeric (with tolerance) and math (math-verify).

Every reward reads the answer with :func:`rewards.verifiable.format.answer_text` (the last ``<answer>``
block, or the completion without its reasoning when there is no tag) and unwraps a ground truth given as
``"<answer>...</answer>"``. An empty answer scores 0 everywhere. A ground truth that cannot be read (no
number in a numeric solution, say) raises ``ValueError``: that is a data bug, not a bad completion.

Every reward here follows the commitment rule of :mod:`rewards.verifiable.commitment`: an answer that lists,
negates or hedges between candidates ("A B C D", "B or E", "yes or no", "3or4", "3 or ④", "not 3",
``$3$ $4$``) scores 0, which is no more than committing to its worst candidate.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from rewards.verifiable.commitment import hedge, latin_skeleton, negation, reading_form, uncommitted
from rewards.verifiable.format import answer_text, extract_solution

__all__ = [
    "normalize_text",
    "parse_numbers",
    "single_number",
    "mentioned_labels",
    "choice_letter",
    "committed_number",
    "math_candidates",
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
# a number may touch letters ("3or4", "3x4" are two numbers: a candidate the reader misses is a hedge that
# pays); "1.2.5" reads 1.2 and .5, "3..4" 3 and 4
_NUMBER_TOKEN = re.compile(rf"(?<!\d)(?:(?P<num>{_NUMBER})\s*/\s*(?P<den>{_NUMBER})|(?P<single>{_NUMBER}))")
_NUMBER_WORDS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
    "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15,
    "sixteen": 16, "seventeen": 17, "eighteen": 18, "nineteen": 19, "twenty": 20, "thirty": 30, "forty": 40,
    "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90, "hundred": 100,
}  # fmt: skip
# the same candidates in a few other languages: "3 quatre" names two numbers
_NUMBER_WORDS |= {
    "null": 0, "eins": 1, "zwei": 2, "drei": 3, "vier": 4, "fünf": 5, "sechs": 6, "sieben": 7, "acht": 8,
    "neun": 9, "zehn": 10, "zéro": 0, "un": 1, "une": 1, "deux": 2, "trois": 3, "quatre": 4, "cinq": 5,
    "sept": 7, "huit": 8, "neuf": 9, "dix": 10, "cero": 0, "uno": 1, "una": 1, "dos": 2, "tres": 3,
    "cuatro": 4, "cinco": 5, "seis": 6, "siete": 7, "ocho": 8, "nueve": 9, "diez": 10, "tre": 3,
    "quattro": 4, "cinque": 5, "sei": 6, "sette": 7, "otto": 8, "nove": 9, "dieci": 10, "ноль": 0,
    "один": 1, "одна": 1, "два": 2, "две": 2, "три": 3, "четыре": 4, "пять": 5, "шесть": 6, "семь": 7,
    "восемь": 8, "девять": 9, "десять": 10,
}  # fmt: skip
_NUMBER_WORD = re.compile(r"(?<![^\W\d_])(" + "|".join(_NUMBER_WORDS) + r")(?![^\W\d_])", re.IGNORECASE)
# upper-case Roman numerals of two or more letters ("IV", "XII"); a lone "I" is the pronoun
_ROMAN = re.compile(r"\b(?=[MDCLXVI]{2,}\b)M{0,3}(?:CM|CD|D?C{0,3})(?:XC|XL|L?X{0,3})(?:IX|IV|V?I{0,3})\b")
_ROMAN_VALUES = {"M": 1000, "D": 500, "C": 100, "L": 50, "X": 10, "V": 5, "I": 1}


def _roman_value(numeral: str) -> int:
    values = [_ROMAN_VALUES[char] for char in numeral]
    return sum(-v if i + 1 < len(values) and v < values[i + 1] else v for i, v in enumerate(values))


def _to_float(token: str) -> float:
    return float(token.replace(",", ""))


def parse_numbers(text: Any) -> list[float]:
    """All numbers in ``text``, in order of appearance.

    Understands ``"1,234"`` (thousands separators: groups of exactly three digits), ``"3.5"``, ``"-2"``,
    ``"1e3"``, ``".5"``, fractions ``"3/4"`` (one number, 0.75) and the unicode minus; ``"50%"`` reads 50.
    Reads every candidate an answer could be paid for: numbers glued to letters (``"3or4"`` is 3 and 4),
    numerals of every script (:func:`rewards.verifiable.commitment.reading_form`: ``"３"``, ``"⁴"``,
    ``"④"``, ``"Ⅳ"``, ``"𝟒"``), number words in English and a few other languages (``"three"``,
    ``"quatre"``, ``"четыре"``) and upper-case Roman numerals of two or more letters (``"IV"``).
    """
    if isinstance(text, bool):
        return [float(text)]
    if isinstance(text, int | float):
        return [float(text)]
    text = reading_form(text)
    found: list[tuple[int, float]] = []
    for match in _NUMBER_TOKEN.finditer(text):
        if match.group("single") is not None:
            found.append((match.start(), _to_float(match.group("single"))))
            continue
        denominator = _to_float(match.group("den"))
        if denominator == 0:  # "1/0" is two numbers, not inf
            found.extend([(match.start(), _to_float(match.group("num"))), (match.end(), denominator)])
        else:
            found.append((match.start(), _to_float(match.group("num")) / denominator))
    found += [(m.start(), float(_NUMBER_WORDS[m.group(1).lower()])) for m in _NUMBER_WORD.finditer(text)]
    found += [(m.start(), float(_roman_value(m.group(0)))) for m in _ROMAN.finditer(text)]
    return [value for _, value in sorted(found, key=lambda item: item[0]) if math.isfinite(value)]


def single_number(text: Any) -> float | None:
    """The one number ``text`` states, or ``None`` when it states none or several distinct values.

    Repeating the same value ("3 cats, so 3") is one number; "3 or 4" is two and gives ``None``.
    """
    distinct = set(parse_numbers(text))
    return distinct.pop() if len(distinct) == 1 else None


def committed_number(text: Any, allowed: Sequence[str] = ()) -> float | None:
    """The one number ``text`` commits to, or ``None`` when it states none or several, negates or hedges
    (:func:`rewards.verifiable.commitment.uncommitted`; ``allowed``: phrases exempt from that check)."""
    if uncommitted(str(text), allowed):
        return None
    return single_number(text)


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


_SINGLE_LETTER = re.compile(r"(?<![^\W_])([^\W\d_])(?![^\W_])")


def _named_letters(text: str, count: int) -> list[str]:
    """Every single letter standing alone in ``text`` that could name an option, in or beyond the ``count``
    options ("B or E" names B and E): capitals of any script (a Cyrillic "Е" is a letter too, and no
    option), and lower-case option letters other than "a" (the article). "I" / "i" only when there are more
    than 8 options (otherwise the pronoun)."""
    named: list[str] = []
    in_range = {chr(ord("a") + index) for index in range(min(count, 26))} - {"a"}
    for match in _SINGLE_LETTER.finditer(latin_skeleton(text)):
        letter = match.group(1)
        if letter.upper() == "I" and count <= 8:
            continue
        if letter.isupper() or letter in in_range:
            letter = letter.upper()
            if letter not in named:
                named.append(letter)
    return named


def _blank_phrases(text: str, phrases: Sequence[str]) -> str:
    """``text`` with each phrase of two or more characters blanked out as whole words (case-insensitive)."""
    for phrase in sorted(phrases, key=len, reverse=True):
        if len(phrase) >= 2:
            text = re.sub(rf"(?<!\w){re.escape(phrase)}(?!\w)", " ", text, flags=re.IGNORECASE)
    return text


def _options_named(answer: str, letters: Sequence[str], options: Sequence[str]) -> list[str]:
    """The letters whose option text occurs in the normalised ``answer`` as whole words."""
    return [
        letter
        for letter, option in zip(letters, options, strict=False)
        if option and re.search(rf"(?<!\w){re.escape(option)}(?!\w)", answer)
    ]


def choice_letter(text: str, letters: Sequence[str], choices: Sequence[str] | None = None) -> str | None:
    """Read which single option ``text`` picks, or ``None`` if it picks none or more than one.

    1. A lone letter (``"b"``, ``"(B)"``, ``"B."``) is that option, whatever its case.
    2. Otherwise every letter standing alone in the text that could name an option is collected
       (:func:`_named_letters`), beyond the options too ("B", "(B) dog", "The answer is B"; the option
       texts are blanked first, so "Vitamin C" is no letter; full-width and look-alike letters count).
       Exactly one distinct letter, among the options, is the pick unless the text also names another
       option's text; several letters ("A B C D", "B or E" with four options) pick none.
    3. With no letter and the option texts given, an answer equal to one option's text picks it; failing
       that, an answer containing exactly one option text (as whole words) picks it.
    """
    text = reading_form(text)
    stripped = text.strip(_EDGE_PUNCTUATION)
    if len(stripped) == 1 and stripped.upper() in letters:
        return stripped.upper()
    options = [normalize_text(_strip_option_prefix(choice)) for choice in choices or ()]
    answer = normalize_text(text)
    named = _named_letters(_blank_phrases(text, options), len(letters))
    if named:
        if len(named) > 1 or named[0] not in letters:
            return None
        pick = named[0]
        own = options[letters.index(pick)] if letters.index(pick) < len(options) else ""
        others = [
            letter
            for letter in _options_named(answer, letters, options)
            if letter != pick and options[letters.index(letter)] not in own
        ]
        return None if others else pick
    exact = [letter for letter, option in zip(letters, options, strict=False) if option and option == answer]
    if len(exact) == 1:
        return exact[0]
    contained = _options_named(answer, letters, options)
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
    as text, as :func:`exact_reward`. A negation or hedge outside the option texts ("not B", "B, maybe C")
    scores 0 (:mod:`rewards.verifiable.commitment`).
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
    option_texts = [str(choice) for choice in choices or ()]
    option_texts += [_strip_option_prefix(choice) for choice in option_texts]
    if uncommitted(answer, option_texts):
        return 0.0
    return 1.0 if choice_letter(answer, _letters(count), choices) == gold else 0.0


_YES_WORDS = {"yes", "yeah", "yep", "да", "oui", "ja", "sí"}
_NO_WORDS = {"no", "nope", "нет", "non", "nein"}
_BARE_BOOLEANS = {"true": "yes", "false": "no"}
_LEADING_ANSWER = re.compile(r"\s*[^\W\d_]+\s*(?:[,.!;:]|$)")  # "No," / "Yes." / "no": a word then a stop


def _polarity(text: str) -> str | None:
    """ "yes", "no" or ``None`` (both, neither, a hedge, or a negation that is not a leading answer word)."""
    text = reading_form(text)
    bare = _BARE_BOOLEANS.get(normalize_text(text))
    if bare is not None:
        return bare
    words = re.findall(r"[^\W\d_]+", text.casefold())
    read = set(words) | set(re.findall(r"[^\W\d_]+", latin_skeleton(text).casefold()))  # "nо": Cyrillic о
    said_yes, said_no = bool(read & _YES_WORDS), bool(read & _NO_WORDS)
    if said_yes == said_no or hedge(text):
        return None
    polarity, spoken = ("yes", _YES_WORDS) if said_yes else ("no", _NO_WORDS)
    if _LEADING_ANSWER.match(str(text)) and words[0] in spoken:
        return polarity  # "No, there isn't one": a leading "No," commits, the rest explains
    return None if negation(_blank_phrases(str(text), sorted(spoken))) else polarity


def yes_no_reward(completion: str, solution: Any, metadata: Mapping[str, Any] | None = None) -> float:
    """1.0 if the answer says exactly one of yes / no and it is the solution's.

    "yes" / "no" count as whole words in any case ("Yes, there is a cat." is yes; also "yeah", "nope" and
    "да", "oui", "ja", "sí" / "нет", "non", "nein"); "true" / "false" only as the whole answer. An answer
    with both ("yes or no", "yes нет") or neither scores 0, so does a hedge ("probably yes") and a negation
    unless the yes / no word leads the answer ("No, there isn't." is no; "The answer is not no" is 0).
    ``solution``: "yes" / "no" / "true" / "false" (any case, optionally tagged) or a bool.
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
    Numbers are read by :func:`parse_numbers`; an answer with several distinct numbers, a negation or a
    hedge ("not 3", "3 or more", "at least 3") scores 0 (:func:`committed_number`).
    """
    metadata = metadata or {}
    rel_tol = rel_tol if rel_tol is not None else float(metadata.get("rel_tol", DEFAULT_REL_TOL))
    abs_tol = abs_tol if abs_tol is not None else float(metadata.get("abs_tol", DEFAULT_ABS_TOL))
    gold = single_number(extract_solution(solution))
    if gold is None:
        raise ValueError(f"numeric solution must state exactly one number, got {solution!r}")
    value = committed_number(answer_text(completion, metadata), [str(extract_solution(solution))])
    return 1.0 if value is not None and _close(value, gold, rel_tol, abs_tol) else 0.0


_LATEX_DELIMITERS = ("$", "\\(", "\\[", "\\boxed")
MATH_MAX_ANSWER_CHARS = 2000
_MATH_SEGMENT = re.compile(r"\$\$(.+?)\$\$|\$(.+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.DOTALL)
_TEXT_COMMAND = re.compile(r"\\(?:text|textrm|textbf|textit|mbox|mathrm)\s*\{[^{}]*\}")
_LATEX_SPACE = re.compile(
    r"\\(?:quad|qquad|enspace|thinspace|medspace|thickspace|[ ,;:!>])|~"
    r"|\\(?:hspace\*?|hskip|kern|mkern|mskip|phantom|hphantom|vphantom)\s*\{[^{}]*\}"
)
_MATH_FUNCTIONS = {
    "sin", "cos", "tan", "cot", "sec", "csc", "log", "exp", "sqrt", "arcsin", "arccos", "arctan", "sinh",
    "cosh", "tanh", "lim", "max", "min", "gcd", "lcm", "mod", "deg", "inf", "infty", "det",
}  # fmt: skip
_PROSE_WORDS = {"is", "it", "so", "as", "be", "of", "to", "we", "an", "at", "by", "if", "on", "in"}
_SEPARATOR = "\x00"


def _boxed_contents(text: str) -> list[str]:
    """The brace-balanced contents of every ``\\boxed{...}`` in ``text``."""
    contents = []
    for match in re.finditer(r"\\boxed\s*\{", text):
        depth, start = 1, match.end()
        for index in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[index], 0)
            if depth == 0:
                contents.append(text[start:index])
                break
    return contents


def _is_prose(word: str) -> bool:
    lower = word.lower()
    if not word.isascii():
        return not all("\u0370" <= char <= "\u03ff" for char in word)  # Greek letters are maths
    return (len(word) >= 3 and lower not in _MATH_FUNCTIONS) or lower in _PROSE_WORDS


def _split_math(text: str, gold: str) -> list[str]:
    """Cut ``text`` at everything that separates two candidate expressions: prose words (Latin words of
    three or more letters, words of non-Greek scripts, "is", "so", ...), ``\\text{...}``, ``;`` / ``|`` /
    ``\\\\``, whitespace between two numbers, and top-level commas unless ``gold`` has one (a list answer)."""
    text = _TEXT_COMMAND.sub(_SEPARATOR, text)
    text = _LATEX_SPACE.sub(" ", text.replace("\\\\", _SEPARATOR))
    for symbol in (";", "|", "&"):
        if symbol not in gold:
            text = text.replace(symbol, _SEPARATOR)
    text = re.sub(
        r"(?<!\\)\b[^\W\d_]+\b", lambda m: _SEPARATOR if _is_prose(m.group(0)) else m.group(0), text
    )
    text = re.sub(r"(?<=\d)\s+(?=[-+]?\d)", _SEPARATOR, text)
    if not _has_top_level_comma(gold):
        text = "".join(_SEPARATOR if char == "," and depth == 0 else char for char, depth in _depths(text))
    pieces = (piece.strip(" \t\n.,:;=") for piece in text.split(_SEPARATOR))
    return [piece for piece in pieces if piece]


def _depths(text: str):
    """``(char, bracket depth before it)`` for each character."""
    depth = 0
    for char in text:
        if char in ")]}":
            depth = max(0, depth - 1)
        yield char, depth
        if char in "([{":
            depth += 1


def _has_top_level_comma(text: str) -> bool:
    return any(char == "," and depth == 0 for char, depth in _depths(text.strip().strip("$")))


def math_candidates(answer: str, gold: str = "") -> list[str]:
    """The separate expressions an answer offers, each a candidate the reward must accept.

    Every ``$...$`` / ``\\(...\\)`` / ``\\[...\\]`` segment and every ``\\boxed{...}`` is read on its own, and
    so is the text around them; each is cut further by :func:`_split_math`. "The answer is $x = 3$" offers
    ``x = 3``; ``$3$ $4$``, "3 4", "3 und 4", "3 four" offer 3 and 4. The answer is read in
    :func:`rewards.verifiable.commitment.reading_form` first (superscripts as powers: "x²" is ``x^{2}``;
    invisible separators are spaces) and number words become digits.
    """
    text = reading_form(answer, superscript_as_power=True)
    text = _NUMBER_WORD.sub(lambda m: f" {_NUMBER_WORDS[m.group(1).lower()]:g} ", text)  # "3 four": 3 and 4
    segments = [next(group for group in match.groups() if group is not None) for match in
                _MATH_SEGMENT.finditer(text)]  # fmt: skip
    parts = []
    for part in (*segments, _MATH_SEGMENT.sub(_SEPARATOR, text)):
        boxed = _boxed_contents(part)
        for content in boxed:  # a boxed expression is a candidate of its own
            part = part.replace(f"\\boxed{{{content}}}", _SEPARATOR)
        parts += [*boxed, part]
    pieces = [piece for part in parts for piece in _split_math(part, gold)]
    return [piece for piece in pieces if piece.strip("{}() ")]


def _math_parse(text: str, timeout: int | None):
    from math_verify import parse

    if not any(delimiter in text for delimiter in _LATEX_DELIMITERS):
        text = f"${text}$"  # a bare answer is one LaTeX expression
    return parse(text, parsing_timeout=timeout)


def _timeout_seconds(requested: int) -> int | None:
    # math-verify times out with signal.alarm, which exists only on the main thread; elsewhere run without
    return requested if threading.current_thread() is threading.main_thread() else None


def math_reward(
    completion: str, solution: Any, metadata: Mapping[str, Any] | None = None, *, timeout: int = 5
) -> float:
    """1.0 if math-verify finds every candidate of the answer equal to the solution (``verify(parse(g), parse(c))``).

    The candidates are :func:`math_candidates` (each delimited segment, each ``\\boxed``, cut at prose and
    separators); those math-verify cannot read (prose) are ignored, and at least one must be read. So
    ``$3$ $4$``, "3 4", ``3 \\\\ 4`` earn no more than their worst candidate. A negation or hedge that the
    solution does not contain ("not 3", "3 or 4", "3 | 4", "3 или 4", ``\\pm``, ``\\lor``) scores 0
    (:mod:`rewards.verifiable.commitment`). A bare answer or solution (no ``$``, ``\\(``, ``\\[`` or ``\\boxed``)
    is parsed as one LaTeX expression; several solutions must be given as a set or list.
    Answers over 2000 characters score 0. math-verify itself turns an unreadable completion into no parse
    (score 0); any other exception propagates to the trainer's ``reward.nan_policy``. On the main thread
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
    gold_text = str(extract_solution(solution))
    if not answer or len(answer) > MATH_MAX_ANSWER_CHARS or uncommitted(answer, [gold_text]):
        return 0.0
    seconds = _timeout_seconds(timeout)
    gold = _math_parse(gold_text, seconds)
    if not gold:
        raise ValueError(f"math-verify cannot parse the math solution {solution!r}; fix the record")
    parsed = [_math_parse(candidate, seconds) for candidate in math_candidates(answer, gold_text)]
    candidates = [candidate for candidate in parsed if candidate]
    if not candidates:
        return 0.0
    return 1.0 if all(verify(gold, candidate, timeout_seconds=seconds) for candidate in candidates) else 0.0
