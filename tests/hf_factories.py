"""Tiny random transformers models written as Hugging Face directories (tests only)."""

from __future__ import annotations

import json
import pathlib

import safetensors.torch
import torch
import transformers

_CLASSES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
}


def random_causal_lm(model_type: str, seed: int = 0, **config_kwargs) -> torch.nn.Module:
    """A float32 transformers causal LM (eval mode) with random weights.

    Besides transformers' init, norm weights are 1 + N(0, 0.1) and biases
    N(0, 0.1), so that a loader that skips them is caught.
    """
    config_class, model_class = _CLASSES[model_type]
    config = config_class(**config_kwargs)
    torch.manual_seed(seed)
    model = model_class(config).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * 0.1
            if name.endswith("norm.weight"):
                param.copy_(1.0 + noise)
            elif name.endswith(".bias"):
                param.copy_(noise)
    return model


def round_to(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """The model with every weight rounded to `dtype` and kept in float32."""
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.to(dtype).to(torch.float32))
    return model


def write_hf_dir(directory: str | pathlib.Path, model: torch.nn.Module, *,
                 dtype: torch.dtype = torch.float32, num_shards: int = 1) -> pathlib.Path:
    """Writes config.json and model.safetensors (or `num_shards` shards and
    model.safetensors.index.json) of `model`, its weights cast to `dtype`.

    Tied output weights are left out, as transformers does.
    """
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    config["dtype"] = str(dtype).removeprefix("torch.")
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    tensors = {name: value.detach().to(dtype).contiguous().clone()
               for name, value in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    if num_shards == 1:
        safetensors.torch.save_file(tensors, str(directory / "model.safetensors"),
                                    metadata={"format": "pt"})
        return directory
    names = sorted(tensors)
    weight_map = {}
    for shard in range(num_shards):
        file = f"model-{shard + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {name: tensors[name] for name in names[shard::num_shards]}
        safetensors.torch.save_file(part, str(directory / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in part})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size()
                                            for t in tensors.values())},
             "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return directory


def write_random_pair(directory: str | pathlib.Path, model_type: str,
                      seeds: tuple[int, int] = (0, 1),
                      **config_kwargs) -> tuple[tuple[torch.nn.Module, torch.nn.Module],
                                                tuple[pathlib.Path, pathlib.Path]]:
    """Two random float32 models of one architecture (a reference and an
    "aligned" one, differing only in their seeds) written to directory/ref and
    directory/aligned: ((torch ref, torch aligned), (ref dir, aligned dir))."""
    directory = pathlib.Path(directory)
    torch_models, paths = [], []
    for seed, name in zip(seeds, ("ref", "aligned")):
        torch_model = random_causal_lm(model_type, seed=seed, **config_kwargs)
        paths.append(write_hf_dir(directory / name, torch_model))
        torch_models.append(torch_model)
    return tuple(torch_models), tuple(paths)
