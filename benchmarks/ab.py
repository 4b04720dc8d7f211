"""A/B two checkouts of cnntrain: the same fit, alternating between them, to show that a change (a refactor)
did not make training slower.

Each round runs the fit once with each checkout's code, in turn and in alternating order (A B, B A, ...), in
fresh processes on the same machine, so slow drift of a shared host falls on both alike. It reports the
training images/s of the last epoch (what `benchmarks/run.py` calls steady), the wall time of the whole
command, and B's median as a ratio of A's. Fits run with `trainer.figures=off` unless the overrides say
otherwise: a background drawer would still be running during the next round. Run it on a quiet machine.

    python benchmarks/ab.py --a ../main-before --b . --rounds 4
    python benchmarks/ab.py --a ../before --b . -- experiment=smoke trainer.epochs=3   # another fit

Without overrides it runs `experiment=fashion_fast trainer.epochs=2` (full Fashion-MNIST when installed).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as suite  # noqa: E402  (benchmarks/run.py: the fit runner and the machine line)

DEFAULT_FIT = ["experiment=fashion_fast", "trainer.epochs=2"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--a", type=Path, required=True, help="the checkout to compare against (before)")
    ap.add_argument("--b", type=Path, required=True, help="the checkout under test (after)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("overrides", nargs="*", help="the fit's overrides (after --)")
    args = ap.parse_args()
    fit = args.overrides or DEFAULT_FIT
    checkouts = {"A": args.a.resolve(), "B": args.b.resolve()}
    for name, path in checkouts.items():
        if not (path / "cnntrain" / "__init__.py").is_file():
            ap.error(f"--{name.lower()} {path}: no cnntrain package there")
    measured: dict[str, list[tuple[float, float]]] = {"A": [], "B": []}
    print(f"machine: {suite.machine()}\nfit: {' '.join(fit)}", flush=True)
    with tempfile.TemporaryDirectory(prefix="cnntrain-ab-", ignore_cleanup_errors=True) as tmp:
        for r in range(args.rounds):
            for name in ("A", "B") if r % 2 == 0 else ("B", "A"):
                work = Path(tmp) / f"{name}{r}"
                work.mkdir()
                # Each checkout's own code, and its own empty probe cache, as on a first run.
                env = {"PYTHONPATH": str(checkouts[name]), "XDG_CACHE_HOME": str(work / "cache")}
                summary, rows, wall, _ = suite.cnntrain_fit(fit, work, env=env)
                measured[name].append((suite.steady_ips(rows), wall))
                # The layout/chunk probe decides per run: a different verdict explains a different figure.
                chose = ", ".join(f"{k} {v}" for k, v in summary.get("tuning", {}).items())
                print(
                    f"round {r + 1} {name}: {measured[name][-1][0]:,.0f} img/s, {wall:.1f} s wall ({chose})", flush=True
                )
    med = {n: (statistics.median(f[0] for f in v), statistics.median(f[1] for f in v)) for n, v in measured.items()}
    print(f"\nA {checkouts['A']}\nB {checkouts['B']}")
    for n in ("A", "B"):
        print(
            f"{n}: median {med[n][0]:,.0f} img/s (rounds: {', '.join(f'{f[0]:,.0f}' for f in measured[n])}), "
            f"median wall {med[n][1]:.1f} s"
        )
    print(f"B/A: images/s {med['B'][0] / med['A'][0]:.3f}, wall {med['B'][1] / med['A'][1]:.3f}")


if __name__ == "__main__":
    main()
