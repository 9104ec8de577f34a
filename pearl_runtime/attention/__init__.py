"""Attention backends behind one interface, chosen once at engine start."""
from pearl_runtime.attention.base import AttentionBackend
from pearl_runtime.attention.select import select_backend

__all__ = ["AttentionBackend", "select_backend"]
