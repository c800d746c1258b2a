"""The model protocol every family implements, and helpers the families share.

Training, RL, DPO, distillation, DeRa and the decode job talk to a `Model`,
never to a family. A model object is a frozen dataclass of its config:
hashable, so it enters jitted functions as a static argument.

Inputs and responses. A model reads `inputs` [batch, in_len] int32 (T5: the
encoder input, 0-padded; decoder-only: the prompt, right-padded, with
`prompt_lengths` [batch]) and scores or generates `responses` [batch, len]
int32 (the new tokens, up to and including the first EOS, then padding).
`prompt_lengths=None` is the T5 case; a decoder-only model requires it.

Decoding. `prefill` reads the inputs once and returns the logits of the first
new token and the cache; `decode_step` feeds one token per row and returns
the next logits. Where each row is (its position) lives in the cache, so rows
of different prompt lengths share a batch; `decoding.sample` drives the two.

Repeats. `response_states`, `token_log_probs`, `score` and `prefill` take
`repeats` (default 1): each input row serves that many consecutive rows of
responses [batch * repeats, len] (or of the decode cache), so k samples of
one prompt read it once. T5 encodes it once; a decoder-only model prefills
it once (its teacher-forced passes run prompt and response as one sequence
and repeat the prompt). The result equals that of repeated inputs up to
float rounding.
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol, Sequence

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from dera_t5x import decoding

Array = jax.Array
Params = Any
# Set on banned token ids: finite, so that mixing and masking never make NaN.
EXCLUDED_LOGIT = -1e9


class Model(Protocol):
    """What every model family provides (see the module docstring)."""

    config: Any

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """The ids that end a response (one or several)."""

    @property
    def banned_ids(self) -> tuple[int, ...]:
        """Ids the model may never generate (T5: its padding id 0)."""

    @property
    def pad_id(self) -> int:
        """The id that fills responses after their end."""

    @property
    def hidden_size(self) -> int:
        """The width of `response_states` (what a scalar head reads)."""

    def init(self, rng: Array) -> Params:
        """Random float32 parameters."""

    def loss(self, params: Params, batch: Mapping[str, Array], dropout_rng: Array | None = None,
             *, z_loss: float = 0.0, label_smoothing: float = 0.0
             ) -> tuple[Array, dict[str, Array]]:
        """Teacher-forced cross-entropy on the family's training features."""

    def token_log_probs(self, params: Params, inputs: Array, responses: Array, *,
                        prompt_lengths: Array | None = None, dropout_rng: Array | None = None,
                        exclude_banned: bool = False, repeats: int = 1) -> Array:
        """log p(response_t | inputs, response_<t) [batch, len] float32, 0 after the end."""

    def score(self, params: Params, inputs: Array, responses: Array, *,
              prompt_lengths: Array | None = None, repeats: int = 1) -> Array:
        """Sequence log-likelihood [batch]."""

    def response_states(self, params: Params, inputs: Array, responses: Array, *,
                        prompt_lengths: Array | None = None, dropout_rng: Array | None = None,
                        repeats: int = 1) -> tuple[Array, Array]:
        """(final hidden states [batch, len + 1, emb], logits [batch, len + 1, vocab]);
        position t has read the inputs and response_<t (it predicts response_t);
        position n has read the first n response tokens."""

    def prefill(self, params: Params, inputs: Array, max_decode_len: int, *,
                prompt_lengths: Array | None = None, repeats: int = 1) -> tuple[Array, Any]:
        """(logits of the first new token [batch * repeats, vocab] float32, decode cache)."""

    def decode_step(self, params: Params, cache: Any, tokens: Array) -> tuple[Array, Any]:
        """tokens [batch] -> (next-token logits [batch, vocab] float32, cache)."""

    def check_params(self, params: Params, source: str = "The parameter set") -> Params:
        """Raises ValueError naming the first parameter that is missing, unexpected
        or of another shape than the config says; returns `params`."""

    def param_axes(self, path: str, ndim: int) -> tuple[str | None, ...]:
        """Logical axes of the parameter at '/'-joined `path` (see `partitioning`)."""

    def cache_axes(self, cache: Any) -> Any:
        """The decode cache's logical axes: a tree like `cache` of tuples."""


