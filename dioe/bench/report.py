"""What a run's numbers say: ratios to the best peer of the same precision class (overall and paired round by round),
fractions of the GEMM roof, the markdown report, the comparison with an earlier run, and the chart."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Sequence

from ..text import show_ms
from .engines import DIOE, ENGINES
from .rounds import DISTURBED


def derive(results: dict) -> None:
    """Ratio to the best peer of the same precision class, and the fraction of the roof reached."""
    roof = results["roof"]
    for m in results["models"]:
        for b in m["batches"].values():
            rows = b["engines"]
            ok = {e: r for e, r in rows.items() if "median_ms" in r}
            for e, r in ok.items():
                peers = [p for p, q in ok.items() if p not in DIOE and q["precision"] == r["precision"]]
                best = min(peers, key=lambda p: ok[p]["median_ms"]) if peers else None
                r["best_peer"] = best
                r["ratio_to_best_peer"] = round(r["median_ms"] / ok[best]["median_ms"], 3) if best else None
                paired = paired_ratio(r.get("round_ms"), ok[best].get("round_ms")) if best else None
                if paired:
                    r["paired_ratio"], r["paired_ratio_range"] = paired
                r["speedup_over_eager"] = round(ok["torch"]["median_ms"] / r["median_ms"], 3) if "torch" in ok else None
                # what a user gets from OpenVINO with no options: the bar for every lower precision
                ovd = ok.get("openvino-default")
                if ovd and e != "openvino-default":
                    r["speedup_over_openvino_default"] = round(ovd["median_ms"] / r["median_ms"], 3)
                    paired = paired_ratio(r.get("round_ms"), ovd.get("round_ms"))
                    if paired:
                        r["paired_over_openvino_default"] = round(1 / paired[0], 3)
                top = (roof.get(r["precision"]) or {}).get("gflops")
                r["roof_fraction"] = round(r["gflops_per_s"] / top, 3) if top else None


def paired_ratio(mine: Sequence[float] | None, peer: Sequence[float] | None) -> tuple[float, list[float]] | None:
    """The median over rounds of an engine's block median over its peer's in the same round, and the range of
    those per-round ratios. Blocks of one round ran seconds apart, so a neighbour's load that comes and goes over
    minutes moves both sides of each ratio alike, where the ratio of the two overall medians can pair one engine's
    quiet rounds with the other's busy ones. None where either side lacks rounds (a run from before they were
    recorded) or their counts differ."""
    if not mine or not peer or len(mine) != len(peer) or not all(peer):
        return None
    ratios = [a / b for a, b in zip(mine, peer)]
    return round(statistics.median(ratios), 3), [round(min(ratios), 3), round(max(ratios), 3)]


def roof_text(roof: dict) -> str:
    return ", ".join(f"{k} {v['gflops']} GFLOP/s ({v.get('op', 'torch.mm')}, n={v.get('n')}"
                     + (f", {v['when']})" if v.get("when") else ")") if v.get("gflops")
                     else f"{k} n/a ({v.get('error', '')[:60]})" for k, v in roof.items())


def canary_text(results: dict) -> list[str]:
    """Markdown: how many blocks of timed calls the canary found disturbed, and where some were kept so."""
    seen = [(f"{m['model']} b{b}", x["canary"]) for m in results["models"] for b, x in m["batches"].items()
            if x.get("canary")]
    if not seen:
        return []
    total = {k: sum(c[k] for _, c in seen) for k in ("blocks", "disturbed", "retimed", "left_disturbed")}
    text = (f"Canary: between every two blocks of timed calls, a 1024³ fp32 GEMM read the machine's speed. "
            f"{total['disturbed']} of {total['blocks']} blocks had a reading below {DISTURBED:.0%} of the fastest "
            f"on one side (something else held the cores); {total['retimed']} re-timings followed, and "
            f"{total['left_disturbed']} blocks are kept disturbed")
    left = [f"{what} ({c['left_disturbed']})" for what, c in seen if c["left_disturbed"]]
    return [text + (": " + ", ".join(left) if left else "") + ".", ""]


def markdown(results: dict, compare: dict | None = None) -> str:
    mc = results["machine"]
    lines = [f"# DIOE benchmark: {mc['cpu']}", "",
             f"Command: `{results['command']}`  ", f"Date: {results['date']}; took {results['seconds'] / 60:.1f} min  ",
             f"Machine: {mc['cpu']}, {mc['cores']} cores, {mc['machine']}; ISA: {', '.join(mc['isa'])}  ",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in mc["versions"].items() if v) + "  ",
             "Roof (best GEMM, all cores, at the run's start, its end, or a probe or canary between them): " +
             roof_text(results["roof"]), "",
             "Latency is the median (and p90) of interleaved rounds, in ms; *ratio* is latency over the best peer "
             "of the same precision class (the best peer itself is 1.00; DIOE below 1.00 means it wins); *paired* is "
             "the median over rounds of DIOE's block over the best peer's block of the same round, seconds apart, "
             "with the range of those per-round ratios: a load that comes and goes between rounds moves both sides "
             "of each alike; "
             "*roof* is achieved GFLOP/s over the GEMM "
             "roof of that precision; *runtime overhead* is the part of DIOE's latency beyond the sum of its "
             "partitions' times (each engine's own callable, called bare in the same rounds), as a share of DIOE's "
             "latency. The canary's block counts include those bare calls' blocks.", ""]
    lines += canary_text(results)
    lines += ["## DIOE against the best peer (batch 1, fp32)", "",
              "| model | GFLOP | best fp32 peer | peer ms | DIOE ms | ratio | paired (range) | runtime overhead "
              "| DIOE roof | OpenVINO default (prec) ms | DIOE plan |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in results["models"]:
        b = m["batches"].get("1")
        if not b:
            continue
        rows = b["engines"]
        d, ovd = rows.get("dioe", {}), rows.get("openvino-default", {})
        best = d.get("best_peer")
        cells = [m["model"], f"{b['gflop']:.2f}", best or "-",
                 show_ms(rows[best]['median_ms']) if best else "-",
                 show_ms(d['median_ms']) if "median_ms" in d else "failed",
                 f"**{d['ratio_to_best_peer']:.2f}**" if d.get("ratio_to_best_peer") else "-",
                 _paired_text(d),
                 f"{100 * d['runtime_overhead']:+.1f}% (bare {show_ms(d['partitions_ms'])} ms)"
                 if "runtime_overhead" in d else "-",
                 f"{100 * d['roof_fraction']:.0f}%" if d.get("roof_fraction") is not None else "-",
                 f"{show_ms(ovd['median_ms'])} ({ovd['precision']})" if "median_ms" in ovd else "-",
                 "; ".join(d.get("plan", [])) or d.get("error", "-")]
        lines.append("| " + " | ".join(cells) + " |")
    engines = present(results)
    lines += precision_table(results)
    for batch in sorted({b for m in results["models"] for b in m["batches"]}, key=int):
        lines += ["", f"## All engines, batch {batch}", "",
                  "| model | " + " | ".join(engines) + " |", "|---" * (len(engines) + 1) + "|"]
        for m in results["models"]:
            b = m["batches"].get(batch)
            if not b:
                continue
            cells = []
            for e in engines:
                r = b["engines"].get(e)
                if r is None:
                    cells.append("-")
                elif "median_ms" not in r:
                    cells.append("failed")
                else:
                    extra = f"{r['per_s']:.1f}/s" if batch != "1" else f"p90 {show_ms(r['p90_ms'])}"
                    ratio = f"{r['ratio_to_best_peer']:.2f}x" if r.get("ratio_to_best_peer") else "no peer"
                    cells.append(f"{show_ms(r['median_ms'])} ({extra}; {ratio}; "
                                 f"roof {100 * (r['roof_fraction'] or 0):.0f}%)")
            lines.append(f"| {m['model']} | " + " | ".join(cells) + " |")
    lines += ["", "## Compile (or optimize) time and memory, batch 1", "",
              "| model | " + " | ".join(engines) + " |", "|---" * (len(engines) + 1) + "|"]
    for m in results["models"]:
        b = m["batches"].get("1")
        if b:
            lines.append(f"| {m['model']} | " + " | ".join(
                f"{r['compile_s']:.1f} s, +{r['added_rss_mb']:.0f} MB (peak {r['peak_rss_mb']:.0f})"
                if "compile_s" in r else "failed" for r in (b["engines"].get(e, {}) for e in engines)) + " |")
    failures = [(m["model"], b, e, r["error"]) for m in results["models"] for b, x in m["batches"].items()
                for e, r in x["engines"].items() if "error" in r]
    if failures:
        lines += ["", "## Failures", ""] + [f"- {m} batch {b}, {e}: {err}" for m, b, e, err in failures]
    if compare:
        lines += reproducibility(compare, results)
    return "\n".join(lines) + "\n"


def present(results: dict) -> list[str]:
    """The engines this run measured, in the bench's order."""
    seen = {e for m in results["models"] for b in m["batches"].values() for e in b["engines"]}
    return [e for e in ENGINES if e in seen]


