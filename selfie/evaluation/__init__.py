"""Evaluation internals; the public import is `selfie.evaluate`."""
