r"""A Bradley-Terry reward model on (prompt, chosen, rejected) triples.

    python -m train.reward_model --gin_file=gin/runs/sft_tiny.gin \
        --gin_file=gin/runs/reward_model_tiny.gin \
        --init_checkpoint=runs/sft_tiny/params --model_dir=runs/reward_model

The model (a T5 with a scalar head, `dera_t5x/training/reward_model.py`)
starts from `--init_checkpoint`; held-out pairwise accuracy is logged as
`eval/accuracy`. The final params are written to `<model_dir>/params`, which
`train.rl --reward=reward_model --reward_model_checkpoint=...` reads.
"""

from typing import Sequence

from absl import flags

from dera_t5x import checkpoints
from dera_t5x import gin_utils
from dera_t5x import models
from dera_t5x.training import reward_model

_MODEL_DIR = flags.DEFINE_string("model_dir", None, "Checkpoints, metrics and config.gin.",
                                 required=True)
_INIT = flags.DEFINE_string("init_checkpoint", None,
                            "The T5 to start from: our params dir (e.g. the SFT model's), a "
                            "Hugging Face T5 dir or a T5X checkpoint.", required=True)


def main(argv: Sequence[str]) -> None:
    del argv
    config = gin_utils.model_config()
    model = models.EncoderDecoderModel(config)
    model_params = checkpoints.load_params(_INIT.value, config)
    params = reward_model.train_reward_model(_MODEL_DIR.value, model=model, model_params=model_params)
    checkpoints.save_params(f"{_MODEL_DIR.value}/params", params)


if __name__ == "__main__":
    gin_utils.run(main)
