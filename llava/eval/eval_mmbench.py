"""LLaVA's command name for the MMBench scorer; the code lives in llava/eval/scoring/mmbench.py."""

from llava.eval.scoring.mmbench import main

if __name__ == "__main__":
    main()
