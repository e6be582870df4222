"""LLaVA's command name for the GQA scorer; the code lives in llava/eval/scoring/gqa.py."""

from llava.eval.scoring.gqa import main

if __name__ == "__main__":
    main()
