"""The commitment rule: an answer that lists, negates or hedges between candidates earns no more than
committing to its worst candidate.

Every answer reward (choice, yes/no, numeric, counting, math) applies it in this strong form:

* **lists**: the answer names two or more different candidates ("3 or 4", "B E", ``$3$ $4$``)
  -> 0. The same candidate repeated ("3 cats, so 3") is one candidate.
* **negates**: the answer contains a negation ("The answer is not 3", "anything but B", ``x \\neq 3``)
  -> 0. Only a negation inside a legitimate answer text (the solution itself, a multiple-choice option's
  text, written out in full) is exempt: the gold ``x \\neq 0`` may be answered ``x \\neq 0``.
* **hedges**: the answer contains a hedge connector or a range ("or", "either", "maybe", "или", "oder",
  "|", ``\\\\``, ``\\lor``, ``\\pm``, "at least", "3+", ...) -> 0, with the same exemption.

Scoring 0 is at most the reward of every single candidate, so no listing, negating or hedging answer can
beat committing to its worst candidate. Candidates are over-read on purpose, because a candidate the
reader misses is a hedge that pays. Answers are read in :func:`reading_form`: numerals of every script made
ASCII (full-width ``４``, Arabic-Indic ``٤``, mathematical ``𝟒``; superscripts ``⁴``, circled ``④``, Roman
``Ⅳ``, fractions ``½``, CJK ``四`` each as a separate number), NFKC (full-width and mathematical letters),
invisible characters (zero-width space, invisible separator) as spaces, and, where letters are read, the
Cyrillic / Greek look-alikes of Latin letters (:func:`latin_skeleton`: "nо", "Е"). Digits glued to
letters are numbers (``3or4``, ``3x4`` are two); number words count in English and a few other languages
("3 or four", "3 quatre"), so do upper-case Roman numerals of two or more letters ("IV"); for multiple
choice every standalone capital counts, beyond the options too (``B or E`` with four options names two
letters), as do lower-case option letters other than "a". The price is paid by verbose honest answers that
mention a second number, a negation or a hedge word: reasoning belongs in ``<think>``, the ``<answer>`` holds
the committed answer.

Where the rule is enforced: :func:`uncommitted` (negations and hedges) in every answer reward;
:func:`rewards.verifiable.answers.parse_numbers` (two numbers are two candidates, whatever separates them)
in numeric and counting; :func:`rewards.verifiable.answers.choice_letter` (every standalone capital, and
option texts named beside a letter) in multiple choice; :func:`rewards.verifiable.answers.math_candidates`
(each delimited segment, each ``\\boxed``, cut at prose and separators, must verify) in math.

Residual risk: a one-candidate hedge whose connector is in no list (an unlisted language's "or" before a
single number); a second candidate written as a number word of an unlisted language; a lone capital "I"
(read as the pronoun when there are at most 8 options). Two digit candidates are rejected whatever
separates them, so the lists matter only for those cases.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from typing import Any

__all__ = [
    "ascii_numerals",
    "reading_form",
    "latin_skeleton",
    "negation",
    "hedge",
    "uncommitted",
    "NEGATION_WORDS",
    "HEDGE_WORDS",
]

# whole words (any case). Kept as data so the rule is reviewable in one place.
NEGATION_WORDS = (
    "not", "no", "never", "neither", "nor", "none", "cannot", "except", "excluding", "unlike",
    "other than", "rather than", "instead of", "anything but", "apart from", "wrong", "incorrect", "false",
    "nicht", "kein", "keine", "pas", "non", "не", "нет", "ни", "没有", "不是", "不", "非",
)  # fmt: skip
HEDGE_WORDS = (
    "or", "either", "whether", "maybe", "perhaps", "possibly", "probably", "likely", "might", "may",
    "could", "alternatively", "otherwise", "between", "range",
    "at least", "at most", "more than", "less than", "fewer than", "greater than", "up to", "or more",
    "or less", "oder", "ou", "o", "или", "либо", "або", "lub", "albo", "eller", "vagy", "veya",
    "hoặc", "atau", "或", "或者", "还是", "または", "もしくは", "또는", "아니면", "أو", "या", "או",
)  # fmt: skip
# negation / hedge symbols (matched literally)
_NEGATION_SYMBOLS = ("≠", "!=", "=/=", "\\neq", "\\ne ", "\\not", "\\neg", "¬", "∉", "\\notin", "n't", "n’t")
_HEDGE_SYMBOLS = ("|", "\\\\", "\\lor", "\\vee", "∨", "±", "∓", "\\pm", "\\mp", "≥", "≤", "\\geq", "\\leq",
                  "\\ge ", "\\le ", ">", "<", "?", "–", "—")  # fmt: skip
_PLUS_SUFFIX = re.compile(r"\d\s*\+(?!\s*[\d(\\a-zA-Z])")  # "3+" (3 or more), not "3+4"


def _word_pattern(words: tuple[str, ...]) -> re.Pattern[str]:
    """Whole-word alternation: not inside a longer word of letters (digits may touch: "3or4")."""
    alternatives = "|".join(sorted((re.escape(word) for word in words), key=len, reverse=True))
    return re.compile(rf"(?<![^\W\d_])(?:{alternatives})(?![^\W\d_])", re.IGNORECASE)


_NEGATION = _word_pattern(NEGATION_WORDS)
_HEDGE = _word_pattern(HEDGE_WORDS)
_CJK_NEGATION = ("没有", "不是", "不", "非")
_CJK_HEDGE = ("或者", "还是", "または", "もしくは", "或")


def _without(text: str, allowed: Sequence[str]) -> str:
    """``text`` in :func:`reading_form` (so "or⁴" is the word "or", "ｏｒ" too; Cyrillic look-alikes are
    read both ways), with every occurrence of each
    ``allowed`` phrase (the solution, option texts) that itself negates or hedges blanked out: a negation
    inside a legitimate answer text does not count against it, and nothing else is exempt."""
    text = reading_form(text)
    text = text + " " + latin_skeleton(text) if latin_skeleton(text) != text else text
    exempt = [str(phrase).strip() for phrase in allowed]
    exempt = [phrase for phrase in exempt if phrase and (_find_negation(phrase) or _find_hedge(phrase))]
    for phrase in sorted(exempt, key=len, reverse=True):
        text = re.sub(re.escape(reading_form(phrase)), " ", text, flags=re.IGNORECASE)
    return text


def _find_negation(text: str) -> str | None:
    match = _NEGATION.search(text)
    if match:
        return match.group(0)
    padded = text + " "
    return next((s for s in (*_NEGATION_SYMBOLS, *_CJK_NEGATION) if s in padded), None)


def _find_hedge(text: str) -> str | None:
    match = _HEDGE.search(text)
    if match:
        return match.group(0)
    padded = text + " "
    symbol = next((s for s in (*_HEDGE_SYMBOLS, *_CJK_HEDGE) if s in padded), None)
    if symbol is not None:
        return symbol
    plus = _PLUS_SUFFIX.search(text)
    return plus.group(0) if plus else None


def negation(text: str, allowed: Sequence[str] = ()) -> str | None:
    """The first negation in ``text`` (a word of :data:`NEGATION_WORDS` or a symbol such as ``≠``), or
    ``None``. Occurrences inside the ``allowed`` phrases (the solution, the option texts) do not count."""
    return _find_negation(_without(str(text), allowed))


def hedge(text: str, allowed: Sequence[str] = ()) -> str | None:
    """The first hedge in ``text`` (a word of :data:`HEDGE_WORDS`, a symbol such as ``|``, ``\\\\`` or a
    dash, or a trailing "+" as in "3+"), or ``None``. Occurrences inside the ``allowed`` phrases do not count."""
    return _find_hedge(_without(str(text), allowed))


def uncommitted(text: str, allowed: Sequence[str] = ()) -> str | None:
    """Why ``text`` does not commit (the negation or hedge found), or ``None`` when it does."""
    return negation(text, allowed) or hedge(text, allowed)


def ascii_numerals(text: Any, superscript_as_power: bool = False) -> str:
    """``text`` with every numeral written in ASCII digits.

    Decimal digits of any script (full-width ``４``, Arabic-Indic ``٤``) become the ASCII digit in place,
    so a run of them stays one number. Every other numeral character (superscripts ``⁴``, circled ``④``,
    Roman ``Ⅳ``, vulgar fractions ``½``, CJK ``四``) becomes its value with spaces around it: a separate
    number ("3⁴" reads as two numbers, 3 and 4). With ``superscript_as_power`` (math), a superscript digit
    attached to what precedes it becomes ``^{d}`` (``x²`` is ``x^{2}``), a subscript ``_{d}``.
    """
    pieces = []
    for char in str(text):
        if char.isascii():
            pieces.append(char)
            continue
        if char == "\u2212":  # unicode minus
            pieces.append("-")
            continue
        decimal = unicodedata.decimal(char, None)
        if decimal is not None:
            pieces.append(str(decimal))
            continue
        value = unicodedata.numeric(char, None)
        if value is None:
            pieces.append(char)
            continue
        name = unicodedata.name(char, "")
        attached = bool(pieces) and (pieces[-1][-1:].isalnum() or pieces[-1][-1:] in ")}")
        if superscript_as_power and attached and "SUPERSCRIPT" in name:
            pieces.append(f"^{{{value:g}}}")
        elif superscript_as_power and attached and "SUBSCRIPT" in name:
            pieces.append(f"_{{{value:g}}}")
        else:
            pieces.append(f" {value:g} ")
    return "".join(pieces)


# Cyrillic and Greek letters drawn like Latin ones: "nо" with a Cyrillic "о" is read "no", "Е" is "E"
_CONFUSABLES = str.maketrans(
    "АВЕКМНОРСТХаеорсухіјѕԁԛԝΑΒΕΖΗΙΚΜΝΟΡΤΥΧοκνρτυχ",
    "ABEKMHOPCTXaeopcyxijsdqwABEZHIKMNOPTYXokvptux",
)


def latin_skeleton(text: str) -> str:
    """``text`` with Cyrillic / Greek look-alikes of Latin letters replaced by those letters."""
    return text.translate(_CONFUSABLES)


def reading_form(text: Any, superscript_as_power: bool = False) -> str:
    """The form answers are read in: :func:`ascii_numerals`, then Unicode NFKC (full-width and
    mathematical letters become ASCII: "Ｅ", "𝐂"), invisible characters (zero-width space, invisible
    separator / times, soft hyphen: Unicode category Cf) become spaces."""
    text = unicodedata.normalize("NFKC", ascii_numerals(text, superscript_as_power))
    return "".join(" " if unicodedata.category(char) == "Cf" else char for char in text)
