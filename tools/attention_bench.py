"""Standard against linear attention on a long sequence: peak memory, latency and agreement, in one run.

A BERT-shaped encoder (bert-base's widths, seeded random weights, `max_position_embeddings` raised to the
sequence length) runs batch 1 at `--seq` tokens three ways, each in a fresh subprocess so that one variant's
memory never counts against another's:

- `eager`: transformers' eager attention, softmax(q kᵀ) materialised per layer: the textbook standard;
- `sdpa`: torch's fused `scaled_dot_product_attention`, transformers' default (and the zoo models');
- `linear`: `dioe.rewrite.swap_attention(model, "linear")`.

Peak memory is the process's peak resident set (VmHWM) during the forward passes minus its resident set just
before them, with the peak reset first (`/proc/self/clear_refs`): it counts torch's CPU allocations, which go
through malloc and never pass `tracemalloc`. Latency is the median of `--repeats` forwards after the first.
Agreement compares each variant's last hidden state with `sdpa`'s per token (`dioe.accuracy` cosine and
relative L2). With `--optimize-layers N`, each variant is also built with `dioe.optimize` (torch engine, fp32)
at N layers and timed; `--agreement-minilm` adds the same comparison on minilm, whose weights are trained.

    python tools/attention_bench.py --seq 4096 --layers 12 --name my-machine --out bench/results/attention
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

VARIANTS = ("eager", "sdpa", "linear")


# -- one variant, in its own process ------------------------------------------------------------------------------
def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    """Reset VmHWM to the current resident set (Linux >= 4.0); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _encoder(seq: int, layers: int, variant: str):
    import transformers as tf

    import dioe.rewrite

    tf.logging.set_verbosity_error()
    torch.manual_seed(0)  # the same weights in every variant's process
    cfg = tf.BertConfig(num_hidden_layers=layers, max_position_embeddings=max(512, seq))
    model = tf.BertModel(cfg, add_pooling_layer=False).eval()
    if variant == "linear":
        dioe.rewrite.swap_attention(model, "linear")
    else:
        model.set_attn_implementation(variant)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, cfg.vocab_size, (1, seq), generator=g)
    return model, (ids, torch.ones(1, seq, dtype=torch.long))


def child(args) -> dict:
    model, inputs = _encoder(args.seq, args.layers, args.child)
    times = []
    with torch.inference_mode():
        rss_before = _status_kib("VmRSS")
        reset = _reset_peak()
        for _ in range(args.repeats + 1):
            t0 = time.perf_counter()
            out = model(*inputs).last_hidden_state
            times.append(time.perf_counter() - t0)
        peak = _status_kib("VmHWM")
    if reset and rss_before is not None and peak is not None:
        memory = {"method": "VmHWM reset before the forwards, minus VmRSS before them", "rss_before_mib":
                  rss_before / 1024, "peak_mib": peak / 1024, "peak_delta_mib": (peak - rss_before) / 1024}
    else:
        import resource

        memory = {"method": "ru_maxrss, not resettable here: includes building the model",
                  "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peak_delta_mib": None}
    np.save(args.save, out[0].float().numpy())  # (T, C); .npy, read back with allow_pickle=False
    result = {"variant": args.child, "first_ms": times[0] * 1e3,
              "median_ms": statistics.median(times[1:]) * 1e3 if args.repeats else None,
              "repeats": args.repeats, "memory": memory}
    if args.optimize_layers:
        result["optimized"] = _optimized(args)
    return result


def _optimized(args) -> dict:
    import dioe

    model, inputs = _encoder(args.seq, args.optimize_layers, args.child)
    with torch.inference_mode():
        expected = model(*inputs).last_hidden_state
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = dioe.optimize(model, inputs, backends=["torch"], precision="fp32")
    build_s = time.perf_counter() - t0
    times, got = [], None
    for _ in range(max(args.repeats, 1)):
        t0 = time.perf_counter()
        got = opt(*inputs).last_hidden_state
        times.append(time.perf_counter() - t0)
    err = ((got - expected).abs().max() / expected.abs().max()).item()
    return {"layers": args.optimize_layers, "build_s": build_s, "median_ms": statistics.median(times) * 1e3,
            "max_rel_error_vs_own_eager": err}


