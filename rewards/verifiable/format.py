"""R1-style output format: the ``<think>...</think><answer>...</answer>`` check and answer extraction.

Answer extraction rules (every content reward in this package reads the completion through
:func:`answer_text`, which applies them):

1. If the completion contains at least one complete ``<answer>...</answer>`` block, the answer is the content
   of the **last** such block, stripped.
2. Otherwise, if an ``<answer>`` tag was opened but never closed (a generation cut at the length limit), the
   answer is the text after the last ``<answer>``, stripped.
3. Otherwise (no answer tag at all) the answer is the whole completion with its reasoning removed: every
   complete ``<think>...</think>`` block is dropped, and an unclosed ``<think>`` drops everything after it
   (a completion cut inside its reasoning has no answer). The rest is stripped.

Rule 3 lets the rewards serve prompts that do not ask for tags. Set ``metadata["require_answer_tags"] = True``
to make a completion without a complete ``<answer>`` block answer ``""`` (which every reward scores 0);
the format reward is the separate signal that pays for the tags themselves.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

__all__ = ["extract_answer", "answer_text", "extract_solution", "format_reward"]

_ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_OPEN_ANSWER = re.compile(r"<answer>", re.IGNORECASE)
_OPEN_THINK = re.compile(r"<think>", re.IGNORECASE)
_ANY_TAG = re.compile(r"</?(?:think|answer)>", re.IGNORECASE)
_FORMAT = re.compile(r"\A\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*\Z", re.DOTALL)


def extract_answer(text: str, require_tags: bool = False) -> str:
    """Return the final answer of ``text`` by the rules in the module docstring.

    With ``require_tags=True`` only rule 1 applies: no complete ``<answer>`` block gives ``""``.
    """
    if not isinstance(text, str):
        return ""
    blocks = _ANSWER_BLOCK.findall(text)
    if blocks:
        return blocks[-1].strip()
    if require_tags:
        return ""
    opened = list(_OPEN_ANSWER.finditer(text))
    if opened:
        return text[opened[-1].end() :].strip()
    without_thinking = _THINK_BLOCK.sub(" ", text)
    unclosed = _OPEN_THINK.search(without_thinking)
    if unclosed:
        without_thinking = without_thinking[: unclosed.start()]
    return _ANY_TAG.sub(" ", without_thinking).strip()


def answer_text(completion: str, metadata: Mapping[str, Any] | None = None) -> str:
    """The answer the content rewards score: :func:`extract_answer` honouring ``metadata["require_answer_tags"]``."""
    require = bool((metadata or {}).get("require_answer_tags", False))
    return extract_answer(completion, require_tags=require)


def extract_solution(solution: Any) -> Any:
    """Unwrap a ground truth given as ``"<answer>...</answer>"`` (VLM-R1 data) to its content.

    Strings are stripped (and unwrapped when they contain a complete answer block); anything else is
    returned unchanged.
    """
    if isinstance(solution, str):
        blocks = _ANSWER_BLOCK.findall(solution)
        return (blocks[-1] if blocks else solution).strip()
    return solution


def format_reward(completion: str, solution: Any = None, metadata: Mapping[str, Any] | None = None) -> float:
    """1.0 if the completion is exactly ``<think>R</think><answer>A</answer>`` (whitespace around allowed), else 0.

    Required: one think block followed by one answer block and nothing else outside them; no nested or
    repeated ``<think>`` / ``<answer>`` tags inside; a non-empty answer ``A`` (the reasoning may be empty);
    lower-case tags (extraction, in contrast, accepts any case).
    ``solution`` and ``metadata`` are ignored (they are there for the common reward signature).
    """
    if not isinstance(completion, str):
        return 0.0
    match = _FORMAT.match(completion)
    if match is None:
        return 0.0
    reasoning, answer = match.group(1), match.group(2)
    if _ANY_TAG.search(reasoning) or _ANY_TAG.search(answer):
        return 0.0
    return 1.0 if answer.strip() else 0.0
