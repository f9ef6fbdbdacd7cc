"""Model architectures with upstream's state-dict names, their configurations, and checkpoint files."""
