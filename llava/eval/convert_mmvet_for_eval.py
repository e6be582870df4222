"""LLaVA's command name for the MM-Vet results converter; the code lives in llava/eval/scoring/mmvet.py."""

from llava.eval.scoring.mmvet import main

if __name__ == "__main__":
    main()
