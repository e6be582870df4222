"""LLaVA's command name for the MME scorer; the code lives in llava/eval/scoring/mme.py."""

from llava.eval.scoring.mme import main

if __name__ == "__main__":
    main()
