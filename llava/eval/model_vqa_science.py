"""LLaVA's command name for answering ScienceQA; the code lives in llava/eval/answering/science.py."""

# tasks (llava/eval/tasks/) look build_parser, questions_from_file and IDENTITY_ARGS up on this module
from llava.eval.answering.science import IDENTITY_ARGS, build_parser, main, questions_from_file

__all__ = ["IDENTITY_ARGS", "build_parser", "main", "questions_from_file"]

if __name__ == "__main__":
    main()