# -- the run: every variant, then the comparison -------------------------------------------------------------------
def _agreement(ref: np.ndarray, got: np.ndarray) -> dict:
    from dioe.accuracy import cosine, rel_l2

    cos = cosine(torch.from_numpy(ref), torch.from_numpy(got))   # one value per token
    rel = rel_l2(torch.from_numpy(ref), torch.from_numpy(got))
    return {"cosine_mean": statistics.fmean(cos), "cosine_min": min(cos), "rel_l2_mean": statistics.fmean(rel),
            "rel_l2_max": max(rel)}


def _minilm_agreement() -> dict | None:
    """Linear against standard attention on minilm (trained weights, real text), on its real tokens only."""
    import dioe
    import dioe.rewrite

    try:
        model, (ids, mask) = dioe.zoo.load("minilm")
    except dioe.DIOEError as e:
        return {"skipped": str(e)}
    model.eval()
    real = mask[0].bool()
    with torch.inference_mode():
        ref = model(ids, mask).last_hidden_state[0, real]
        dioe.rewrite.swap_attention(model, "linear")
        got = model(ids, mask).last_hidden_state[0, real]
    return {"tokens": int(real.sum()), **_agreement(ref.numpy(), got.numpy())}


def _machine(name: str) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"name": name, "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average_1m_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "torch": torch.__version__}


def run(args) -> dict:
    results = {"seq": args.seq, "layers": args.layers, "batch": 1, "machine": _machine(args.name), "variants": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in VARIANTS:
            save = Path(tmp) / f"{variant}.npy"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", variant, "--seq", str(args.seq),
                   "--layers", str(args.layers), "--repeats", str(args.repeats), "--save", str(save),
                   "--optimize-layers", str(args.optimize_layers)]
            print(f"{variant}: {args.layers} layers at {args.seq} tokens ...", flush=True)
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"{variant} failed:\n{done.stderr[-4000:]}")
            results["variants"][variant] = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"  {json.dumps(results['variants'][variant])}", flush=True)
        ref = np.load(Path(tmp) / "sdpa.npy", allow_pickle=False)
        for variant in VARIANTS:
            got = np.load(Path(tmp) / f"{variant}.npy", allow_pickle=False)
            results["variants"][variant]["agreement_vs_sdpa"] = _agreement(ref, got)
    if args.agreement_minilm:
        results["minilm_linear_vs_sdpa"] = _minilm_agreement()
    return results


def _fmt(x, digits=1) -> str:
    return "–" if x is None else f"{x:,.{digits}f}"


def _change(x: float, base: float) -> str:
    return f"{100 * (1 - x / base):.0f}% below" if x <= base else f"{100 * (x / base - 1):.0f}% above"


