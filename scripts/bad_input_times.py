"""Time every case of the bad-input corpus (tests/test_bad_input.py) through the real entry point.

    python scripts/bad_input_times.py [--only config] [--out table.md]

Each case runs in a fresh ``python -m lorabench.cli`` process; the table gives the line the user
sees, the wall time, and that time as a ratio to two baselines measured in the same run: a bare
``python -c "import hydra"`` and an error Hydra reports itself (``lorabench train -m method=nosuch``:
sweeps are composed by Hydra, not pre-checked by lorabench). Ratios stay meaningful on a loaded
machine where absolute seconds do not.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.test_bad_input import CASES, ERROR, materialize  # noqa: E402


def wall(argv: list[str], repeat: int = 1) -> tuple[float, str]:
    times, err = [], ""
    for _ in range(repeat):
        t0 = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        times.append(time.perf_counter() - t0)
        err = proc.stderr
    return statistics.median(times), err


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", help="stages to time (config, method, preflight, data)")
    parser.add_argument("--out", help="also write the markdown table here")
    args = parser.parse_args()
    hydra_import, _ = wall([sys.executable, "-c", "import hydra"], repeat=3)
    hydra_error, _ = wall([sys.executable, "-m", "lorabench.cli", "train", "-m", "method=nosuch"], repeat=3)
    lines = [
        f"baselines (median of 3): `python -c 'import hydra'` {hydra_import:.2f} s; "
        f"Hydra's own error (`lorabench train -m method=nosuch`) {hydra_error:.2f} s",
        "",
        "| case | stage | line the user sees | s | x import hydra | x Hydra error |",
        "|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for case in CASES:
            if args.only and case.stage not in args.only:
                continue
            argv = materialize(case, Path(tmp) / case.id)
            seconds, err = wall([sys.executable, "-m", "lorabench.cli", *argv])
            shown = next((line for line in err.splitlines() if line.startswith(ERROR)), "(no error line)")
            shown = shown.replace(tmp, "<tmp>").replace("|", "\\|")
            lines.append(
                f"| {case.id} | {case.stage} | `{shown}` | {seconds:.2f} | {seconds / hydra_import:.1f} | "
                f"{seconds / hydra_error:.1f} |"
            )
            print(lines[-1], flush=True)
    text = "\n".join(lines)
    print("\n" + text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
