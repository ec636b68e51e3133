"""More than one process: torchrun set-up, collectives, and the trainer's parallel strategies."""
