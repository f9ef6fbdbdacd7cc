"""Turning a dense VAR into a sparse one: experts, fitted routers and selectors, other methods' models."""