def _accuracy_text(acc: dict | None) -> tuple[str, str, str]:
    """(worst cosine, top-1 agreement, budget verdict) cells for an engine's accuracy row."""
    if not acc:
        return "-", "-", "-"
    if "error" in acc:
        return "failed", "-", acc["error"][:80]
    cos = acc.get("cosine")
    top = acc.get("top1")
    return (f"{cos['worst']:.5f} (mean {cos['mean']:.5f})" if cos else "-",
            f"{100 * top['mean']:.1f}%" if top else "-",
            ("met" if acc["met"] else "**not met**") + f" ({acc['budget']}, n={acc['samples']})")


def precision_table(results: dict) -> list[str]:
    """Batch 1: every engine's latency beside its agreement with fp32 eager on held-out inputs, and its speed over
    OpenVINO's default; batch 8: throughput over OpenVINO's default."""
    lines = ["## Precision: latency beside accuracy (batch 1)", "",
             "Accuracy: each engine's outputs on held-out inputs (the zoo's real sentences where it has them; no "
             "int8 engine calibrated on them) against fp32 eager's, under the default budget for the output. "
             "*vs OV default* is OpenVINO-default's latency over the engine's (above 1 means faster), with the "
             "paired per-round figure.", "",
             "| model | engine | precision | ms | vs eager | vs OV default (paired) | worst cosine (mean) | top-1 | budget |",
             "|---|---|---|---|---|---|---|---|---|"]
    for m in results["models"]:
        b = m["batches"].get("1")
        if not b:
            continue
        for e in present(results):
            r = b["engines"].get(e)
            if not r or "median_ms" not in r:
                continue
            ov = (f"{r['speedup_over_openvino_default']:.2f}x" + (f" ({r['paired_over_openvino_default']:.2f}x)"
                  if "paired_over_openvino_default" in r else "")) if "speedup_over_openvino_default" in r else "-"
            lines.append("| " + " | ".join([m["model"], e, r["precision"], show_ms(r["median_ms"]),
                                            f"{r['speedup_over_eager']:.2f}x" if r.get("speedup_over_eager") else "-",
                                            ov, *_accuracy_text(r.get("accuracy"))]) + " |")
    for batch in sorted({k for m in results["models"] for k in m["batches"]} - {"1"}, key=int):
        rows = [(m["model"], e, r) for m in results["models"] if batch in m["batches"]
                for e, r in m["batches"][batch]["engines"].items() if "speedup_over_openvino_default" in r]
        if rows:
            lines += ["", f"Throughput over OpenVINO's default at batch {batch}: " + "; ".join(
                f"{model} {e} {r['speedup_over_openvino_default']:.2f}x" for model, e, r in rows) + "."]
    geo = geomeans(results)
    if geo:
        lines += ["", "Geometric means over the models where both were measured: " + "; ".join(geo) + "."]
    return lines + [""]