def report(r: dict) -> str:
    m, v = r["machine"], r["variants"]
    std = v["eager"]["memory"]["peak_delta_mib"], v["sdpa"]["memory"]["peak_delta_mib"]
    lin = v["linear"]["memory"]["peak_delta_mib"]
    lines = [f"# Attention at {r['seq']:,} tokens: standard against linear ({m['name']})", "",
             f"{m['cpu']}, {m['cores']} cores, torch {m['torch']} on {m['torch_threads']} threads; 1-minute load "
             f"average {_fmt(m['load_average_1m_at_start'], 2)} at the start (a shared, loaded machine: latencies "
             "are inflated and noisy). BERT-shaped encoder: bert-base widths (768 wide, 12 heads, 3,072 MLP), "
             f"{r['layers']} layers, seeded random weights, batch {r['batch']}, sequence {r['seq']:,}, fp32. "
             "Produced by `tools/attention_bench.py`.", "",
             "| attention | peak memory over the forward (MiB) | process peak (MiB) | first forward (ms) | "
             "median forward (ms) | cosine vs sdpa (mean / min per token) | rel. L2 vs sdpa (mean / max) |",
             "|---|---|---|---|---|---|---|"]
    for name in VARIANTS:
        x, a = v[name], v[name]["agreement_vs_sdpa"]
        lines.append(f"| {name} | {_fmt(x['memory']['peak_delta_mib'])} | {_fmt(x['memory']['peak_mib'])} | "
                     f"{_fmt(x['first_ms'], 0)} | {_fmt(x['median_ms'], 0)} | {a['cosine_mean']:.6f} / "
                     f"{a['cosine_min']:.6f} | {a['rel_l2_mean']:.2e} / {a['rel_l2_max']:.2e} |")
    lines += ["", f"Memory: {v['linear']['memory']['method']}."]
    if None not in (*std, lin):
        lines.append(f"Linear attention's peak is {_change(lin, std[0])} eager attention's and {_change(lin, std[1])} "
                     "sdpa's. Eager attention materialises the (T, T) scores of every head; torch's fused SDPA "
                     "kernel on the CPU computes softmax attention blockwise without keeping them, so what linear "
                     "attention saves is the materialised scores, not what a fused kernel already avoids.")
    opt = {n: v[n].get("optimized") for n in VARIANTS if v[n].get("optimized")}
    if opt:
        lines += ["", "Through `dioe.optimize` (torch engine, fp32), "
                  f"{next(iter(opt.values()))['layers']} layers at {r['seq']:,} tokens:", "",
                  "| attention | optimize (s) | median call (ms) | max rel. error vs its own eager |", "|---|---|---|---|"]
        for n, o in opt.items():
            lines.append(f"| {n} | {_fmt(o['build_s'])} | {_fmt(o['median_ms'], 0)} | "
                         f"{o['max_rel_error_vs_own_eager']:.1e} |")
    mini = r.get("minilm_linear_vs_sdpa")
    lines += ["", "## Agreement: linear attention is a different function",
              "Linear attention replaces exp(q·k) by φ(q)·φ(k), φ = elu + 1; swapping it into a model trained with "
              "softmax attention changes what the model computes, and it needs fine-tuning (or training) to "
              "recover the model's accuracy. The encoder above has random weights (std 0.02), whose attention is "
              "close to uniform under either kernel, so its agreement overstates what a trained model keeps."]
    if mini and "skipped" not in mini:
        lines.append(f"On minilm (trained weights, one real sentence, {mini['tokens']} real tokens), linear against "
                     f"standard attention without fine-tuning: mean cosine {mini['cosine_mean']:.3f} (min "
                     f"{mini['cosine_min']:.3f}), mean relative L2 {mini['rel_l2_mean']:.2f}.")
    elif mini:
        lines.append(f"minilm comparison skipped: {mini['skipped']}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=2, help="timed forwards after the first (default 2)")
    ap.add_argument("--optimize-layers", type=int, default=0,
                    help="also build each variant with dioe.optimize at this many layers (0: skip)")
    ap.add_argument("--agreement-minilm", action="store_true", help="also compare on minilm's trained weights")
    ap.add_argument("--name", default="this-machine", help="machine name for the report and file names")
    ap.add_argument("--out", help="folder for NAME.md and NAME.json (default: print only)")
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--save", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.seq < 1 or args.layers < 1 or args.repeats < 0 or args.optimize_layers < 0:
        ap.error("--seq and --layers must be >= 1, --repeats and --optimize-layers >= 0")
    if args.child:
        print(json.dumps(child(args)))
        return 0
    results = run(args)
    text = report(results)
    print(text)
    if args.out:
        from dioe.files import write_text

        out = Path(args.out)
        write_text(out / f"{args.name}.json", json.dumps(results, indent=2) + "\n")
        write_text(out / f"{args.name}.md", text)
        print(f"wrote {out / args.name}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
