"""Streamlit upload page for the cifar3 TorchServe model (HTTP only: nothing here imports torch)."""
