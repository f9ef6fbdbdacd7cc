"""Two-stage distillation: the training loop, its losses, data, run folders and recipes."""
