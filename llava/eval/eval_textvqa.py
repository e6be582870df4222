"""LLaVA's command name for the TextVQA scorer; the code lives in llava/eval/scoring/textvqa.py."""

from llava.eval.scoring.textvqa import main

if __name__ == "__main__":
    main()
