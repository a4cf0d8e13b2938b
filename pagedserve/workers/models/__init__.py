"""Model definitions (the Llama family) and checkpoint loading."""