def ban_tokens(logits: Array, banned_ids: Sequence[int]) -> Array:
    """Logits [..., vocab] with `banned_ids` made impossible (EXCLUDED_LOGIT).

    Generated text never holds a banned id: every sampling path, and every
    log-prob of generated text used by RL and DeRa, uses the distribution
    restricted to the other tokens.
    """
    if not banned_ids:
        return logits
    return logits.at[..., np.asarray(banned_ids)].set(EXCLUDED_LOGIT)


def check_repeats(inputs: Array, responses: Array | None, repeats: int,
                  name: str = "repeats") -> None:
    """Raises ValueError unless `repeats` (called `name` in the message) is an
    integer >= 1 and responses (when given) have `repeats` rows per input row."""
    if not (isinstance(repeats, int) and repeats >= 1):
        raise ValueError(f"{name} must be an integer >= 1 (output rows per input row), "
                         f"got {repeats!r}.")
    if responses is not None and responses.shape[0] != inputs.shape[0] * repeats:
        raise ValueError(f"{responses.shape[0]} response rows for {inputs.shape[0]} input rows "
                         f"and repeats={repeats}: each input row serves `repeats` consecutive "
                         "response rows.")


def check_token_ids(values: Any, vocab_size: int, what: str) -> np.ndarray:
    """`values` as a numpy array; raises ValueError (naming `what`, e.g. "RL
    prompts['inputs']") unless it is a 2-D integer array of ids in [0, vocab_size)."""
    values = np.asarray(values)
    if values.ndim != 2 or not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"{what} must be a 2-D integer array of token ids, got shape "
                         f"{values.shape} and dtype {values.dtype}.")
    if values.size and (values.min() < 0 or values.max() >= vocab_size):
        raise ValueError(f"{what} holds ids from {values.min()} to {values.max()}, outside "
                         f"the model's vocabulary [0, {vocab_size}).")
    return values


def check_prompt_lengths(prompt_lengths: Any, inputs: Any, what: str) -> None:
    """Raises ValueError (naming `what`, e.g. "DPO prompt_lengths") unless
    prompt_lengths is a 1-D integer array with one entry per row of inputs
    [rows, width], each in [1, width]."""
    lengths, width = np.asarray(prompt_lengths), np.shape(inputs)[1]
    if (lengths.ndim != 1 or len(lengths) != np.shape(inputs)[0]
            or not np.issubdtype(lengths.dtype, np.integer)):
        raise ValueError(f"{what} must be integers, one per input row ({np.shape(inputs)[0]}); "
                         f"got dtype {lengths.dtype}, shape {lengths.shape}.")
    bad = ~((lengths >= 1) & (lengths <= width))
    if np.any(bad):
        raise ValueError(f"{what} must lie in [1, {width}] (the inputs' width); row "
                         f"{int(np.argmax(bad))} has {int(lengths[np.argmax(bad)])}.")


def repeat_rows(x: Array | None, repeats: int) -> Array | None:
    """Each row of x [batch, ...] `repeats` times in a row: [batch * repeats, ...]."""
    return x if x is None or repeats == 1 else jnp.repeat(x, repeats, axis=0)


def rows_per_input(inputs: Array, responses: Array) -> int:
    """How many consecutive response rows each input row serves (the `repeats`
    of callers that keep one row per prompt, as RL does for its samples)."""
    repeats, remainder = divmod(responses.shape[0], inputs.shape[0])
    if remainder or not repeats:
        raise ValueError(f"{responses.shape[0]} response rows do not split evenly over "
                         f"{inputs.shape[0]} input rows.")
    return repeats


def is_axes(x: Any) -> bool:
    """Whether x is a leaf of a logical-axes tree (a tuple of names or None)."""
    return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def repeat_prefill(model: Model, logits: Array, cache: Any, repeats: int) -> tuple[Array, Any]:
    """A prefill's (logits [batch, vocab], cache) with each row `repeats` times:
    the cache's leaves whose first logical axis is 'batch' (`model.cache_axes`)."""
    if repeats == 1:
        return logits, cache

    def repeat_leaf(axes, leaf):
        return repeat_rows(leaf, repeats) if axes[:1] == ("batch",) else leaf

    return repeat_rows(logits, repeats), jax.tree_util.tree_map(
        repeat_leaf, model.cache_axes(cache), cache, is_leaf=is_axes)


