"""`python -m cnntrain.io.draw RUN_DIR`: draw the end-of-fit figures that a fit left pending (figures/.pending.npz).

`cnntrain fit` starts this in the background when a run completes (trainer.figures=background); for a run trained
with trainer.figures=off, `cnntrain report RUN_DIR figures=true` draws them. It imports neither torch nor cnntrain's
engine.
"""

from __future__ import annotations

import sys
from pathlib import Path

from cnntrain.io.figures import draw_pending, figures_pending
from cnntrain.io.files import RunDir


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m cnntrain.io.draw RUN_DIR", file=sys.stderr)
        return 2
    run_dir = Path(argv[0])
    if not figures_pending(run_dir):
        print(f"{run_dir}: no figures pending (figures/.pending.npz)", file=sys.stderr)
        return 1
    draw_pending(run_dir)
    errors = RunDir(run_dir).figures / "draw.log"  # a background drawer's stderr: kept only when it says something
    if errors.is_file() and errors.stat().st_size == 0:
        errors.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
