"""The T5 family: `network` (Flax, T5X parameter names), `model` (the protocol),
`hf` (Hugging Face parameter names)."""
