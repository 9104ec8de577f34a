"""Attention backends behind one interface, chosen once at engine start."""
from pearl_runtime.attention.base import AttentionBackend, select_backend

__all__ = ["AttentionBackend", "select_backend"]
