"""Layer 2: captured activations — the safetensors shard format and the capture stage."""
