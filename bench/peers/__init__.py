"""Peer servers the benchmark serves the same checkpoint with: LitServe and the prototype's FastAPI design."""
