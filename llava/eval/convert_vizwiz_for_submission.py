"""LLaVA's command name for the VizWiz upload converter; the code lives in llava/eval/scoring/vizwiz.py."""

from llava.eval.scoring.vizwiz import main

if __name__ == "__main__":
    main()
