"""LLaVA's command name for the LLaVA-Bench review summary; the code lives in llava/eval/scoring/llavabench.py."""

from llava.eval.scoring.llavabench import main

if __name__ == "__main__":
    main()
