"""VQA accuracy as TextVQA reports it (EvalAI answer normalisation, 10 human answers per question).

The rules below reproduce the EvalAI answer processor that LLaVA's TextVQA scorer relies on,
including its quirks, so that our accuracies are comparable with published LLaVA-1.5 numbers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

HUMAN_ANSWERS_PER_QUESTION = 10
# An answer counts as fully correct once this many (other) humans gave it.
ANSWERS_FOR_FULL_CREDIT = 3

# Characters dropped before any other rule: commas (so "1,000" becomes "1000") and question marks.
DROPPED_CHARACTERS = (",", "?")
# Each of these is deleted if it touches a space anywhere in the answer, otherwise replaced by a space
# (so "coca-cola" becomes "coca cola" but "yes - no" becomes "yes  no").
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", "!")
# A period is kept only when a digit follows it ("2.5", ".5"); EvalAI's pattern meant to also require a
# digit before it but its look-behind is mistyped, and we keep its actual behaviour for score parity.
PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")

NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
ARTICLES = frozenset({"a", "an", "the"})

# The standard VQA contractions table. Its capitalised keys ("Im", "Ive", "Id've") are left out: answers
# are lower-cased first, so they never fire in the reference either.
CONTRACTIONS = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "couldn'tve": "couldn't've",
    "couldnt've": "couldn't've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hed've": "he'd've",
    "he'dve": "he'd've",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "isnt": "isn't",
    "itd": "it'd",
    "itd've": "it'd've",
    "it'dve": "it'd've",
    "itll": "it'll",
    "maam": "ma'am",
    "mightnt": "mightn't",
    "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "notve": "not've",
    "oclock": "o'clock",
    "oughtnt": "oughtn't",
    "'ows'at": "'ow's'at",
    "shant": "shan't",
    "shed've": "she'd've",
    "she'dve": "she'd've",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've",
    # Backwards in the reference table; kept so that scores match it.
    "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll",
    "somebodys": "somebody's",
    "someoned": "someone'd",
    "someoned've": "someone'd've",
    "someone'dve": "someone'd've",
    "someonell": "someone'll",
    "someones": "someone's",
    "somethingd": "something'd",
    "somethingd've": "something'd've",
    "something'dve": "something'd've",
    "somethingll": "something'll",
    "thats": "that's",
    "thered": "there'd",
    "thered've": "there'd've",
    "there'dve": "there'd've",
    "therere": "there're",
    "theres": "there's",
    "theyd": "they'd",
    "theyd've": "they'd've",
    "they'dve": "they'd've",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "twas": "'twas",
    "wasnt": "wasn't",
    "wed've": "we'd've",
    "we'dve": "we'd've",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "whod've": "who'd've",
    "who'dve": "who'd've",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've",
    "yall": "y'all",
    "yall'll": "y'all'll",
    "y'allll": "y'all'll",
    "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've",
    "youd": "you'd",
    "youd've": "you'd've",
    "you'dve": "you'd've",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}


def _tokenize(text: str) -> str:
    """Lower-case, drop commas/question marks, split off possessive 's and flatten whitespace."""
    text = text.lower()
    for character in DROPPED_CHARACTERS:
        text = text.replace(character, "")
    text = text.replace("'s", " 's")
    return text.replace("\n", " ").replace("\t", " ").strip()


def _strip_punctuation(text: str) -> str:
    """Delete or space out punctuation; the touches-a-space test looks at the text as given."""
    result = text
    for mark in PUNCTUATION:
        touches_space = f"{mark} " in text or f" {mark}" in text
        result = result.replace(mark, "" if touches_space else " ")
    return PERIOD_NOT_BEFORE_DIGIT.sub("", result)


def _normalise_words(text: str) -> str:
    """Map number words to digits, drop articles, restore contractions, collapse whitespace."""
    words = (NUMBER_WORDS.get(word, word) for word in text.split())
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def normalize_answer(answer: str) -> str:
    """Canonical form of a VQA answer, so that "Two." and "2" or "dont" and "don't" compare equal."""
    return _normalise_words(_strip_punctuation(_tokenize(answer)))


def _subset_credit(matches: int) -> float:
    """Credit within one 9-answer subset: a third per matching human answer, capped at 1."""
    return min(matches / ANSWERS_FOR_FULL_CREDIT, 1.0)


def vqa_answer_score(prediction: str, human_answers: Sequence[str]) -> float:
    """Score one prediction against 10 human answers, averaged over the 10 leave-one-out subsets.

    In each subset of 9 answers the prediction earns min(matches / 3, 1). Leaving out one of the m
    matching answers leaves m - 1 matches, leaving out any other leaves m, hence the closed form.
    """
    if len(human_answers) != HUMAN_ANSWERS_PER_QUESTION:
        raise ValueError(
            f"expected {HUMAN_ANSWERS_PER_QUESTION} human answers, got {len(human_answers)}: {list(human_answers)!r}"
        )
    predicted = normalize_answer(prediction)
    matches = sum(normalize_answer(answer) == predicted for answer in human_answers)

    total = matches * _subset_credit(matches - 1) + (HUMAN_ANSWERS_PER_QUESTION - matches) * _subset_credit(matches)
    return total / HUMAN_ANSWERS_PER_QUESTION


class TextVQAAccuracyEvaluator:
    """Dataset-level VQA accuracy with the interface LLaVA's TextVQA scorer calls."""

    def eval_pred_list(self, pred_list: Sequence[Mapping[str, Any]]) -> float:
        """Mean score over `[{"pred_answer": str, "gt_answers": [10 str]}, ...]`, a float in [0, 1]."""
        if not pred_list:
            raise ValueError("no predictions to score: the prediction list is empty")
        scores = []
        for index, entry in enumerate(pred_list):
            try:
                scores.append(vqa_answer_score(entry["pred_answer"], entry["gt_answers"]))
            except ValueError as error:
                raise ValueError(f"prediction {index}: {error}") from error
        return sum(scores) / len(scores)
