"""Webhooks: the sender that delivers the store's outbox to the configured receivers."""
