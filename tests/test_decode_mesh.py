"""The decode job and DeRa on a device mesh (8 simulated CPU devices) match one device."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import pytest

import t5_factories

from dera_t5x import checkpoints
from dera_t5x import decode_job
from dera_t5x import models
from dera_t5x import partitioning
from dera_t5x.data import tasks  # noqa: F401  (registers the tasks)

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = t5_factories.TINY
SETTINGS = dict(lambdas="0,0.5,1,2", batch_size=8, max_decode_len=8, inputs_length=32)
DOCS = ["The cat sat on the mat.", "Rain fell all day in Cardiff. " * 12,
        "A council voted to close the library.", "Ships left the harbour at dawn. " * 12,
        "Prices rose again.", "The match ended in a draw.", "Snow closed the roads.",
        "A new bridge opened.", "The museum reopened after repairs."]
MESHES = ((4, 2), (8, 1), (2, 4))

_ON_A_MESH = textwrap.dedent("""
    import json, sys
    import jax
    from dera_t5x import decode_job
    from dera_t5x.data import tasks  # registers the tasks
    from dera_t5x.models.t5 import network

    assert jax.device_count() == 8
    root, settings, config = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
    config = network.T5Config(**config)
    for temperature in (0.0, 1.0):
        for mesh in ((4, 2), (8, 1), (2, 4)):
            decode_job.run(f"{root}/ref", f"{root}/aligned",
                           f"{root}/out_{temperature}_{mesh[0]}x{mesh[1]}.jsonl",
                           input_file=f"{root}/in.jsonl", model_config=config,
                           temperature=temperature, mesh_shape=mesh, **settings)
    try:
        decode_job.run(f"{root}/ref", f"{root}/aligned", f"{root}/bad.jsonl",
                       input_file=f"{root}/in.jsonl", model_config=config,
                       **dict(settings, batch_size=6), mesh_shape=(4, 2))
    except ValueError as e:
        assert "not divisible by the 4 devices" in str(e), e
        print("batch error ok")
""")


def _records(path: pathlib.Path) -> dict:
    lines = path.read_text(encoding="utf-8").splitlines()[1:]
    return {(r["index"], r["lambda"]): r for r in map(json.loads, lines)}


@pytest.mark.slow
def test_decode_job_on_meshes_writes_what_one_device_writes(tmp_path):
    for name, seed in (("ref", 1), ("aligned", 2)):
        checkpoints.save_params(tmp_path / name, models.EncoderDecoderModel(CONFIG).init(
            jax.random.PRNGKey(seed)))
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"document": d}) + "\n"
                                               for d in DOCS))
    for temperature in (0.0, 1.0):
        decode_job.run(str(tmp_path / "ref"), str(tmp_path / "aligned"),
                       str(tmp_path / f"one_{temperature}.jsonl"),
                       input_file=str(tmp_path / "in.jsonl"), model_config=CONFIG,
                       temperature=temperature, **SETTINGS)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-c", _ON_A_MESH, str(tmp_path), json.dumps(SETTINGS),
         json.dumps(CONFIG.__dict__)], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "batch error ok" in result.stdout
    assert not (tmp_path / "bad.jsonl").exists()
    for temperature in (0.0, 1.0):
        one = _records(tmp_path / f"one_{temperature}.jsonl")
        assert len(one) == len(DOCS) * 4
        for mesh in MESHES:
            meshed = _records(tmp_path / f"out_{temperature}_{mesh[0]}x{mesh[1]}.jsonl")
            assert meshed.keys() == one.keys()
            for key, record in one.items():
                assert meshed[key]["token_ids"] == record["token_ids"], (temperature, mesh, key)
                assert meshed[key]["mixed_log_probs"] == pytest.approx(
                    record["mixed_log_probs"], abs=1e-4)


@pytest.mark.parametrize("mesh_shape, message", [
    ((3, 2), "needs 6 devices"), ((0, 1), "positive sizes"), ((1, -1), "positive sizes"),
    ("a", "positive sizes"),
])
def test_a_mesh_the_devices_cannot_form_is_an_error(tmp_path, mesh_shape, message):
    with pytest.raises(ValueError, match=message):
        decode_job.run("unused_ref", "unused_aligned", str(tmp_path / "out.jsonl"),
                       input_file=str(tmp_path / "missing.jsonl"), model_config=CONFIG,
                       mesh_shape=mesh_shape, **SETTINGS)
    assert not (tmp_path / "out.jsonl").exists()
    with pytest.raises(ValueError, match=message):
        partitioning.Partitioner(mesh_shape)
