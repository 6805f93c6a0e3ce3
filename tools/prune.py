"""Progressive structured pruning with the seed project's flags; the same run as `dioe prune`.

    python tools/prune.py --model bert-base --target-sparsity 0.5 --pruning-strategy magnitude \
        --output-dir ./pruned_models [--steps 5] [--recover-steps K] [--small]
"""

from __future__ import annotations

import argparse
import sys
import warnings

from dioe.errors import DIOEError
from dioe.prune_command import add_arguments, run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(ap, model_flag=True)
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        return run(args)
    except DIOEError as e:
        print(f"prune: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
