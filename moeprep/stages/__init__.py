"""The pipeline's stages: each one function from typed inputs to an Outcome."""
