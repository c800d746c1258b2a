"""The decoder-only family (Llama, Mistral, Qwen2): `network` (Flax),
`model` (the protocol), `hf` (Hugging Face parameter names)."""
