"""What a sparse scale computes: policies, method names, token and expert choices, the block paths, FLOPs."""
