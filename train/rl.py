r"""KL-regularized RL from an SFT checkpoint.

    python -m train.rl --gin_file=gin/runs/sft_tiny.gin --gin_file=gin/runs/rl_tiny.gin \
        --ref_checkpoint=runs/sft_tiny/params --beta=8 --model_dir=runs/rl_beta_8 \
        [--reward=length | --reward=reward_model --reward_model_checkpoint=...]
"""

import dataclasses
from typing import Sequence

from absl import flags

from dera_t5x import checkpoints
from dera_t5x import gin_utils
from dera_t5x import models
from dera_t5x.training import reward_model
from dera_t5x.training import rewards
from dera_t5x.training import rl

_MODEL_DIR = flags.DEFINE_string("model_dir", None, "Checkpoints and metrics.", required=True)
_REF = flags.DEFINE_string("ref_checkpoint", None,
                           "The SFT model: our params dir, a Hugging Face T5 dir or a T5X "
                           "checkpoint.", required=True)
_BETA = flags.DEFINE_float("beta", None, "KL strength (> 0).", required=True)
_REWARD = flags.DEFINE_enum("reward", "length", ["length", "reward_model"], "The task reward.")
_RM = flags.DEFINE_string("reward_model_checkpoint", None,
                          "Params written by train.reward_model (with --reward=reward_model).")


def main(argv: Sequence[str]) -> None:
    del argv
    rl_config = dataclasses.replace(rl.RLConfig(), beta=_BETA.value)  # checks beta first
    config = gin_utils.model_config()
    model = models.for_config(config)
    params_ref = checkpoints.load_params(_REF.value, config)
    if _REWARD.value == "length":
        reward = rewards.length_reward()
    else:
        if not _RM.value:
            raise ValueError("--reward=reward_model needs --reward_model_checkpoint.")
        reward = reward_model.as_reward(model, checkpoints.restore_params(_RM.value))
    policy = rl.train_rl(_MODEL_DIR.value, model=model, params_ref=params_ref, reward=reward,
                         config=rl_config)
    checkpoints.save_params(f"{_MODEL_DIR.value}/params", policy)


if __name__ == "__main__":
    gin_utils.run(main)
