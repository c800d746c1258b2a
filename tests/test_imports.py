"""The core imports without TensorFlow or seqio (the accelerator machines have neither)."""

import pathlib
import subprocess
import sys
import textwrap

REPO = pathlib.Path(__file__).resolve().parents[1]

_BLOCKED = textwrap.dedent("""
    import sys
    for name in ("tensorflow", "seqio", "tensorflow_datasets", "tensorflow_text"):
        sys.modules[name] = None  # any import of them now raises ImportError
    import dera_t5x.models, dera_t5x.decoding, dera_t5x.realign, dera_t5x.partitioning
    import dera_t5x.checkpoints, dera_t5x.batching, dera_t5x.jsonl
    import dera_t5x.training.trainer, dera_t5x.training.rl, dera_t5x.training.reward_model
    import dera_t5x.training.rewards, dera_t5x.training.scalar_head
    sys.path.insert(0, ".")
    import bench.common, bench.decode, bench.train
    print("imported")
""")


def test_core_and_bench_import_without_tensorflow_or_seqio():
    result = subprocess.run([sys.executable, "-c", _BLOCKED], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "imported" in result.stdout
    # The block is real: the data layer needs TensorFlow and fails to import under it.
    result = subprocess.run([sys.executable, "-c", _BLOCKED.replace(
        'print("imported")', "import dera_t5x.data.pipeline")], cwd=REPO, capture_output=True,
        text=True, timeout=300)
    assert result.returncode != 0 and "import of seqio halted" in result.stderr
