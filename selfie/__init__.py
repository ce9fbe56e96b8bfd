"""selfie: self-generated preference learning on TRL, PEFT and DeepSpeed."""

__version__ = "0.1.0"
