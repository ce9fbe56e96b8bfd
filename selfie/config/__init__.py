"""The recipe: its schema (schema.py), how it is loaded (loader.py), and what makes two recipes the same run (compat.py)."""