def geomeans(results: dict, engine: str = "dioe-auto") -> list[str]:
    """`engine`'s speed over OpenVINO's default (median and paired) and over torch eager, per batch, as a geometric
    mean over the models that have both: the zoo-wide figures a precision target is stated in."""
    out = []
    for batch in sorted({k for m in results["models"] for k in m["batches"]}, key=int):
        rows = [m["batches"][batch]["engines"].get(engine) or {} for m in results["models"] if batch in m["batches"]]
        for key, what in (("speedup_over_openvino_default", "OpenVINO's default"),
                          ("paired_over_openvino_default", "OpenVINO's default, paired"),
                          ("speedup_over_eager", "torch eager")):
            xs = [r[key] for r in rows if r.get(key)]
            if xs:
                out.append(f"batch {batch}, {engine} over {what}: {statistics.geometric_mean(xs):.2f}x "
                           f"({len(xs)} models)")
    return out


def _paired_text(row: dict) -> str:
    if "paired_ratio" not in row:
        return "-"
    lo, hi = row["paired_ratio_range"]
    return f"{row['paired_ratio']:.2f} ({lo:.2f}-{hi:.2f})"


def reproducibility(old: dict, new: dict) -> list[str]:
    """Markdown: each median against an earlier run's, beside the shift that every engine of that model and batch
    shared (the machine's speed moving between the runs) and the GEMM probe's change taken at the same moments."""
    rows = list(compare_medians(old, new))
    if not rows:
        return []
    def probes(results):
        return {(m["model"], b): x.get("probe_gflops") for m in results["models"] for b, x in m["batches"].items()}
    before, now = probes(old), probes(new)
    shared: dict[tuple, float] = {}
    for model, batch in {(r[0], r[1]) for r in rows}:
        shared[(model, batch)] = statistics.median(n / o for m, b, _, o, n in rows if (m, b) == (model, batch))
    out = ["", f"## Reproducibility: medians against `{old.get('command', 'an earlier run')}` "
               f"({old.get('date', '?')})", ""]
    differs = machine_differences(old.get("machine", {}), new.get("machine", {}))
    if differs:
        out += ["**The two runs are not on the same machine and software**, so the changes below measure that "
                "difference as well as reproducibility: " + "; ".join(differs) + ".", ""]
    out += ["*change* is this run's median over the earlier one; *shared* is the median change of all engines of "
            "that model and batch, which the machine's own drift between the runs moves alike; *own* is the "
            "engine's change after the shared one is taken out, which is what the ratios between engines rest on; "
            "*probe* is the change of a 1024³ fp32 GEMM timed just before that model's rounds in both runs.", "",
            "| model | batch | engine | earlier ms | this run ms | change | shared | own | probe |",
            "|---|---|---|---|---|---|---|---|---|"]
    def moved(ratio: float) -> str:
        return f"{100 * (ratio - 1):+.1f}%" + (" **>10%**" if abs(ratio - 1) > 0.10 else "")
    raw = own = 0
    for model, batch, engine, o, n in rows:
        sh = shared[(model, batch)]
        mine = (n / o) / sh
        raw += abs(n / o - 1) > 0.10
        own += abs(mine - 1) > 0.10
        p0, p1 = before.get((model, batch)), now.get((model, batch))
        probe = f"{100 * (p0 / p1 - 1):+.1f}%" if p0 and p1 else "-"  # slower GEMM = higher latency: p0/p1
        out.append(f"| {model} | {batch} | {engine} | {show_ms(o)} | {show_ms(n)} | {moved(n / o)} | "
                   f"{100 * (sh - 1):+.1f}% | {moved(mine)} | {probe} |")
    out += ["", f"{raw} of {len(rows)} medians moved by more than 10%; {own} of {len(rows)} did once the shift "
                f"shared by every engine of the same model and batch is taken out."]
    return out + ratio_changes(old, new)


