"""LLaVA's command name for open-ended answering (MM-Vet, LLaVA-Bench): llava/eval/answering/open_ended.py."""

# also importable under LLaVA's module name, as code written for LLaVA expects
from llava.eval.answering.open_ended import build_parser, main, questions_from_file

__all__ = ["build_parser", "main", "questions_from_file"]

if __name__ == "__main__":
    main()
