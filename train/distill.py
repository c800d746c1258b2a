r"""TrRa: DeRa's mixture of an SFT and an aligned model at one lambda, distilled
into one model.

    python -m train.distill --gin_file=gin/runs/sft_tiny.gin \
        --gin_file=gin/runs/distill_tiny.gin --ref_checkpoint=runs/sft/params \
        --aligned_checkpoint=runs/rl_beta_8/params --lam=2 --model_dir=runs/distill_lambda_2

Responses are taken from the task's train split (its targets, or fresh
mixture samples of its inputs: `distill.train_distill.data_source`), or with
`--decoded_file` from a finished decode job's samples at `--lam` (source
'decoded': the job's inputs and samples, e.g. of the train split); the
mean per-token KL(mixture || student) on mixture samples of the first
`--eval_examples` validation inputs is written as `eval/mixture_kl_per_token`.
The student is written to `<model_dir>/params`.
"""

from typing import Sequence

from absl import flags
import gin

from dera_t5x import checkpoints
from dera_t5x import gin_utils
from dera_t5x import models
from dera_t5x.data import pipeline  # noqa: F401  (the task gin files' configurables)
from dera_t5x.training import distill

_MODEL_DIR = flags.DEFINE_string("model_dir", None, "Checkpoints, metrics and config.gin.",
                                 required=True)
_REF = flags.DEFINE_string("ref_checkpoint", None,
                           "The reference (SFT) model: our params dir, a Hugging Face dir or a "
                           "T5X checkpoint.", required=True)
_ALIGNED = flags.DEFINE_string("aligned_checkpoint", None,
                               "The aligned (RL / DPO) model, in the same forms.", required=True)
_LAM = flags.DEFINE_float("lam", None, "The lambda to bake in (>= 0).", required=True)
_EVAL = flags.DEFINE_integer("eval_examples", 100,
                             "Validation inputs of the held-out KL (0: none).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the data order and the samples.")
_DECODED = flags.DEFINE_string(
    "decoded_file", None, "A decode job's output (temperature 1, lambdas including --lam): "
    "distil on its samples at --lam (data_source 'decoded', whatever gin binds).")


def main(argv: Sequence[str]) -> None:
    del argv
    lam = distill.check_lambda(_LAM.value)  # a bad lambda fails before anything loads
    config = gin_utils.model_config()
    model = models.for_config(config)
    task = gin.query_parameter("%MIXTURE_OR_TASK_NAME")
    lengths = gin.query_parameter("%TASK_FEATURE_LENGTHS")
    if _DECODED.value:  # a bad file fails before the checkpoints load
        data, source = distill.decoded_data(_DECODED.value, lam, model), {"data_source": "decoded"}
    elif gin_utils.bindings_of("distill.train_distill").get("data_source") == "decoded":
        raise ValueError("distill.train_distill.data_source = 'decoded' reads a decode job's "
                         "output: pass --decoded_file=<the job's output file>.")
    else:
        data, source = distill.task_data(task, "train", lengths), {}
    params_ref = checkpoints.load_params(_REF.value, config)
    params_aligned = checkpoints.load_params(_ALIGNED.value, config)
    eval_data = distill.task_data(task, "validation", lengths, _EVAL.value) \
        if _EVAL.value else None
    student = distill.train_distill(
        _MODEL_DIR.value, model=model, params_ref=params_ref, params_aligned=params_aligned,
        lam=lam, data=data, eval_data=eval_data, max_decode_len=lengths["targets"],
        seed=_SEED.value, **source)
    checkpoints.save_params(f"{_MODEL_DIR.value}/params", student)


if __name__ == "__main__":
    gin_utils.run(main)
