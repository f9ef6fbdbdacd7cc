"""The Hugging Face Hub: fetching weights, naming downloaded models, and publishing ours."""
