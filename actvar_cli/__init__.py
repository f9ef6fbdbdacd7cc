"""actvar: ActVAR conversion, distillation and evaluation for pretrained VAR models."""

__version__ = "0.1.0"