def ratio_changes(old: dict, new: dict) -> list[str]:
    """Markdown: DIOE's ratio to the best peer of its class in both runs, per model and batch: the claim the
    medians are measured for, which a shift the engines share leaves alone."""
    def ratios(results):
        return {(m["model"], b): x["engines"]["dioe"] for m in results["models"] for b, x in m["batches"].items()
                if x["engines"].get("dioe", {}).get("ratio_to_best_peer")}
    before, now = ratios(old), ratios(new)
    keys = [k for k in now if k in before]
    if not keys:
        return []
    out = ["", "DIOE's ratio to the best peer in both runs (*paired*, with its range, where the run recorded "
               "rounds):", "", "| model | batch | earlier peer | earlier ratio | earlier paired | peer | ratio | "
               "paired |", "|---|---|---|---|---|---|---|---|"]
    for model, batch in keys:
        o, n = before[(model, batch)], now[(model, batch)]
        out.append(f"| {model} | {batch} | {o['best_peer']} | {o['ratio_to_best_peer']:.2f} | {_paired_text(o)} | "
                   f"{n['best_peer']} | {n['ratio_to_best_peer']:.2f} | {_paired_text(n)} |")
    return out


def machine_differences(old: dict, new: dict) -> list[str]:
    """What differs between two runs' machine descriptions: CPU, cores, ISA flags, threads, library versions."""
    out = []
    for key in ("cpu", "cores", "torch_threads"):
        if old.get(key) != new.get(key):
            out.append(f"{key} {old.get(key)} then, {new.get(key)} now")
    gone, added = sorted(set(old.get("isa", ())) - set(new.get("isa", ()))), \
        sorted(set(new.get("isa", ())) - set(old.get("isa", ())))
    if gone or added:
        out.append("ISA " + ", ".join([*(f"without {f}" for f in gone), *(f"with {f}" for f in added)]) + " now")
    ov, nv = old.get("versions", {}), new.get("versions", {})
    out += [f"{k} {ov.get(k)} then, {nv.get(k)} now" for k in sorted(set(ov) | set(nv))
            if ov.get(k) != nv.get(k)]
    return out


