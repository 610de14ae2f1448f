"""Wall time from starting ``gen_rl/train.py`` to its one-line message for a config typo.

    python bench/config_error_latency.py [--repeats 7]

Each run starts a fresh interpreter on ``configs/demo/tiny_flux_cpu.yaml`` with the typo ``train.lrr=1e-4`` and
stops the clock when the ``error:`` line arrives on stderr. For scale, the same is timed for a bare
``import torch`` (what every config error waited for before the checks ran ahead of it). Target: the median
under 1 s on an idle machine.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TYPO = ["gen_rl/train.py", "--config", "configs/demo/tiny_flux_cpu.yaml", "train.lrr=1e-4"]
TARGET_SECONDS = 1.0


def time_to_message(arguments: list[str]) -> tuple[float, str]:
    """Seconds from launching ``python <arguments>`` to its first stderr line, and that line."""
    start = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, *arguments], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    line = process.stderr.readline()
    elapsed = time.perf_counter() - start
    process.communicate()
    return elapsed, line.strip()


def time_torch_import() -> float:
    """Seconds for a fresh interpreter to ``import torch`` and exit."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    timings, message = [], ""
    for _ in range(args.repeats):
        elapsed, message = time_to_message(TYPO)
        timings.append(elapsed)
    torch_seconds = statistics.median(time_torch_import() for _ in range(3))
    median = statistics.median(timings)
    print(f"message: {message}")
    print(
        f"config typo -> message: median {median:.3f} s, min {min(timings):.3f} s, max {max(timings):.3f} s "
        f"over {args.repeats} runs (target < {TARGET_SECONDS:.0f} s: {'met' if median < TARGET_SECONDS else 'MISSED'})"
    )
    print(f"for scale, a fresh 'import torch': median {torch_seconds:.3f} s")


if __name__ == "__main__":
    main()
