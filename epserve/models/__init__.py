"""Model definitions, split into an attention side and an expert side."""
