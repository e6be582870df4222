"""MustDrop: multi-stage vision token dropping for LLaVA-style models."""
