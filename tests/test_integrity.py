"""Nothing damaged or stale is used silently: checksummed checkpoints, damaged
files named, resumes that log each step once and refuse changed settings, a
pipeline cache keyed by its settings, one-line CLI errors, and API checks."""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import textwrap

import flax.serialization
import flax.traverse_util
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import safetensors.numpy

from dera_t5x import checkpoints
from dera_t5x import decoding
from dera_t5x import gin_utils
from dera_t5x import integrity
from dera_t5x import models
from dera_t5x import realign
from dera_t5x import reproduce
from dera_t5x.models import protocol
from dera_t5x.models.t5 import network
from dera_t5x.training import rewards
from dera_t5x.training import rl
from dera_t5x.training import sft
from dera_t5x.training import trainer

REPO = pathlib.Path(__file__).resolve().parents[1]
SMALL = network.T5Config(vocab_size=50, emb_dim=12, num_heads=2, head_dim=4, mlp_dim=20,
                         num_encoder_layers=1, num_decoder_layers=1)

# A noisy regression whose updates depend on the state's rng (like dropout);
# run in this process and, for the kill test, in a subprocess.
_TOY = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from dera_t5x.training import trainer

    def toy(seed=0):
        params = {"w": jnp.zeros((4,)), "b": jnp.zeros(())}
        optimizer = trainer.make_optimizer(
            "adamw", trainer.make_schedule("linear_warmup", warmup_steps=3))

        def loss_fn(p, batch, rng):
            noise = 0.1 * jax.random.normal(rng, batch["y"].shape)
            loss = jnp.mean(jnp.square(batch["x"] @ p["w"] + p["b"] + noise - batch["y"]))
            return loss, {"loss": loss}

        def batches_from(start):
            step = start
            while True:
                rng = np.random.default_rng(step)
                x = rng.normal(size=(8, 4)).astype(np.float32)
                yield {"x": x, "y": x @ np.arange(1.0, 5.0, dtype=np.float32) + 0.5}
                step += 1

        state = trainer.TrainState.create(params, optimizer, seed)
        return state, trainer.make_train_step(loss_fn, optimizer), batches_from
