"""A Fireworks-compatible inference gateway over vLLM engine workers."""
