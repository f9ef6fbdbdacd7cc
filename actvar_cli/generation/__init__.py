"""Generating images: next-scale sampling, resumable sampling jobs, and image files."""
