"""Read the chosen option letter out of a free-text answer, as LLaVA's multiple-choice scorers do.

ScienceQA and MMBench share these rules so that the same answer is parsed the same way in both:
the whole answer is a letter; or it starts with "X."; or it says "The answer is X." exactly once;
or it starts with "(X)". Anything else is a failed parse, which scores as wrong.
"""

from __future__ import annotations

import re
import string

FAILED = "FAILED"  # LLaVA's marker for an answer no letter could be read from
OPTION_LETTERS = string.ascii_uppercase

ANSWER_IS = re.compile(r"The answer is \(?([A-Z])(?![A-Za-z])")
LEADING_DOT = re.compile(r"([A-Z])\.(?:\s|$)")
LEADING_PAREN = re.compile(r"\(([A-Z])\)")


def option_letters(count: int) -> list[str]:
    """The letters of the first `count` options: A, B, C, ..."""
    if not 0 < count <= len(OPTION_LETTERS):
        raise ValueError(f"a question needs 1 to {len(OPTION_LETTERS)} options, got {count}")
    return list(OPTION_LETTERS[:count])


def parse_option_letter(answer: str, letters: list[str]) -> str:
    """The option letter `answer` picks among `letters`, or FAILED.

    A letter that names no option of this question (an "E" for four options) is a failed parse too,
    which LLaVA's scorers count as wrong in the same way.
    """
    text = answer.strip()
    if text in letters:
        return text
    leading_dot = LEADING_DOT.match(text)
    if leading_dot:
        return _known(leading_dot.group(1), letters)
    stated = ANSWER_IS.findall(text)
    if len(stated) == 1:
        return _known(stated[0], letters)
    leading_paren = LEADING_PAREN.match(text)
    if leading_paren:
        return _known(leading_paren.group(1), letters)
    return FAILED


def _known(letter: str, letters: list[str]) -> str:
    return letter if letter in letters else FAILED
