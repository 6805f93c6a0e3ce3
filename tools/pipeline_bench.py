"""Pipelining, side by side in one run: a model optimized for `objective="throughput"` on a pool of two one-thread
stand-in members, run over a stream of batches with its stages pipelined (`opt.map`) and without (one call after
another), and what `dioe.optimize` kept after its race (one engine over the whole graph, where the split did not
win there). Interleaved repeats; the median of each. Prints a table and writes it as Markdown.

    python tools/pipeline_bench.py [--width 1024] [--layers 8] [--batch 64] [--batches 16] [--repeats 7]
                                   [--out bench/results/pipeline/NAME.md]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import dioe
from dioe.devices import CpuInfo
from dioe.files import write_text
from dioe.text import table

ROOT = Path(__file__).resolve().parent.parent
POOL = ROOT / "tests" / "pools" / "standin-pair.yaml"


def wide_mlp(width: int, layers: int) -> torch.nn.Module:
    """Equal layers: the planner can cut them into two stages of equal work."""
    torch.manual_seed(0)
    mods = []
    for _ in range(layers):
        mods += [torch.nn.Linear(width, width), torch.nn.GELU()]
    return torch.nn.Sequential(*mods).eval()


def planned(model, x, pool, cache: Path, objective: str) -> dioe.Optimized:
    """The partitioner's own plan for `objective`, compiled and verified, before any race: `optimize`'s steps 1 to
    6. The race may then keep one engine over the whole graph instead; this is the plan it judged."""
    from dioe import build as building
    from dioe.capture import capture
    from dioe.pipeline import check_backends
    from dioe.planner import Job, assign_for, edges_of, make_plan
    from dioe.profile import profile_segments
    from dioe.segment import segment_graph
    from dioe.settings import Settings
    from dioe.split import split_graph

    settings = Settings(cache_dir=cache)
    backends = check_backends(("onnxruntime",), settings)
    captured = capture(model, (x,), None, name="wide-mlp")
    segments = segment_graph(captured.gm, target=settings.segment_target, max_segments=settings.segment_max,
                             min_share=settings.segment_min_share)
    where = {n: s.id for s in segments for n in s.nodes}
    program = split_graph(captured.gm, lambda node: where[node.name], captured.example_inputs)
    profile = profile_segments(program.partitions, segments, pool, backends, graph_hash=captured.structure_hash(),
                               cache_dir=cache, progress=False)
    job = Job(captured, tuple(segments), edges_of(program, captured), profile, pool, objective, True, settings)
    plan = make_plan(job, assign_for(job))
    return building.verify(building.build(captured, plan, pool, settings=settings, objective=objective),
                           settings=settings)


def stream_s(run, batches) -> tuple[float, float]:
    """Wall seconds of one stream, and the CPU seconds this process spent in it: their ratio is how many cores
    the stream got (the bound of what overlap can gain on a shared machine)."""
    t0, c0 = time.perf_counter(), time.process_time()
    run(batches)
    return time.perf_counter() - t0, time.process_time() - c0


def verdict(samples: dict, cores: dict, order: list) -> str:
    """What the run says about pipelining, in words, from its own numbers."""
    piped, plain = (statistics.median(samples[k]) for k in order[:2])
    cp, cs = (statistics.median(cores[k]) for k in order[:2])
    line = (f"Pipelined against not, same plan: {piped / plain:.2f}x the batches per second, with {cp:.2f} against "
            f"{cs:.2f} cores busy. ")
    if cp < 1.2:
        return line + ("The stream never had a second core to itself: the two stages could only take turns on the "
                       "share of the machine this process got, so overlap had little to gain; any difference "
                       "follows the share of the busy scheduler each stream drew (cores busy).")
    return line + "With the cores free, the two stages ran at once; the bound is 2x (two one-thread stages)."


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--batches", type=int, default=16, help="batches per timed stream")
    ap.add_argument("--repeats", type=int, default=7, help="interleaved repeats of each contender")
    ap.add_argument("--depth", type=int, default=4, help="batches in flight when pipelined")
    ap.add_argument("--out", type=Path, default=None, help="Markdown file for the results")
    ap.add_argument("--load", default="", help="a line on the machine's load during the run, for the results")
    args = ap.parse_args(argv)

    model = wide_mlp(args.width, args.layers)
    x = torch.randn(args.batch, args.width)
    pool = dioe.ResourcePool.discover(POOL)
    cache = Path(tempfile.mkdtemp(prefix="dioe-pipeline-bench-"))
    t0 = time.perf_counter()
    raced = dioe.optimize(model, (x,), hardware=pool, backends=("onnxruntime",), objective="throughput",
                          cache_dir=cache, precision="fp32")
    print(f"-- dioe.optimize(objective='throughput'), raced ({time.perf_counter() - t0:.1f} s)")
    print(raced.plan.summary())
    thr = planned(model, x, pool, cache, "throughput")
    print("-- the partitioner's throughput plan, before the race")
    print(thr.plan.summary())
    opts = {"raced": raced, "planned": thr}
    batches = [(x + 0.01 * i,) for i in range(args.batches)]
    with torch.inference_mode():
        expected = [model(*b) for b in batches]
    got = list(thr.map(batches, depth=args.depth))
    worst = max(float((g - e).abs().max() / e.abs().max()) for g, e in zip(got, expected))
    contenders = {
        "two-stage plan, pipelined (opt.map)": lambda bs: list(thr.map(bs, depth=args.depth)),
        "two-stage plan, one call after another": lambda bs: [thr(*b) for b in bs],
        "race winner, one call after another": lambda bs: [raced(*b) for b in bs],
    }
    for run in contenders.values():   # warm every engine and the pipeline's threads
        run(batches[:2])
    samples: dict[str, list[float]] = {k: [] for k in contenders}
    cores: dict[str, list[float]] = {k: [] for k in contenders}
    order = list(contenders)
    for r in range(args.repeats):
        for k in order[r % len(order):] + order[:r % len(order)]:
            wall, cpu = stream_s(contenders[k], batches)
            samples[k].append(args.batches / wall)
            cores[k].append(cpu / wall)
    base = statistics.median(samples[order[1]])
    rows = [[k, f"{statistics.median(v):.2f}", f"{min(v):.2f}-{max(v):.2f}",
             f"{statistics.median(v) * args.batch:.0f}", f"{statistics.median(v) / base:.2f}x",
             f"{statistics.median(cores[k]):.2f}"] for k, v in samples.items()]
    head = ["contender", "batches/s (median)", "range", "rows/s", "vs not pipelined", "cores busy (median)"]
    stages = thr.plan.stages
    cpu = CpuInfo.read()
    lines = [
        "# Pipelining across two stand-in members",
        "",
        f"Command: `python tools/pipeline_bench.py --width {args.width} --layers {args.layers} --batch {args.batch} "
        f"--batches {args.batches} --repeats {args.repeats} --depth {args.depth}`  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M:%S %z')}  ",
        f"Machine: {cpu.name}, {cpu.usable_cores} cores, {cpu.machine}; ISA: "
        f"{', '.join(sorted(f for f in cpu.flags if f.startswith(('avx', 'amx', 'fma'))))}; torch {torch.__version__}, "
        f"dioe {dioe.__version__}  ",
        *([f"Load: {args.load}  "] if args.load else []),
        f"Pool: `{POOL.relative_to(ROOT)}` (two members of one thread each, ONNX Runtime on both)  ",
        f"Model: {args.layers} x (Linear {args.width}x{args.width}, GELU), batch {args.batch}; outputs of the "
        f"pipelined stream against eager: worst relative error {worst:.1e}",
        "",
        "## Plans",
        "",
        "The partitioner's plan for `objective=\"throughput\"` (before the race), which the table runs:",
        "",
        "```",
        thr.plan.summary(),
        "```",
        "",
        "What `dioe.optimize(..., objective=\"throughput\")` kept after racing it as a stream against each engine "
        "over the whole graph, on this machine at this load:",
        "",
        "```",
        raced.plan.summary(),
        "```",
        "",
        f"## Throughput: {args.batches} batches per stream, {args.repeats} interleaved repeats, median",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
        *("| " + " | ".join(r) + " |" for r in rows),
        "",
        "*cores busy*: this process's CPU seconds over wall seconds while the stream ran: how much of the machine "
        "the contender got. Two one-thread stages can at most double throughput, and only while two cores are "
        "free for them.",
        "",
        verdict(samples, cores, order),
        "",
        f"Stages of the throughput plan: {len(stages)}"
        + (": " + " -> ".join(f"{s.member} [{', '.join(s.partitions)}] {s.predicted_ms} ms" for s in stages)
           if stages else ""),
    ]
    print(table(rows, head))
    if args.out:
        write_text(args.out, "\n".join(lines) + "\n")
        print(f"wrote {args.out}")
    for o in opts.values():
        o.runtime.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
