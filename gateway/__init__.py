"""The client-facing gateway: validation, tokenization, routing to targets, streaming text."""
