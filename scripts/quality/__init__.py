"""The quality experiment: SPA against seed-only DPO under a third-party scorer (docs/BENCHMARKS.md "Quality")."""
