"""Model families behind one protocol (`protocol.Model`); `for_config` picks one.

Families, one folder each (network, parameter-name mapping, logical axes):
`t5/` (encoder-decoder, T5.1.0 / 1.1 with T5X's names); `decoder_only/`
(causal LMs: Llama, Mistral, Qwen2 with Hugging Face's names).
"""

from __future__ import annotations

from typing import Any

from dera_t5x import decoding
from dera_t5x.models import protocol
from dera_t5x.models.decoder_only import model as decoder_only_model
from dera_t5x.models.decoder_only import network as decoder_only_network
from dera_t5x.models.t5 import model as t5_model
from dera_t5x.models.t5 import network as t5_network

Model = protocol.Model
EncoderDecoderModel = t5_model.EncoderDecoderModel
# T5's token conventions and helpers, public API since the first release.
PAD_ID = t5_model.PAD_ID
EOS_ID = t5_model.EOS_ID
DECODER_START_ID = t5_model.DECODER_START_ID
exclude_padding = t5_model.exclude_padding
shift_right = t5_model.shift_right
first_argmax = decoding.first_argmax

DecoderOnlyModel = decoder_only_model.DecoderOnlyModel
_FAMILIES = {t5_network.T5Config: EncoderDecoderModel,
             decoder_only_network.DecoderOnlyConfig: DecoderOnlyModel}


def for_config(config: Any) -> protocol.Model:
    """The model of a config (`T5Config` -> `EncoderDecoderModel`)."""
    family = _FAMILIES.get(type(config))
    if family is None:
        raise ValueError(f"No model family for a config of type {type(config).__name__}; "
                         f"known: {sorted(t.__name__ for t in _FAMILIES)}.")
    return family(config)
