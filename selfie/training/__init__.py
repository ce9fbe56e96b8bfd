"""Training: the noise-aware DPO loss, TRL's DPOTrainer subclassed around it, and the trainer's arguments."""
