"""The built-in reference model: the shapes set, its classifier, how it was trained, and its weights."""
