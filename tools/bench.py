"""DIOE against every peer engine on every zoo model, side by side, with the machine's GEMM roof.
The same as `dioe bench`; see the package dioe/bench/ for what is measured and how.

    python tools/bench.py [--quick] [--models ...] [--compare OLD.json] [--out bench/results]
"""

import sys

from dioe.bench import run

if __name__ == "__main__":
    sys.exit(run(sys.argv[1:], prog="python tools/bench.py"))
