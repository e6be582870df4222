"""LLaVA's command name for the POPE scorer; the code lives in llava/eval/scoring/pope.py."""

from llava.eval.scoring.pope import main

if __name__ == "__main__":
    main()
