"""Training engine: device/precision choice, the trainer loop, metrics, checkpoints, DDP."""
