"""Answering benchmark questions with a model (the code behind LLaVA's `model_vqa*` commands at llava/eval/):

- answerer: one question (text + optional image) to one answer, with LLaVA-1.5's prompt and image rules
- vqa: LLaVA question files, one JSON object per line (`model_vqa_loader`)
- open_ended: the same files for open-ended benchmarks, MM-Vet and LLaVA-Bench (`model_vqa`)
- mmbench: MMBench TSVs with base64 images, circular rounds (`model_vqa_mmbench`)
- science: ScienceQA's JSON list (`model_vqa_science`)
- loop: the loop they share: LLaVA's flags, checks before the model loads, resume, progress
- answers_file: answers files that survive a kill: locking, finished lines, run identity
- sharding: the one sharding path (torchrun ranks or one process per GPU) and the merge
"""
