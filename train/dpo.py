r"""DPO from an SFT model on preference pairs.

    python -m train.dpo --gin_file=gin/runs/sft_tiny.gin --gin_file=gin/runs/dpo_tiny.gin \
        --ref_checkpoint=runs/sft/params --beta=0.5 --model_dir=runs/dpo_beta_0.5

Without `--pairs_file`, pairs of the reference model's samples on the task's
train prompts are labelled by the length reward through Bradley-Terry at
`aligners.dpo_aligner.tau` and cached beside the model_dir
(`preference_pairs.jsonl`). With `--pairs_file`, the pairs of that file
(written by `dera_t5x.training.preference_pairs.write`) are used, 10% held
out for `eval/rewards/accuracies`. The policy is written to `<model_dir>/params`.
"""

from typing import Sequence

from absl import flags
import gin

from dera_t5x import aligners
from dera_t5x import checkpoints
from dera_t5x import gin_utils
from dera_t5x import models
from dera_t5x.training import dpo
from dera_t5x.training import preference_pairs
from dera_t5x.training import rewards

_MODEL_DIR = flags.DEFINE_string("model_dir", None, "Checkpoints, metrics and config.gin.",
                                 required=True)
_REF = flags.DEFINE_string("ref_checkpoint", None,
                           "The SFT model (reference and initial policy): our params dir, a "
                           "Hugging Face dir or a T5X checkpoint.", required=True)
_BETA = flags.DEFINE_float("beta", None, "DPO strength (> 0).", required=True)
_PAIRS = flags.DEFINE_string("pairs_file", None, "Preference pairs (JSON lines) to train on.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the pairs' split and the data order.")


def main(argv: Sequence[str]) -> None:
    del argv
    dpo.check_settings(_BETA.value, "sigmoid")  # a bad beta fails before anything loads
    config = gin_utils.model_config()
    model = models.for_config(config)
    params_ref = checkpoints.load_params(_REF.value, config)
    if _PAIRS.value:
        _, pairs = preference_pairs.read(_PAIRS.value)
        train, held_out = preference_pairs.split(pairs, 0.1, _SEED.value)
        policy = dpo.train_dpo(_MODEL_DIR.value, model=model, params_ref=params_ref,
                               pairs=train, eval_pairs=held_out, beta=_BETA.value,
                               seed=_SEED.value)
    else:
        policy = aligners.dpo_aligner(
            _MODEL_DIR.value, model=model, params_ref=params_ref,
            reward=rewards.length_reward(), beta=_BETA.value,
            task_name=gin.query_parameter("%MIXTURE_OR_TASK_NAME"),
            feature_lengths=gin.query_parameter("%TASK_FEATURE_LENGTHS"),
            max_decode_len=gin.query_parameter("%TASK_FEATURE_LENGTHS")["targets"],
            seed=_SEED.value)
    checkpoints.save_params(f"{_MODEL_DIR.value}/params", policy)


if __name__ == "__main__":
    gin_utils.run(main)
