"""Scoring and converting LLaVA answers files, one module per benchmark (the code behind LLaVA's
`eval_*`, `convert_*` and `summarize_review` commands at llava/eval/):

- results: the one checked reader of answers files that every scorer uses
- vqa_accuracy: VQA accuracy and EvalAI answer normalisation (LLaVA's `m4c_evaluator`)
- textvqa, gqa, pope, mme, mmbench, science_qa: scorers
- seed, vizwiz, vqav2: leaderboard upload converters (SEED also scores)
- mmvet: results file for the official MM-Vet (GPT-4) grader
- llavabench: LLaVA-Bench (in-the-Wild) scores from a judge's review file
- summary, run_summary: a run's efficiency figures (kept tokens, FLOPs, time) and its summary.json

Nothing here imports torch, so scorers start fast.
"""
