"""`selfie export`'s work: an iteration's policy as a standalone model or a PEFT adapter, and its model card."""
