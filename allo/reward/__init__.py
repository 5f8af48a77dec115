"""Token-level reward: teachers that rewrite wrong responses with minimal edits, and token keep-probabilities."""
