"""One epoch on the full Fashion-MNIST through the real CLI: the whole pipeline learns real data.

The long recipes (experiment=fashion_seed / fashion_cnn / fashion_resnet) are measured by
benchmarks/accuracy.py, not here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import run_cli, run_dirs, summary

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.slow
@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason=f"{FASHION_DIR} missing (apt-get install dataset-fashion-mnist)")
def test_one_epoch_of_full_fashion_mnist_is_well_above_chance(tmp_path):
    # One thread: the run takes about half a minute on 2 idle cores either way, and a busy
    # machine slows a two-thread pool down far more than it slows one thread.
    proc = run_cli(
        ["fit", "experiment=fashion_fast", "trainer.epochs=1", "trainer.num_threads=1"], tmp_path, timeout=900
    )
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = run_dirs(tmp_path)
    s = summary(run_dir)
    assert s["status"] == "completed" and s["epochs_done"] == 1
    assert s["global_step"] == 211  # 54,000 training images in batches of 256: the whole set was used
    assert s["test_acc"] > 0.8, s  # chance is 0.1; one epoch of the seed CNN gets about 0.85
