"""This project's training program on megatron.core: arguments, data, model, checkpoints, monitor, loop."""
