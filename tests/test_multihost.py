"""The decode job as a real multi-host job: two processes (jax.distributed on CPU over
localhost, 4 simulated devices each) write what one process writes, and a restart
after a kill resumes with every (input, lambda) row once."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import textwrap
import time

import jax
import pytest

import t5_factories

from dera_t5x import checkpoints
from dera_t5x import decode_job
from dera_t5x import models
from dera_t5x.data import tasks  # noqa: F401  (registers the tasks)

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = t5_factories.TINY
SETTINGS = dict(lambdas="0,0.5,1,2", batch_size=2, max_decode_len=8, inputs_length=32,
                temperature=1.0, seed=3)
NUM_INPUTS = 48

_PROCESS = textwrap.dedent("""
    import json, sys
    from dera_t5x import decode_job, partitioning
    from dera_t5x.data import tasks  # registers the tasks
    from dera_t5x.models.t5 import network

    root, output, port, process, settings, config = sys.argv[1:]
    partitioning.initialize_distributed(True, f"localhost:{port}", 2, int(process))
    decode_job.run(f"{root}/ref", f"{root}/aligned", output, input_file=f"{root}/in.jsonl",
                   model_config=network.T5Config(**json.loads(config)), mesh_shape=(2, 4),
                   **json.loads(settings))
    print("done", process)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start(root: pathlib.Path, output: pathlib.Path) -> list[subprocess.Popen]:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    port = _free_port()
    return [subprocess.Popen(
        [sys.executable, "-c", _PROCESS, str(root), str(output), str(port), str(process),
         json.dumps(SETTINGS), json.dumps(CONFIG.__dict__)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for process in (0, 1)]


def _finish(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        out, err = process.communicate(timeout=600)
        assert process.returncode == 0, err[-3000:]
        assert "done" in out


def _rows(path: pathlib.Path) -> list[tuple]:
    lines = path.read_text(encoding="utf-8").splitlines()[1:]
    return [(r["index"], r["lambda"], tuple(r["token_ids"])) for r in map(json.loads, lines)]


@pytest.mark.slow
def test_two_processes_write_what_one_writes_and_resume_after_a_kill(tmp_path):
    for name, seed in (("ref", 1), ("aligned", 2)):
        checkpoints.save_params(tmp_path / name, models.EncoderDecoderModel(CONFIG).init(
            jax.random.PRNGKey(seed)))
    (tmp_path / "in.jsonl").write_text("".join(
        json.dumps({"document": f"Story {i}: the council met on day {i % 7}."}) + "\n"
        for i in range(NUM_INPUTS)))
    one = tmp_path / "one.jsonl"
    decode_job.run(str(tmp_path / "ref"), str(tmp_path / "aligned"), str(one),
                   input_file=str(tmp_path / "in.jsonl"), model_config=CONFIG, **SETTINGS)
    want = _rows(one)
    assert len(want) == NUM_INPUTS * 4

    two = tmp_path / "two.jsonl"
    _finish(_start(tmp_path, two))
    assert _rows(two) == want

    # Kill one process once a few batches are in the file, then the other; restart.
    killed = tmp_path / "killed.jsonl"
    processes = _start(tmp_path, killed)
    deadline = time.time() + 600
    while time.time() < deadline:
        if killed.exists() and killed.read_bytes().count(b"\n") > 1 + 3 * 2 * 4:
            break
        assert processes[1].poll() is None, processes[1].communicate()[1][-3000:]
        time.sleep(0.01)
    processes[1].send_signal(signal.SIGKILL)
    processes[0].send_signal(signal.SIGKILL)
    for process in processes:
        process.communicate(timeout=60)
    written = killed.read_bytes().count(b"\n") - 1  # complete records after the header
    assert written < len(want), "the kill came after the end; use more inputs"
    _finish(_start(tmp_path, killed))
    rows = _rows(killed)
    assert rows == want  # every (input, lambda) once, in order, as one process wrote it
