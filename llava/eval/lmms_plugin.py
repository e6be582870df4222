"""The entry point lmms-eval loads at start-up (group `lmms_eval.models`, see pyproject.toml): it names
our model class without importing it, so lmms-eval runs of other models never load torch code of ours."""

from __future__ import annotations

MODEL_NAME = "mustdrop"
MODEL_CLASS = "llava.eval.lmms_eval_model.MustDropLMM"


def manifests():
    """`mustdrop` is `MustDropLMM` (llava/eval/lmms_eval_model.py), a simple (non-chat) lmms-eval model."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=MODEL_NAME, simple_class_path=MODEL_CLASS)]