""")
_NAMESPACE: dict = {}
exec(_TOY, _NAMESPACE)  # noqa: S102  (the toy above, shared with the subprocess)
toy = _NAMESPACE["toy"]


def _steps(model_dir, prefix="train/loss"):
    return [line["step"] for line in trainer.read_metrics(model_dir) if prefix in line]


def _flip_a_byte(directory: pathlib.Path) -> pathlib.Path:
    """Flips one bit in the middle of the largest array data file under directory."""
    target = max((f for f in directory.rglob("ocdbt.process_*/d/*") if f.is_file()),
                 key=lambda f: f.stat().st_size)
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    return target


def _random_params(config, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    flat = {name: rng.normal(size=shape).astype(dtype)
            for name, shape in protocol.expected_shapes(models.for_config(config)).items()}
    return flax.traverse_util.unflatten_dict(flat, sep="/")


# ------------------------------------------------------------------ defect 1


def test_a_flipped_byte_in_saved_params_is_refused(tmp_path):
    params = {"encoder": {"kernel": np.arange(4000, dtype=np.float32).reshape(40, 100)},
              "bias": np.ones(7, np.float32)}
    checkpoints.save_params(tmp_path / "params", params)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params"]  # nothing left beside
    restored = checkpoints.restore_params(tmp_path / "params")
    jax.tree_util.tree_map(np.testing.assert_array_equal, restored, params)
    _flip_a_byte(tmp_path / "params")
    # orbax alone reads the flipped byte as a wrong value, without an error.
    with pytest.raises(checkpoints.CheckpointIntegrityError,
                       match=r"params: array encoder/kernel does not match the checksum"):
        checkpoints.restore_params(tmp_path / "params")


def test_damaged_orbax_files_are_named(tmp_path, monkeypatch):
    params = {"w": np.ones((3, 3), np.float32)}
    checkpoints.save_params(tmp_path / "a", params)
    metadata = tmp_path / "a" / "_METADATA"
    metadata.write_bytes(metadata.read_bytes()[:20])
    with pytest.raises(checkpoints.CheckpointIntegrityError,
                       match=r"a/_METADATA is not valid JSON.*truncated"):
        checkpoints.restore_params(tmp_path / "a")
    checkpoints.save_params(tmp_path / "b", params)
    (tmp_path / "b" / checkpoints.CHECKSUMS_FILE).unlink()
    with pytest.raises(checkpoints.CheckpointIntegrityError,
                       match="no checksum manifest.*DERA_T5X_ALLOW_UNVERIFIED_CHECKPOINTS=1"):
        checkpoints.restore_params(tmp_path / "b")
    monkeypatch.setenv(integrity.UNVERIFIED_ENV, "1")
    np.testing.assert_array_equal(checkpoints.restore_params(tmp_path / "b")["w"], params["w"])


def test_a_flipped_byte_in_a_trainer_checkpoint_is_refused(tmp_path):
    # Arrays over 1 KiB live in orbax's data files, which carry no checksum of their own.
    params = {"kernel": jnp.asarray(np.random.default_rng(0).normal(size=(40, 100)),
                                    jnp.float32), "bias": jnp.zeros((3,))}
    state = trainer.TrainState.create(params, optax.sgd(0.1), 0).replace(step=jnp.int32(10))
    checkpointer = trainer.Checkpointer(tmp_path)
    checkpointer.save(state)
    assert checkpointer.checksums_path(10).exists()
    checkpointer.close()
    _flip_a_byte(tmp_path / "checkpoints" / "10")
    checkpointer = trainer.Checkpointer(tmp_path)
    with pytest.raises(checkpoints.CheckpointIntegrityError,
                       match=r"checkpoints/10: array params/kernel does not match the checksum"):
        checkpointer.restore(state)
    checkpointer.close()
    # A resumed run meets the same error (train_loop restores through the Checkpointer).
    with pytest.raises(checkpoints.CheckpointIntegrityError, match="params/kernel"):
        trainer.train_loop(state, lambda s, b: (s, {"loss": 0.0}), lambda start: iter(()),
                           num_steps=20, model_dir=tmp_path)


def test_a_t5x_checkpoint_with_a_missing_chunk_is_refused(t5x_fixtures, tmp_path):
    folder = tmp_path / "checkpoint_1"
    shutil.copytree(t5x_fixtures / "tiny_t5" / "checkpoint_1", folder)
    tree = checkpoints.read_t5x_msgpack_tree(folder)
    assert np.abs(tree["optimizer"]["state"]["param_states"]["kernel"]).sum() > 0
    (folder / "state.param_states.kernel" / "0.0").unlink()  # the folder stays, empty
    with pytest.raises(checkpoints.CheckpointIntegrityError,
                       match=r"array state\.param_states\.kernel is incomplete.*0\.0.*missing"):
        checkpoints.read_t5x_msgpack_tree(folder)
    (folder / "checkpoint").write_bytes((folder / "checkpoint").read_bytes()[:40])
    with pytest.raises(checkpoints.CheckpointIntegrityError,
                       match=r"checkpoint_1/checkpoint cannot be read as a T5X msgpack"):
        checkpoints.read_t5x_msgpack_tree(folder)


def test_nan_in_loaded_parameters_is_refused(tmp_path):
    # Hugging Face safetensors: the file and the tensor are named.
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({
        "model_type": "t5", "vocab_size": 50, "d_model": 12, "d_kv": 4, "d_ff": 20,
        "num_layers": 1, "num_heads": 2}))
    embedding = np.ones((50, 12), np.float32)
    embedding[3, 4] = np.nan
    safetensors.numpy.save_file({"shared.weight": embedding}, str(hf / "model.safetensors"))
    with pytest.raises(checkpoints.CheckpointIntegrityError,
                       match=r"hf/model\.safetensors: tensor shared\.weight holds non-finite"):
        checkpoints.load_hf_t5(hf)
    # A truncated file is named, not a bare library error.
    data = (hf / "model.safetensors").read_bytes()
    (hf / "model.safetensors").write_bytes(data[:len(data) // 2])
    with pytest.raises(checkpoints.CheckpointIntegrityError,
                       match=r"model\.safetensors cannot be read as safetensors.*truncated"):
        checkpoints.load_params(str(hf), SMALL)
    # T5X (inline msgpack arrays): the checkpoint and the parameter are named.
    params = _random_params(SMALL)
    params["decoder"]["decoder_norm"]["scale"][1] = np.inf
    (tmp_path / "t5x").mkdir()
    (tmp_path / "t5x" / "checkpoint").write_bytes(flax.serialization.msgpack_serialize(
        {"optimizer": {"target": params}}))
    with pytest.raises(checkpoints.CheckpointIntegrityError,
                       match=r"t5x: parameter decoder/decoder_norm/scale holds non-finite"):
        checkpoints.load_params(str(tmp_path / "t5x"), SMALL)


# ------------------------------------------------------------------ defect 3


def test_a_run_killed_in_its_first_checkpoint_logs_each_step_once(tmp_path, monkeypatch):
    full = trainer.train_loop(*toy(), num_steps=25, model_dir=tmp_path / "full",
                              checkpoint_every=10)
    original = trainer.Checkpointer.save

    def dies_in_the_first_save(self, state):
        raise KeyboardInterrupt("killed while writing the checkpoint")

    monkeypatch.setattr(trainer.Checkpointer, "save", dies_in_the_first_save)
    with pytest.raises(KeyboardInterrupt):
        trainer.train_loop(*toy(), num_steps=25, model_dir=tmp_path / "b", checkpoint_every=10)
    assert _steps(tmp_path / "b") == [10]  # logged, then killed before the checkpoint
    monkeypatch.setattr(trainer.Checkpointer, "save", original)
    resumed = trainer.train_loop(*toy(), num_steps=25, model_dir=tmp_path / "b",
                                 checkpoint_every=10)
    assert _steps(tmp_path / "b") == [10, 20, 25]
    jax.tree_util.tree_map(np.testing.assert_array_equal, resumed.params, full.params)


def test_the_final_eval_line_comes_after_the_final_checkpoint(tmp_path):
    calls = []

    def eval_fn(params):
        calls.append(1)
        if len(calls) == 2:  # the final evaluation: killed before writing it
            raise KeyboardInterrupt
        return {"norm": jnp.sum(params["w"])}

    with pytest.raises(KeyboardInterrupt):
        trainer.train_loop(*toy(), num_steps=10, model_dir=tmp_path, checkpoint_every=5,
                           eval_fn=eval_fn, eval_every=5)
    assert trainer.Checkpointer(tmp_path).latest_step() == 10
    trainer.train_loop(*toy(), num_steps=10, model_dir=tmp_path, checkpoint_every=5,
                       eval_fn=eval_fn, eval_every=5)
    lines = trainer.read_metrics(tmp_path)
    assert [(line["step"], "eval/norm" in line) for line in lines] == [
        (5, False), (5, True), (10, False), (10, True)]
    trainer.train_loop(*toy(), num_steps=10, model_dir=tmp_path, checkpoint_every=5,
                       eval_fn=eval_fn, eval_every=5)
    assert len(trainer.read_metrics(tmp_path)) == 4  # a finished dir evaluates once


_KILLED_IN_A_WRITE = _TOY + textwrap.dedent("""
    import os, signal, sys
    from orbax.checkpoint._src.path import atomicity

    original = atomicity.AtomicRenameTemporaryPath.finalize

    async def die_before_the_commit(self):
        # Every file of the step is written into its temporary folder; the commit
        # (the rename to its final name) is the write's last act: die right before it.
        if self.get_final().name == sys.argv[2]:
            os.kill(os.getpid(), signal.SIGKILL)
        return await original(self)

    atomicity.AtomicRenameTemporaryPath.finalize = die_before_the_commit
    trainer.train_loop(*toy(), num_steps=25, model_dir=sys.argv[1], checkpoint_every=10)
