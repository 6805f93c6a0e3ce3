"""The benchmark suite behind `dioe bench` and `tools/bench.py`: every zoo model under every peer engine and under
DIOE's plan, measured in one run, interleaved and repeated, against the machine's own GEMM roof.

    dioe bench                        # every zoo model, writes bench/results/<machine>.{json,md,png}
    dioe bench --quick                # one small model, a few minutes
    dioe bench --compare OLD.json     # also tabulate each median against an earlier run

Engines (all fp32 unless named): torch eager (the model itself), inductor (torch.compile), ONNX Runtime (CPU
provider), OpenVINO at f32 and at its own default precision (bf16 on CPUs that have it), and DIOE's fp32 plan
(`dioe.optimize`, called as `opt(*inputs)`). The compiled peers run the graph DIOE captured, through DIOE's backend
files, which call each engine's standard path (ORT: dynamo export + InferenceSession.run, its workers spinning
between calls as by default; OpenVINO: convert_model from torch.export + compile_model with the LATENCY hint);
that wrapper costs microseconds per call.
Before each engine's calls the bench waits until the previous engine's worker threads have stopped spinning, and a
GEMM canary read between every two blocks of calls catches blocks timed while something else held the cores:
those are timed again (see `Canary` and `rounds.interleaved`), and the results count them.
Each peer builds in a cache folder of its own (the two OpenVINO peers share one), so that no peer's compile time
is shortened by another's export; Inductor's caches too live in the run's folder, so that no run starts warm.

The package, by idea: `machine` (its description, GEMM roof, probe and canary), `engines` (building each engine),
`rounds` (the interleaved, canary-guarded timing), `measurement` (one model under every engine), `report` (ratios,
markdown, comparison with an earlier run, chart) and `command` (the whole run from its command line).
"""

from .command import run
from .engines import ENGINES, FP32_ENGINES, PRECISION_ENGINES, Built, build
from .machine import Canary, gemm_roof, merge_roofs
from .report import canary_text, derive, markdown, paired_ratio, ratio_changes, reproducibility

__all__ = ["ENGINES", "FP32_ENGINES", "PRECISION_ENGINES", "Built", "Canary", "build", "canary_text", "derive", "gemm_roof", "markdown", "merge_roofs",
           "paired_ratio", "ratio_changes", "reproducibility", "run"]