def cross_entropy_metrics(logits: Array, targets: Array, weights: Array, *,
                          z_loss: float = 0.0, label_smoothing: float = 0.0
                          ) -> tuple[Array, dict[str, Array]]:
    """Weighted token cross-entropy (T5X's, with its label-smoothing normalizer),
    summed over tokens and divided by the weight sum; metrics `loss`, `z_loss`,
    `accuracy`, `num_tokens`."""
    weights = weights.astype(jnp.float32)
    vocab = logits.shape[-1]
    log_z = jax.nn.logsumexp(logits, axis=-1)
    confidence = 1.0 - label_smoothing
    off = label_smoothing / (vocab - 1) if vocab > 1 else 0.0
    target_lp = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0] - log_z
    cross_entropy = -confidence * target_lp
    if label_smoothing:
        log_probs = logits - log_z[..., None]
        cross_entropy = cross_entropy - off * (jnp.sum(log_probs, -1) - target_lp)
        # Subtract the entropy of the smoothed target so the minimum is 0 (as T5X).
        normalizer = -(confidence * jnp.log(confidence)
                       + (vocab - 1) * off * jnp.log(off + 1e-20))
        cross_entropy = cross_entropy - normalizer
    z_term = z_loss * jnp.square(log_z)
    num_tokens = jnp.maximum(jnp.sum(weights), 1.0)
    total = jnp.sum((cross_entropy + z_term) * weights) / num_tokens
    correct = (decoding.first_argmax(logits) == targets).astype(jnp.float32)
    metrics = {
        "loss": total,
        "z_loss": jnp.sum(z_term * weights) / num_tokens,
        "accuracy": jnp.sum(correct * weights) / num_tokens,
        "num_tokens": jnp.sum(weights),
    }
    return total, metrics


def response_mask(responses: Array, eos_ids: Sequence[int], *, include_eos: bool = True
                  ) -> Array:
    """1.0 on the tokens up to and including the first EOS (without it, when
    not `include_eos`: the tokens a length counts), else 0: [batch, len].

    Padding after the end may be any id (a decoder-only vocabulary has no
    reserved one), so the end is found from the EOS, not from the padding.
    Works on numpy arrays too.
    """
    is_eos = jnp.isin(responses, jnp.asarray(eos_ids, jnp.asarray(responses).dtype))
    seen = jnp.cumsum(is_eos, axis=-1)
    before_end = seen - is_eos == 0 if include_eos else seen == 0
    return before_end.astype(jnp.float32)


def response_lengths(responses: Array, eos_ids: Sequence[int]) -> Array:
    """Tokens through the first EOS (the whole row if none): [batch] int32."""
    return jnp.sum(response_mask(responses, eos_ids), axis=-1).astype(jnp.int32)


def check_param_shapes(params: Params, expected: Mapping[str, tuple[int, ...]],
                       source: str) -> Params:
    """Compares a parameter tree with {'a/b/kernel': shape}; errors name the parameter.

    Returns:
      `params`, unchanged.
    """
    flat = {"/".join(str(k) for k in key): value
            for key, value in flax.traverse_util.flatten_dict(params).items()}
    missing = sorted(set(expected) - set(flat))
    unexpected = sorted(set(flat) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{source} does not match the model config: missing parameters "
                         f"{missing[:5]}, unexpected parameters {unexpected[:5]}. Check that "
                         "the config (gin or config.json) describes the checkpoint's "
                         "architecture.")
    for name, shape in expected.items():
        if tuple(np.shape(flat[name])) != tuple(shape):
            what = "vocabulary" if "embed" in name or "logits" in name or "lm_head" in name \
                else "architecture"
            raise ValueError(f"{source}: parameter {name} has shape "
                             f"{tuple(np.shape(flat[name]))} but the model config expects "
                             f"{tuple(shape)} (they differ in {what}).")
    return params


def expected_shapes(model: Model) -> dict[str, tuple[int, ...]]:
    """'encoder/layers_0/attention/query/kernel' -> shape, from `model.init`."""
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0))
    return {"/".join(key): tuple(value.shape)
            for key, value in flax.traverse_util.flatten_dict(shapes).items()}
