"""Training on donors: elastic, checkpointing training (wraps Ray Train)."""
