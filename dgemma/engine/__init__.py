"""Generation machinery: the KV cache and the canvas loop."""
