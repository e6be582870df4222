"""LLaVA's command name for answering LLaVA question files; the code lives in llava/eval/answering/vqa.py."""

# also importable under LLaVA's module name, as code written for LLaVA expects
from llava.eval.answering.vqa import build_parser, main, questions_from_file

__all__ = ["build_parser", "main", "questions_from_file"]

if __name__ == "__main__":
    main()
