"""Message storage: the interface the core reads through, and its implementations."""

from gossip.store.interface import MessageStore

__all__ = ["MessageStore"]