def compare_medians(old: dict, new: dict):
    before = {(m["model"], b, e): r["median_ms"] for m in old["models"] for b, x in m["batches"].items()
              for e, r in x["engines"].items() if "median_ms" in r}
    for m in new["models"]:
        for b, x in m["batches"].items():
            for e, r in x["engines"].items():
                k = (m["model"], b, e)
                if k in before and "median_ms" in r:
                    yield m["model"], b, e, before[k], r["median_ms"]


def chart(results: dict, path: Path) -> Path | None:
    """Two panels at batch 1: each engine's speedup over torch eager per model, and each engine's latency against
    its worst-sample cosine to fp32 eager (lower precision moves a point left and down)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    models = [m for m in results["models"] if "1" in m["batches"]]
    engines = present(results)
    fig, (ax, acc) = plt.subplots(1, 2, figsize=(max(7, 1.6 * len(models) + 3) + 6, 4.8), dpi=120,
                                  gridspec_kw={"width_ratios": [max(7, 1.6 * len(models) + 3), 6]})
    width = 0.8 / len(engines)
    from ..tracereport import CRITICAL_COLOR, backend_colors

    backend = backend_colors()
    colors = {**{e: backend[e] for e in ("torch", "inductor", "onnxruntime")},
              "openvino-f32": backend["openvino"], "openvino-default": "#9ccc65", "dioe": CRITICAL_COLOR,
              "openvino-int8": "#33691e", "onnxruntime-int8": "#0d47a1", "torch-bf16": "#8d6e63",
              "dioe-auto": "#b71c1c"}

    def label(e: str) -> str:
        precs = {(m["batches"]["1"]["engines"].get(e) or {}).get("precision") for m in models} - {None}
        return e + (f" ({'/'.join(sorted(precs))})" if e in ("openvino-default", "dioe-auto") and precs else "")
    for i, e in enumerate(engines):
        ys = [(m["batches"]["1"]["engines"].get(e) or {}).get("speedup_over_eager") or 0 for m in models]
        ax.bar([j + (i - len(engines) / 2 + 0.5) * width for j in range(len(models))], ys, width, label=label(e),
               color=colors.get(e, "#999"))
    ax.axhline(1.0, color="#333", lw=0.8)
    ax.set_xticks(range(len(models)), [m["model"] for m in models])
    ax.set_ylabel("speedup over torch eager (batch 1)")
    ax.set_title(f"{results['machine']['cpu']}, {results['machine']['cores']} cores")
    ax.legend(fontsize=7, ncol=3)
    markers = "osD^vP*Xh"
    for k, m in enumerate(models):
        for e in engines:
            r = m["batches"]["1"]["engines"].get(e) or {}
            cos = ((r.get("accuracy") or {}).get("cosine") or {}).get("worst")
            if r.get("median_ms") and r.get("speedup_over_eager") and cos is not None:
                acc.scatter(1 / r["speedup_over_eager"], 1 - min(cos, 1.0) + 1e-7, color=colors.get(e, "#999"),
                            marker=markers[k % len(markers)], s=36)
    for k, m in enumerate(models):
        acc.scatter([], [], color="#555", marker=markers[k % len(markers)], label=m["model"])
    acc.set_xlabel("latency relative to torch eager (batch 1)")
    acc.set_ylabel("1 - worst cosine to fp32 eager (held out)")
    acc.set_yscale("log")
    acc.set_title("latency against accuracy")
    acc.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
