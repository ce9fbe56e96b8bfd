"""Development tools: the kill-and-resume torture run (docs/RELIABILITY.md) and a GPU generation probe."""
