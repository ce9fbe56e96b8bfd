"""The project's own scripts, run from the repository root as modules (`python -m scripts.benchmarks.generate`):
benchmarks/ (docs/BENCHMARKS.md), dev/ (kill tests, GPU probe), quality/ (the quality experiment), launch/ (several
processes or machines); benchlib is what they share."""
