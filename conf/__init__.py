"""Hydra config groups: one per registry kind, one YAML preset per option."""
