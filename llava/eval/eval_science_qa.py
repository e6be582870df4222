"""LLaVA's command name for the ScienceQA scorer; the code lives in llava/eval/scoring/science_qa.py."""

from llava.eval.scoring.science_qa import main

if __name__ == "__main__":
    main()
