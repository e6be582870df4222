"""LLaVA's command name for the SEED-Bench scorer and upload converter; the code lives in llava/eval/scoring/seed.py."""

from llava.eval.scoring.seed import main

if __name__ == "__main__":
    main()
