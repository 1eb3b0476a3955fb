"""``protocol=compressed``: fine-tune (or only compensate) a LoRA on a really compressed base model."""
