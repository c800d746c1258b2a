"""The full-scale recipe's gin parses and builds the whole pipeline on CPU."""

import gin
import jax
import numpy as np

from dera_t5x import gin_utils
from dera_t5x import models
from dera_t5x.training import rl
from dera_t5x.training import sft


def test_t5_small_xsum_recipe_builds():
    gin.clear_config()
    try:
        gin_utils.parse(["gin/reproduce/length_reward_t5_small_xsum.gin"], [])
        config = gin_utils.model_config()
        assert (config.num_encoder_layers, config.num_heads, config.mlp_dim,
                config.vocab_size) == (6, 8, 2048, 32128)
        assert config.logits_via_embedding and config.mlp_activations == ("relu",)
        shapes = jax.eval_shape(models.EncoderDecoderModel(config).init,
                                jax.random.PRNGKey(0))
        num_params = sum(int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(shapes))
        assert 60e6 < num_params < 61e6  # T5-small
        assert gin.query_parameter("sft.train_sft.init_checkpoint").startswith(
            "gs://t5-data/pretrained_models/t5x/t5_small/checkpoint_1000000")
        assert gin.query_parameter("%MIXTURE_OR_TASK_NAME") == "xsum"
        assert gin.query_parameter("rl.make_optimizer.policy_learning_rate") == 5e-6
        # Every configurable the pipeline calls can be built from the bindings.
        rl_config = gin.query_parameter("rl.train_rl.config").scoped_configurable_fn()
        assert isinstance(rl_config, rl.RLConfig)
        assert rl_config.num_samples == 2 and rl_config.encode_prompts_once
        assert gin.query_parameter("sft.train_sft.optimizer").scoped_configurable_fn()
        assert gin.query_parameter("rl.train_rl.optimizer").scoped_configurable_fn()
        assert callable(sft.train_sft)
    finally:
        gin.clear_config()


def test_t5_small_reward_model_config_builds():
    gin.clear_config()
    try:
        gin_utils.parse(["gin/runs/sft.gin", "gin/runs/reward_model.gin"], [])
        assert gin_utils.model_config().vocab_size == 32128
        assert gin.query_parameter("reward_model.train_reward_model.task_name") == (
            "factual_pairs_t5")
        assert gin.query_parameter(
            "reward_model.train_reward_model.optimizer").scoped_configurable_fn()
    finally:
        gin.clear_config()
