"""Evaluating LLaVA-1.5 with and without vision-token dropping on LLaVA's benchmarks.

- Top level, LLaVA's command names, kept as thin wrappers with LLaVA's flags and outputs:
  `model_vqa_loader`, `model_vqa`, `model_vqa_mmbench`, `model_vqa_science` (answering),
  `eval_textvqa`, `eval_gqa`, `eval_pope`, `eval_mme`, `eval_mmbench`, `eval_science_qa`,
  `convert_seed_for_submission`, `convert_vizwiz_for_submission`, `convert_vqav2_for_submission`,
  `convert_mmvet_for_eval`, `summarize_review` (scoring) and the module `m4c_evaluator`.
- Top level, our commands: `run` (every registered task: answer, merge, score; the benchmark scripts
  wrap it), `calibrate` (thresholds for a target token count), `thresholds` (the published pairs),
  `report` (tables from run summaries; `paper_table` and `paper_reference` for the paper's layout),
  `make_demo_data` (the tiny TextVQA demo); and three small helpers both sides use: `jsonl`,
  `cli_errors`, `option_letters`.
- `answering/`: the question formats behind the answering commands, `answerer` (one question, one
  answer, with LLaVA-1.5's prompt and image rules), the shared `loop`, `answers_file` and `sharding`.
- `scoring/`: one scorer or submission converter per benchmark, `results`, the checked reader of
  answers files they all use, and a run's `summary` / `run_summary`. Nothing there imports torch.
- `tasks/`: one registered task per benchmark: its data, answering command and scorer.
"""
