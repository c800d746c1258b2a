r"""Supervised fine-tuning, T5X style.

    python -m train.sft --gin_file=gin/runs/sft_tiny.gin --model_dir=runs/sft_tiny \
        [--gin.sft.train_sft.num_steps=100]

The final params are also written to `<model_dir>/params` (for train.rl and decode.dera).
"""

from typing import Sequence

from absl import flags

from dera_t5x import checkpoints
from dera_t5x import gin_utils
from dera_t5x.training import sft

_MODEL_DIR = flags.DEFINE_string("model_dir", None, "Checkpoints, metrics and config.gin.",
                                 required=True)


def main(argv: Sequence[str]) -> None:
    del argv
    params = sft.train_sft(_MODEL_DIR.value)
    checkpoints.save_params(f"{_MODEL_DIR.value}/params", params)


if __name__ == "__main__":
    gin_utils.run(main)