""")


@pytest.mark.slow
def test_a_process_killed_during_a_checkpoint_write_resumes_exactly(tmp_path):
    """SIGKILL while orbax writes the checkpoint of step 20: the restart resumes
    from a verified checkpoint and ends bit-identical, each step logged once."""
    full = trainer.train_loop(*toy(), num_steps=25, model_dir=tmp_path / "full",
                              checkpoint_every=10)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", _KILLED_IN_A_WRITE, str(tmp_path / "b"),
                             "20"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == -9, result.stderr[-3000:]
    # orbax was still writing step 20: its temporary folder is left, step 10 is the latest.
    assert list((tmp_path / "b" / "checkpoints").glob("20.orbax-checkpoint-tmp*"))
    assert trainer.Checkpointer(tmp_path / "b").latest_step() == 10
    resumed = trainer.train_loop(*toy(), num_steps=25, model_dir=tmp_path / "b",
                                 checkpoint_every=10)
    assert _steps(tmp_path / "b") == [10, 20, 25]
    jax.tree_util.tree_map(np.testing.assert_array_equal, resumed.params, full.params)
    np.testing.assert_array_equal(resumed.rng, full.rng)


@pytest.mark.slow
def test_rl_killed_before_a_checkpoint_resumes_bit_identical(tmp_path, monkeypatch):
    model = models.EncoderDecoderModel(network.T5Config(
        vocab_size=4096, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32,
        num_encoder_layers=1, num_decoder_layers=1, mlp_activations=("gelu", "linear"),
        logits_via_embedding=False, dropout_rate=0.0))
    ref = model.init(jax.random.PRNGKey(0))
    kwargs = dict(model=model, params_ref=ref, reward=rewards.length_reward(),
                  config=rl.RLConfig(beta=0.1, max_decode_len=4), task_name="xsum_bundled",
                  feature_lengths={"inputs": 16, "targets": 8}, batch_size=2,
                  checkpoint_every=1, optimizer=rl.make_optimizer(policy_learning_rate=1e-2))
    full = rl.train_rl(str(tmp_path / "full"), num_steps=3, **kwargs)
    original = trainer.Checkpointer.save

    def killed_at_step_2(self, state):
        if int(state.step) == 2:
            raise KeyboardInterrupt
        original(self, state)

    monkeypatch.setattr(trainer.Checkpointer, "save", killed_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        rl.train_rl(str(tmp_path / "b"), num_steps=3, **kwargs)
    monkeypatch.setattr(trainer.Checkpointer, "save", original)
    resumed = rl.train_rl(str(tmp_path / "b"), num_steps=3, **kwargs)
    assert not np.array_equal(full["decoder"]["logits_dense"]["kernel"],
                              ref["decoder"]["logits_dense"]["kernel"])
    jax.tree_util.tree_map(np.testing.assert_array_equal, resumed, full)
    assert _steps(tmp_path / "b") == [1, 2, 3]


# ------------------------------------------------------------------ defect 5


def test_resuming_under_changed_settings_is_refused_unless_allowed(tmp_path):
    def run(num_steps, learning_rate, batch_size=8, allow=False):
        gin.clear_config()
        gin.parse_config(f"trainer.make_schedule.learning_rate = {learning_rate}\n"
                         f"trainer.train_loop.allow_changed_settings = {allow}")
        try:
            return trainer.train_loop(*toy(), num_steps=num_steps, model_dir=tmp_path,
                                      checkpoint_every=5, settings={"batch_size": batch_size})
        finally:
            gin.clear_config()

    run(5, 0.1)
    with pytest.raises(trainer.ChangedSettingsError,
                       match=r"trained to step 5 under other settings; changed: "
                             r"dera_t5x\.training\.trainer\.make_schedule\.learning_rate: "
                             r"0\.1 -> 0\.05\. "
                             r".*allow_changed_settings=True"):
        run(10, 0.05)
    with pytest.raises(trainer.ChangedSettingsError, match=r"changed: batch_size: 8 -> 4"):
        run(10, 0.1, batch_size=4)
    with pytest.raises(trainer.ChangedSettingsError):  # a finished dir too
        run(5, 0.05)
    assert trainer.Checkpointer(tmp_path).latest_step() == 5
    run(10, 0.1)  # num_steps may grow
    run(15, 0.05, allow=True)
    assert trainer.Checkpointer(tmp_path).latest_step() == 15
    config = (tmp_path / "config.gin").read_text()
    assert [line.split(",")[0] for line in config.splitlines() if "dera-t5x start" in line] == [
        "# ---- dera-t5x start 1", "# ---- dera-t5x start 2", "# ---- dera-t5x start 3"]
    assert "learning_rate = 0.1" in config and "learning_rate = 0.05" in config
    run(15, 0.05)  # the allowed settings are now the dir's


def test_rl_resumes_with_the_rollout_cut_changed_but_not_with_another_beta(tmp_path):
    """`RLConfig.chunk_size`, `response_bucket` and `encode_prompts_once` change
    how a step is computed, not what (`trainer.RESUMABLE_CHANGES`): a run recorded before they existed
    resumes with them on; another beta is still refused."""
    config = network.T5Config(**{**SMALL.__dict__, "vocab_size": 4096})  # the task's ids
    model = models.EncoderDecoderModel(config)
    kwargs = dict(model=model, params_ref=model.init(jax.random.PRNGKey(0)),
                  reward=rewards.length_reward(),
                  task_name="xsum_bundled", feature_lengths={"inputs": 8, "targets": 4},
                  batch_size=2, checkpoint_every=1)
    rl.train_rl(str(tmp_path), num_steps=1,
                config=rl.RLConfig(beta=0.1, max_decode_len=4, num_samples=2), **kwargs)
    recorded = json.loads((tmp_path / "run_settings.json").read_text())
    for name in ("chunk_size", "response_bucket", "encode_prompts_once"):  # as an older
        del recorded["args"]["config"][name]                              # version recorded it
    (tmp_path / "run_settings.json").write_text(json.dumps(recorded))
    rl.train_rl(str(tmp_path), num_steps=2, config=rl.RLConfig(
        beta=0.1, max_decode_len=4, chunk_size=2, response_bucket=2, num_samples=2,
        encode_prompts_once=True), **kwargs)
    assert trainer.Checkpointer(tmp_path).latest_step() == 2
    with pytest.raises(trainer.ChangedSettingsError,
                       match=r"changed: config\.beta: 0\.1 -> 0\.2\. Use"):
        rl.train_rl(str(tmp_path), num_steps=3,
                    config=rl.RLConfig(beta=0.2, max_decode_len=4, num_samples=2), **kwargs)


def test_sft_and_rl_refuse_a_zero_batch_size_before_writing(tmp_path):
    with pytest.raises(ValueError, match=r"sft\.train_sft\.batch_size must be an integer >= 1, "
                                         r"got 0.*--gin\.sft\.train_sft\.batch_size"):
        sft.train_sft(str(tmp_path), model_config=SMALL, task_name="xsum_bundled",
                      feature_lengths={"inputs": 8, "targets": 4}, batch_size=0)
    model = models.EncoderDecoderModel(SMALL)
    with pytest.raises(ValueError, match=r"rl\.train_rl\.batch_size must be an integer >= 1"):
        rl.train_rl(str(tmp_path), model=model, params_ref=_random_params(SMALL),
                    reward=rewards.length_reward(), task_name="xsum_bundled",
                    feature_lengths={"inputs": 8, "targets": 4}, batch_size=0)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ defect 6


@pytest.mark.parametrize("module, flags, message", [
    ("train.sft", ["--gin_file=gin/runs/sft_tiny.gin", "--gin.sft.train_sft.batch_size=0"],
     r"error: sft\.train_sft\.batch_size must be an integer >= 1, got 0"),
    ("dera_t5x.reproduce", ["--gin_file=gin/reproduce/length_reward_tiny.gin",
                            "--gin.reproduce.run.lambdas=(0.0, 2.0)"],
     r"error: lambdas must include 1"),
])
def test_a_cli_user_error_is_one_line(tmp_path, module, flags, message):
    out = tmp_path / "out"
    dir_flag = "--output_dir" if module == "dera_t5x.reproduce" else "--model_dir"
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    command = [sys.executable, "-m", module, *flags, f"{dir_flag}={out}"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 1, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert re.match(message, errors[0]), errors[0]
    assert not out.exists() or not (set(os.listdir(out)) & {"config.gin", "tensorboard"})
    if module == "train.sft":  # asked for, the traceback is shown
        result = subprocess.run(command + ["--traceback"], cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode != 0 and "Traceback" in result.stderr


def test_user_error_lines_drop_gins_context():
    error = ValueError("batch_size must be >= 1.\n  In call to configurable 'train_sft' (<f>)")
    assert gin_utils.user_error_line(error) == "error: batch_size must be >= 1."


# ------------------------------------------------------------------ defect 7


def test_bad_tokens_and_temperatures_are_refused_before_compiling():
    model = models.EncoderDecoderModel(SMALL)
    params = _random_params(SMALL)
    kwargs = dict(max_decode_len=4, rng=jax.random.PRNGKey(0))
    good = np.array([[5, 6, 1, 0], [7, 1, 0, 0]], np.int32)
    for bad, match in ((good.astype(np.float32), "integer token ids, got dtype float32"),
                       (good - 6, r"ids in \[0, 50\).*from -6"),
                       (good + 45, r"ids in \[0, 50\).*to 52"),
                       (jnp.asarray(good) * 10, r"ids in \[0, 50\)")):
        for call in (lambda: realign.dera_decode(model, params, params, bad, 0.5, **kwargs),
                     lambda: realign.dera_sweep(model, params, params, bad, np.ones(2),
                                                **kwargs)):
            with pytest.raises(ValueError, match=match):
                call()
    for temperature in (np.inf, np.array([1.0, np.inf])):
        with pytest.raises(ValueError, match="temperature must be >= 0 and finite"):
            realign.dera_decode(model, params, params, good, 0.5, temperature=temperature,
                                **kwargs)
    with pytest.raises(ValueError, match="max_decode_len must be an integer >= 1"):
        realign.dera_sweep(model, params, params, good, np.ones(2), max_decode_len=-1,
                           rng=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="lam must be a number"):
        realign.dera_decode(model, params, params, good, "half", **kwargs)


def test_temperatures_too_small_to_divide_by_are_greedy_per_row():
    table = jax.random.normal(jax.random.PRNGKey(3), (16, 16)) * 3.0

    def bigram(tokens, cache):
        return table[tokens], cache, {}

    def run(temperature):
        return decoding.sample(bigram, None, jax.random.PRNGKey(0), batch_size=4,
                               max_decode_len=12, eos_id=99, start_id=jnp.arange(4) + 2,
                               temperature=temperature)

    greedy = run(0.0)
    mixed = jax.jit(run)(jnp.array([1e-30, 1e-5, 0.0, 1.0]))  # traced: chosen per row
    np.testing.assert_array_equal(mixed.tokens[:3], greedy.tokens[:3])
    assert np.all(np.isfinite(mixed.log_probs))
    assert not np.array_equal(mixed.tokens[3], greedy.tokens[3])
    assert decoding.is_greedy(1e-30) and decoding.is_greedy(np.array([0.0, 1e-4]))
    assert not decoding.is_greedy(np.array([0.0, 2e-4]))
    np.testing.assert_array_equal(run(1e-30).tokens, greedy.tokens)


# ------------------------------------------------------------------ defect 2

# The micro pipeline of tests/test_reproduce.py, shorter: the cache is tested, not the trend.
TINY_PIPELINE = [
    "network.T5Config.emb_dim = 16", "network.T5Config.num_heads = 2",
    "network.T5Config.head_dim = 8", "network.T5Config.mlp_dim = 32",
    "network.T5Config.num_encoder_layers = 1", "network.T5Config.num_decoder_layers = 1",
    "TASK_FEATURE_LENGTHS = {'inputs': 16, 'targets': 6}",
    "sft.train_sft.num_steps = 2", "sft.train_sft.eval_every = 0",
    "sft.train_sft.eval_split = None", "sft.train_sft.batch_size = 4",
    "rl.train_rl.num_steps = 1", "rl.train_rl.batch_size = 2", "rl.RLConfig.num_samples = 1",
    "reproduce.run.beta = 1.0", "reproduce.run.max_decode_len = 6",
    "reproduce.run.max_eval_examples = 4", "reproduce.run.eval_batch_size = 4",
    "reproduce.run.num_eval_samples = 1",
    "distill.train_distill.num_steps = 2", "distill.train_distill.batch_size = 2",
    "distill.train_distill.checkpoint_every = 2",
]


def _pipeline(out, *bindings):
    gin.clear_config()
    try:
        gin_utils.parse(["gin/reproduce/length_reward_tiny.gin"], TINY_PIPELINE + list(bindings))
        return reproduce.run(str(out))
    finally:
        gin.clear_config()


@pytest.mark.slow
def test_the_pipeline_cache_follows_the_settings(tmp_path):
    first = _pipeline(tmp_path, "reproduce.run.lambdas = (0.0, 1.0, 2.0)")
    assert [row["lambda"] for row in first["dera"]] == [0.0, 1.0, 2.0]
    sft_checkpoint = trainer.Checkpointer(tmp_path / "sft").all_steps()
    # Another lambda grid: the report's rows are that grid; SFT and the base RL are reused.
    second = _pipeline(tmp_path, "reproduce.run.lambdas = (0.0, 1.0, 4.0)")
    for key in ("dera", "retrained"):
        assert [row["lambda"] for row in second[key]] == [0.0, 1.0, 4.0]
    assert second["lambdas"] == [0.0, 1.0, 4.0]
    assert {row["lambda"] for row in second["selection"]["validation"]} == {0.0, 1.0, 4.0}
    assert second["dera"][:2] == first["dera"][:2]  # same models, same samples
    assert not list(tmp_path.glob("*.stale-*"))
    assert (tmp_path / "sft" / "config.gin").read_text().count("dera-t5x start") == 1
    assert trainer.Checkpointer(tmp_path / "sft").all_steps() == sft_checkpoint
    # Timings accumulate over the runs of the folder.
    for name, seconds in first["timings_s"].items():
        assert second["timings_s"][name] == pytest.approx(
            seconds + second["timings_this_run_s"].get(name, 0.0))
    # An RL setting changes: the RL stages, and the TrRa student distilled from the base
    # RL model, are trained again; SFT is not.
    third = _pipeline(tmp_path, "reproduce.run.lambdas = (0.0, 1.0)",
                      "rl.make_optimizer.policy_learning_rate = 3e-3")
    stale = sorted(p.name.split(".stale-")[0] for p in tmp_path.glob("*.stale-*"))
    assert stale == ["distill_lambda_2", "rl_beta_1"]
    assert (tmp_path / "rl_beta_0.25").is_dir()  # not part of this run: left alone
    assert third["dera"][0] == second["dera"][0]  # lambda 0 is the (same) SFT model
    assert third["dera"][1] != second["dera"][1]  # the base model was trained again
