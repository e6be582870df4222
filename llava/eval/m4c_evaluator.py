"""LLaVA's module name for the VQA accuracy evaluator; the code is in llava/eval/scoring/vqa_accuracy.py."""

from llava.eval.scoring.vqa_accuracy import TextVQAAccuracyEvaluator

__all__ = ["TextVQAAccuracyEvaluator"]
