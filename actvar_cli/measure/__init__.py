"""Measuring: FID and friends, agreement with the teacher, timing, every method side by side, plots."""
