"""Talking to models: the OpenAI-compatible client, the model catalogue, the offline provider."""
