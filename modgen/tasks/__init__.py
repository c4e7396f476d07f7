"""Built-in tasks (what ``python -m modgen task=NAME`` runs)."""
