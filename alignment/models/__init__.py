"""Building and loading models: the tiny toy-world Llama, policies, value heads and reward models."""
