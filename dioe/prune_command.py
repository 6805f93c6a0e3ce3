"""`dioe prune`, and `tools/prune.py` with the seed project's flags: one parser for both.

    dioe prune MODEL --target-sparsity 0.5 --pruning-strategy magnitude|l2|taylor --steps 5 --output-dir DIR
               [--recover-steps K] [--calibration N] [--budget TEXT] [--batches 1 8] [--small]
"""

from __future__ import annotations

import argparse

from .prune import PRUNABLE_ZOO, STRATEGIES


def add_arguments(p: argparse.ArgumentParser, *, model_flag: bool = False) -> None:
    """The options of a pruning run; `model_flag`: the model is `--model NAME` (the seed's form), not positional."""
    if model_flag:
        p.add_argument("--model", required=True, help=f"zoo model to prune: {', '.join(PRUNABLE_ZOO)}")
    else:
        p.add_argument("model", help=f"zoo model to prune: {', '.join(PRUNABLE_ZOO)}")
    # type=float, not a choice list: a value outside (0, 1) gets DIOE's error, which says what the number means
    p.add_argument("--target-sparsity", type=float, required=True,
                   help="fraction of the prunable layers' parameters removed at the last stage, in (0, 1)")
    p.add_argument("--pruning-strategy", default="magnitude",
                   help=f"how channels are ranked: {', '.join(STRATEGIES)} (default magnitude)")
    p.add_argument("--steps", type=int, default=5, help="progressive stages (default 5)")
    p.add_argument("--output-dir", default="pruned_models", help="where stages and the report go")
    p.add_argument("--recover-steps", type=int, default=0,
                   help="Adam steps of distillation against the dense model after each stage (default 0: none)")
    p.add_argument("--calibration", type=int, default=32,
                   help="input rows Taylor ranking and recovery distil on (default 32)")
    p.add_argument("--budget", metavar="BUDGET",
                   help="accuracy budget a stage must meet to fit, e.g. 'cosine>=0.99' (default: the one "
                        "dioe.Budget.default_for picks for the output)")
    p.add_argument("--batches", type=int, nargs="*", default=[1, 8],
                   help="batch sizes DIOE's latency is measured at (default 1 8; none: skip optimizing)")
    p.add_argument("--backends", nargs="+", help="restrict DIOE's backends (default: all it finds)")
    p.add_argument("--timing-s", type=float, default=3.0, help="seconds of timed calls per stage and batch")
    p.add_argument("--round-to", type=int, metavar="N",
                   help="channel counts left are multiples of N (default: this CPU's fp32 vector width, 8 with "
                        "AVX2, 16 with AVX-512; 1 for exact ratios)")
    p.add_argument("--small", action="store_true", help="the zoo model's small variant (fewer layers)")


def run(args: argparse.Namespace) -> int:
    from .prune import prune

    prune(args.model, target_sparsity=args.target_sparsity, strategy=args.pruning_strategy, steps=args.steps,
          output_dir=args.output_dir, size="small" if args.small else "full", recover_steps=args.recover_steps,
          calibration=args.calibration, budget=args.budget, batches=tuple(args.batches), backends=args.backends,
          timing_s=args.timing_s, round_to=args.round_to)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("prune", help="prune a model progressively and measure every stage under DIOE")
    add_arguments(p)
    p.set_defaults(fn=run)


__all__ = ["add_arguments", "add_parser", "run"]
