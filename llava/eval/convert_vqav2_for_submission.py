"""LLaVA's command name for the VQAv2 upload converter; the code lives in llava/eval/scoring/vqav2.py."""

from llava.eval.scoring.vqav2 import main

if __name__ == "__main__":
    main()
