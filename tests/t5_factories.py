"""Shared test factories for the T5 family: tiny configs and random transformers T5
checkpoints written as Hugging Face directories (config.json + model.safetensors)."""

import json
import pathlib

from dera_t5x.models.t5 import network

# A T5.1.1-style micro model over the bundled 4,096-piece vocabulary.
TINY = network.T5Config(vocab_size=4096, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32,
                        num_encoder_layers=1, num_decoder_layers=1,
                        mlp_activations=("gelu", "linear"), logits_via_embedding=False,
                        dropout_rate=0.0)
EMBED_COPIES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


def tiny_config(**overrides) -> network.T5Config:
    """`TINY` with some fields replaced."""
    return network.T5Config(**{**TINY.__dict__, **overrides})


def hf_t5_config(config: network.T5Config, **overrides):
    """The transformers T5Config of one of our (T5.1.1-style, untied) configs."""
    import transformers  # noqa: PLC0415  (a test dependency)

    return transformers.T5Config(**{**dict(
        vocab_size=config.vocab_size, d_model=config.emb_dim, d_kv=config.head_dim,
        d_ff=config.mlp_dim, num_layers=config.num_encoder_layers,
        num_decoder_layers=config.num_decoder_layers, num_heads=config.num_heads,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1), **overrides})


def write_hf_t5(directory: pathlib.Path, hf_config, *, seed: int = 0,
                with_lm_head: bool = True, drop=EMBED_COPIES):
    """A random transformers T5 saved as config.json + model.safetensors, laid out
    as the public checkpoints are (untied configs: lm_head untied and config
    tie_word_embeddings false). Returns the PyTorch model (eval mode)."""
    import torch  # noqa: PLC0415  (a test dependency: a missing torch fails)
    import transformers  # noqa: PLC0415
    from safetensors.torch import save_file  # noqa: PLC0415

    torch.manual_seed(seed)
    hf_model = transformers.T5ForConditionalGeneration(hf_config).eval()
    tied = hf_config.tie_word_embeddings
    if not tied:
        # transformers 5 ties lm_head to the embedding for every config (an untied
        # config only turns off output scaling); untie it as T5.1.1 checkpoints are.
        with torch.no_grad():
            hf_model.lm_head.weight = torch.nn.Parameter(
                torch.randn_like(hf_model.shared.weight))
    directory.mkdir(parents=True)
    state = {k: v.detach().clone().contiguous() for k, v in hf_model.state_dict().items()
             if k not in drop and (with_lm_head or k != "lm_head.weight")}
    save_file(state, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(dict(hf_config.to_dict(),
                                                           tie_word_embeddings=tied)))
    return hf_model
