"""Progressive structured pruning: a model cut down in N stages to a target sparsity, each stage saved as a model
that reloads without torch-pruning, optimized by DIOE and measured against the dense model.

    >>> result = dioe.prune("tiny-bert", target_sparsity=0.5, steps=2, output_dir="pruned")   # doctest: +SKIP
    >>> [s.params for s in result.stages]                                                      # doctest: +SKIP
    [136832, 128480, 120128]
    >>> from dioe.prune import load_stage
    >>> model = load_stage("pruned/stage-2")                                                   # doctest: +SKIP

What is cut, through torch-pruning's dependency graph (`DependencyGraph`, `MetaPruner`), so that every layer that
shares a dimension is cut alike:
- transformers: whole attention heads (query, key and value rows and the output projection's columns together, so
  that the head size stays what the attention divides by) and the MLP's intermediate channels. The hidden size is
  kept: it runs through the embeddings, every residual add and LayerNorm, and the pooler or classifier, which stay
  as they are.
- CNNs: convolution channels, BatchNorm and the residual adds following them; the classifier keeps its outputs.

`target_sparsity` is the fraction of the prunable layers' parameters removed at the last stage; stage k of N aims
at k/N of it. A transformer's prunable Linear loses rows or columns in proportion, so its channel ratio is the
sparsity; a convolution loses input and output channels alike, so its channel ratio is 1 - sqrt(1 - sparsity).
Each stage's table row gives the sparsity it reached and its parameters against the dense model's.

Each Conv2d and Linear at least twice `round_to` wide keeps its dense width times the stage's channel keep, rounded
to the nearest multiple of `round_to` (by default this CPU's fp32 vector width, 8 with AVX2 and 16 with AVX-512;
passed to torch-pruning as per-layer ratios): kernels block channels by that width, and ONNX Runtime's blocked
convolution layout needs it, so an odd count can run slower than the dense model. Every stage aims from the dense
widths, so rounding never compounds. Narrower layers keep their width; grouped convolutions, and models with
GroupNorm, take the exact ratio.

Strategies rank channels by `magnitude` (L1 norm of their weights), `l2` (L2 norm), or `taylor` (|weight x
gradient| of a distillation loss against the dense model on calibration inputs, torch-pruning's
`TaylorImportance`). `recover_steps` K runs K Adam steps of that same distillation after each stage is cut.
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.utils._pytree as pytree

from . import prune_report as report
from .accuracy import Budget
from .errors import DIOEError
from .files import private_dir
from .prune_report import PruneResult, Stage
from .pruned import architecture, load_stage, save_stage

STRATEGIES = ("magnitude", "l2", "taylor")
# zoo models whose structure the pruner keeps consistent. Not gpt2 (its attention is one fused Conv1D) nor
# vit-base (the dependency graph loses the hidden size at the class token's concatenation and cuts it)
PRUNABLE_ZOO = ("bert-base", "minilm", "tiny-bert", "resnet50", "mobilenetv2", "tiny-mlp")
_KEPT = ("embeddings", "embedder", "pooler", "classifier")   # top-level parts whose widths stay as they are


def need_torch_pruning():
    try:
        import torch_pruning
    except ImportError:
        raise DIOEError("pruning needs torch-pruning: pip install 'dioe[prune]'") from None
    return torch_pruning


def check_options(*, target_sparsity: Any, strategy: Any, steps: Any, recover_steps: Any) -> None:
    """Every option of `prune` checked before any model is built, with what is allowed."""
    if isinstance(target_sparsity, bool) or not isinstance(target_sparsity, (int, float)) or \
            not 0 < target_sparsity < 1:
        raise DIOEError(f"target sparsity must be a number in (0, 1), the fraction of parameters removed, such as "
                        f"0.5; got {target_sparsity!r}")
    if strategy not in STRATEGIES:
        raise DIOEError(f"unknown pruning strategy {strategy!r}; allowed: {', '.join(STRATEGIES)}")
    for name, value, least in (("steps", steps, 1), ("recover_steps", recover_steps, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise DIOEError(f"{name} must be an integer >= {least}; got {value!r}")


def check_model(name: str) -> None:
    from . import zoo

    if name not in PRUNABLE_ZOO:
        known = "" if name in zoo.names() else " (not a zoo model)"
        raise DIOEError(f"cannot prune {name!r}{known}; prunable zoo models: {', '.join(PRUNABLE_ZOO)}, or pass an "
                        "nn.Module with its example inputs")


# -- what is pruned -----------------------------------------------------------------------------------------------
def attention_heads(model: torch.nn.Module) -> dict[torch.nn.Module, int]:
    """The query, key and value Linears of every attention module that names its head count (transformers' BERT,
    ViT and relatives), mapped to that count: torch-pruning's `num_heads`."""
    heads = {}
    for m in model.modules():
        n = getattr(m, "num_attention_heads", None)
        qkv = [getattr(m, p, None) for p in ("query", "key", "value")]
        if isinstance(n, int) and all(isinstance(layer, torch.nn.Linear) for layer in qkv):
            for p in ("query", "key", "value"):
                heads[getattr(m, p)] = n
    return heads


def kept_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Layers whose output width must stay: the embeddings, pooler and classifier where the model has them, else
    its last Linear (a plain module's output)."""
    kept = [getattr(model, n) for n in _KEPT if isinstance(getattr(model, n, None), torch.nn.Module)]
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if not any(isinstance(getattr(model, n, None), torch.nn.Module) for n in ("pooler", "classifier")) and linears:
        kept.append(linears[-1])
    return kept


def channel_ratio(sparsity: float, transformer: bool) -> float:
    """The fraction of channels to cut for `sparsity` of the prunable parameters (see the module docstring)."""
    return sparsity if transformer else 1 - math.sqrt(1 - sparsity)


def _importance(tp, strategy: str):
    if strategy == "taylor":
        return tp.importance.TaylorImportance()
    return tp.importance.MagnitudeImportance(p=1 if strategy == "magnitude" else 2)


def vector_width() -> int:
    """fp32 lanes of this CPU's widest vector unit: the `round_to` that keeps pruned channels whole blocks."""
    from .devices import CpuInfo

    flags = CpuInfo.read().flags
    return 16 if "avx512f" in flags else 8 if "avx2" in flags or "avx" in flags else 4


def prune_stage(model: torch.nn.Module, example: tuple, *, keep_before: float, keep_after: float, strategy: str,
                dense_heads: dict[str, int], gradients: Callable[[], None] | None = None, round_to: int = 1,
                dense_widths: dict[str, int] | None = None) -> None:
    """Cut `model` in place from `keep_before` to `keep_after` of the dense model's channels. Heads are counted
    exactly: each attention keeps round(dense heads x keep_after), at least one. `dense_heads` maps each query
    Linear's name to its dense head count. `gradients` fills the weights' .grad that Taylor ranks by. With
    `round_to` > 1, every other layer named in `dense_widths` (its dense output width) keeps that width times
    `keep_after` rounded to the nearest multiple of `round_to`."""
    tp = need_torch_pruning()
    heads = attention_heads(model)
    names = {m: n for n, m in model.named_modules()}
    ratio = 1 - keep_after / keep_before
    head_ratio = {}
    for layer, now in heads.items():
        name = names[layer].rsplit(".", 1)[0] + ".query"
        want = max(1, round(dense_heads[name] * keep_after))
        # torch-pruning removes ceil(ratio x heads): half a head below the count lands on it exactly
        head_ratio[layer] = (now - want - 0.5) / now if now > want else 0.0
    if strategy == "taylor":
        model.zero_grad(set_to_none=True)
        gradients()
    kept = kept_layers(model)
    common = dict(importance=_importance(tp, strategy), ignored_layers=kept,
                  output_transform=lambda out: sum(t.float().sum() for t in _float_leaves(out)),
                  pruning_ratio_dict=_rounded_ratios(model, dense_widths or {}, keep_after, round_to,
                                                     skip=set(heads) | {s for k in kept for s in k.modules()})
                  if round_to > 1 else None)
    if heads:
        # every attention cuts alike, so one stage's ratios are one head ratio
        pruner = tp.pruner.MetaPruner(model, example, pruning_ratio=ratio, num_heads=heads, prune_num_heads=True,
                                      prune_head_dims=False, head_pruning_ratio=max(head_ratio.values()), **common)
    else:
        pruner = tp.pruner.MetaPruner(model, example, pruning_ratio=ratio, **common)
    with torch.no_grad() if strategy != "taylor" else torch.enable_grad():
        pruner.step()
    model.zero_grad(set_to_none=True)
    for m in model.modules():  # the attention reshapes by head size; its head count follows the rows left
        if isinstance(getattr(m, "num_attention_heads", None), int) and isinstance(getattr(m, "query", None),
                                                                                    torch.nn.Linear):
            size = getattr(m, "attention_head_size", None) or m.query.out_features // m.num_attention_heads
            m.num_attention_heads = m.query.out_features // size
            if hasattr(m, "all_head_size"):
                m.all_head_size = m.query.out_features


def _width(m: torch.nn.Module) -> int | None:
    return m.out_channels if isinstance(m, torch.nn.Conv2d) else m.out_features \
        if isinstance(m, torch.nn.Linear) else None


def dense_widths(model: torch.nn.Module) -> dict[str, int]:
    """Each convolution's and Linear's output width, by module name."""
    return {n: w for n, m in model.named_modules() if (w := _width(m)) is not None}


def _rounded_ratios(model: torch.nn.Module, dense: dict[str, int], keep: float, step: int, *, skip: set
                    ) -> dict[torch.nn.Module, float]:
    """torch-pruning's per-layer ratios that leave each Conv2d and Linear round(dense width x keep) channels, to
    the nearest multiple of `step`, at least `step`. A layer narrower than 2 x `step` keeps its width (one step
    would be too coarse a cut for it), and a grouped convolution is left to the global ratio (torch-pruning cuts it
    per channel group). torch-pruning removes C - int(C x (1 - ratio)) channels, so the half channel added lands
    the count exactly."""
    ratios = {}
    for name, m in model.named_modules():
        now, was = _width(m), dense.get(name)
        if now is None or was is None or m in skip or getattr(m, "groups", 1) > 1:
            continue
        want = was if was < 2 * step else max(step, round(was * keep / step) * step)
        ratios[m] = 1 - (want + 0.5) / now if want < now else 0.0
    return ratios


def dense_head_counts(model: torch.nn.Module) -> dict[str, int]:
    names = {m: n for n, m in model.named_modules()}
    return {names[layer]: n for layer, n in attention_heads(model).items() if names[layer].endswith("query")}


def _float_leaves(out) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def distill_loss(student: torch.nn.Module, targets: Sequence[list[torch.Tensor]], inputs: Sequence[tuple]
                 ) -> torch.Tensor:
    """Mean over inputs and float outputs of the squared error to the dense model's output, each divided by that
    output's mean square, so that a wide hidden state and a small pooled vector weigh alike."""
    total = torch.zeros(())
    for x, ref in zip(inputs, targets):
        got = _float_leaves(student(*x))
        total = total + sum(((g - r) ** 2).mean() / (r ** 2).mean().clamp_min(1e-12) for g, r in zip(got, ref))
    return total / max(1, len(inputs))


def distill_gradients(student: torch.nn.Module, targets, inputs: Sequence[tuple]) -> None:
    """The distillation loss's gradients in the weights' .grad, one input at a time so that only one input's
    activations are held."""
    for x, ref in zip(inputs, targets):
        (distill_loss(student, [ref], [x]) / len(inputs)).backward()


def recover(student: torch.nn.Module, targets, inputs: Sequence[tuple], *, steps: int, lr: float = 1e-4
            ) -> tuple[float, float]:
    """`steps` Adam steps of distillation against the dense outputs, one calibration input per step, in turn;
    returns the loss over all calibration inputs before and after."""
    with torch.no_grad():
        before = float(distill_loss(student, targets, inputs))
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    for i in range(steps):
        j = i % len(inputs)
        opt.zero_grad(set_to_none=True)
        distill_loss(student, [targets[j]], [inputs[j]]).backward()
        opt.step()
    student.zero_grad(set_to_none=True)
    with torch.no_grad():
        after = float(distill_loss(student, targets, inputs))
    return before, after


# -- the run ------------------------------------------------------------------------------------------------------
def prune(model: str | torch.nn.Module, example_inputs: Any = None, *, target_sparsity: float,
          strategy: str = "magnitude", steps: int = 5, output_dir: str | Path, size: str = "full",
          recover_steps: int = 0, calibration: int = 32, budget: Budget | str | None = None,
          batches: Sequence[int] = (1, 8), backends: Sequence[str] | None = None, hardware: Any = "auto",
          timing_s: float = 3.0, round_to: int | None = None, log: Callable[[str], None] = print) -> PruneResult:
    """Prune `model` (a zoo name, or an nn.Module with `example_inputs`) in `steps` stages to `target_sparsity`,
    save each stage under `output_dir/stage-K`, and measure every stage; writes pruning.csv, pruning.json and
    pruning.png there and returns the result.

    `calibration`: how many input rows Taylor ranking and recovery distil on; held-out rows, as many as the
    budget's `samples`, are drawn apart from them. `budget` (a `dioe.Budget` or its text, such as
    "cosine>=0.99"; by default the one `Budget.default_for` picks for the output) decides which stage fits.
    `batches`: the batch sizes DIOE's latency is measured at (a zoo model's; an nn.Module is timed at its example's
    batch); empty to skip optimizing. `backends`, `hardware`: passed to `dioe.optimize`. `round_to`: channel
    counts left are multiples of it (default: this CPU's fp32 vector width; 1 to keep exact ratios).

        >>> r = dioe.prune("tiny-bert", target_sparsity=0.5, steps=2, output_dir="out", batches=())  # doctest: +SKIP
        >>> r.stages[-1].sparsity                                                                    # doctest: +SKIP
        0.5
    """
    check_options(target_sparsity=target_sparsity, strategy=strategy, steps=steps, recover_steps=recover_steps)
    if isinstance(calibration, bool) or not isinstance(calibration, int) or calibration < 1:
        raise DIOEError(f"calibration is a count of input rows, an integer >= 1; got {calibration!r}")
    if round_to is None:
        round_to = vector_width()
    elif isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise DIOEError(f"round_to is the multiple channel counts are rounded to, an integer >= 1; got {round_to!r}")
    if isinstance(budget, str):
        budget = Budget.parse(budget)
    elif budget is not None and not isinstance(budget, Budget):
        raise DIOEError(f"budget must be a dioe.Budget or its text such as 'cosine>=0.99'; got {budget!r}")
    tp = need_torch_pruning()
    dense, example, name, data, data_rows = _model_and_data(model, example_inputs, size)
    rows = _rows(example)
    arch = architecture(dense, name if isinstance(model, str) else None, size)
    out = Path(output_dir)
    private_dir(out)
    with torch.no_grad():
        probe = dense(*example)
    budget = budget or Budget.default_for(probe)
    n_cal = -(-calibration // data_rows)
    items = data(n_cal + budget.holdout_inputs(data_rows))
    cal, held = items[:n_cal], items[n_cal:]
    reference = report.outputs(dense, held)
    with torch.no_grad():
        targets = [_float_leaves(dense(*x)) for x in cal]
    dense_heads = dense_head_counts(dense)
    transformer = bool(dense_heads)
    if round_to > 1 and any(isinstance(m, torch.nn.GroupNorm) for m in dense.modules()):
        log(f"{name} has GroupNorm, whose groups torch-pruning cuts alike: channel counts are not rounded")
        round_to = 1

    def prunable(m: torch.nn.Module) -> int:
        kept = {id(p) for layer in kept_layers(m) for p in layer.parameters()}
        return sum(p.numel() for p in m.parameters() if id(p) not in kept)

    n_dense, p_dense = sum(p.numel() for p in dense.parameters()), prunable(dense)

    def measured(k: int, m: torch.nn.Module, target: float, **extra) -> Stage:
        macs, params = tp.utils.count_ops_and_params(m, example)
        row, met = report.agreement(budget, reference, report.outputs(m, held))
        stage = Stage(k, round(target, 4), round(1 - prunable(m) / p_dense, 4), int(params),
                      round(params / n_dense, 4), int(macs), row, met, **extra)
        log(f"  stage {k}: {stage.params_ratio:.1%} of the parameters, sparsity {stage.sparsity:.3f}, "
            f"{row['summary']}")
        return stage

    log(f"pruning {name}: {strategy} to sparsity {target_sparsity} in {steps} stages, channels in multiples of "
        f"{round_to}")
    stages, models = [measured(0, dense, 0.0)], {0: dense}
    student, keep, widths = copy.deepcopy(dense), 1.0, dense_widths(dense)
    for k in range(1, steps + 1):
        target = target_sparsity * k / steps
        after = 1 - channel_ratio(target, transformer)
        prune_stage(student, example, keep_before=keep, keep_after=after, strategy=strategy, dense_heads=dense_heads,
                    gradients=lambda: distill_gradients(student, targets, cal), round_to=round_to,
                    dense_widths=widths)
        keep = after
        recovery = {}
        if recover_steps:
            before, after_loss = recover(student, targets, cal, steps=recover_steps)
            recovery = {"steps": recover_steps, "loss_before": round(before, 6), "loss_after": round(after_loss, 6)}
        student.eval()
        folder = save_stage(out / f"stage-{k}", student, dense, arch,
                            {"model": name, "stage": k, "strategy": strategy, "target_sparsity": target})
        models[k] = load_stage(folder)
        with torch.no_grad():
            same = all(torch.equal(a, b) for a, b in zip(_float_leaves(student(*example)),
                                                           _float_leaves(models[k](*example))))
        if not same:
            raise DIOEError(f"stage {k} reloaded from {folder} does not reproduce the pruned model's outputs")
        stages.append(measured(k, student, target, recovery=recovery, path=folder.name))
    problems: list[str] = []
    latency = report.latencies(models, name if isinstance(model, str) else None, size, batches, example, rows,
                                 backends=backends, hardware=hardware, timing_s=timing_s, log=log,
                                 problems=problems) \
        if batches else {}
    stages = [replace(s, latency_ms=latency.get(s.index, {})) for s in stages]
    notes = report.notes(stages) + problems + [
        "every stage, reloaded from its files, reproduced the pruned model's outputs exactly"]
    result = PruneResult(name, strategy, float(target_sparsity), steps, str(budget), tuple(stages),
                         report.fitting_stage(stages), machine=_machine(), notes=tuple(notes))
    paths = report.write_outputs(result, out)
    log(report.text_table(result))
    log("wrote " + ", ".join(str(p) for p in paths.values()))
    return result


def _machine() -> str:
    from .devices import CpuInfo

    cpu = CpuInfo.read()
    return f"{cpu.name}, {cpu.usable_cores} cores, torch {torch.__version__}"


def _rows(example: tuple) -> int:
    first = example[0] if example else None
    return first.shape[0] if isinstance(first, torch.Tensor) and first.dim() else 1


def _model_and_data(model, example_inputs, size: str):
    """The dense model in eval mode, its example (a zoo model's at batch 1), its name, a function giving `n`
    held-out or calibration inputs, and their batch: a zoo model's realistic data at batch 8 where it has some,
    else inputs generated like the example."""
    from .calibration import generate

    if isinstance(model, str):
        from . import zoo

        check_model(model)
        dense, example = zoo.load(model, size=size, batch=1)
        _, wide = zoo.load(model, size=size, batch=8)

        def data(n: int) -> list[tuple]:
            items = zoo.calibration(model, n=n, batch=8, size=size)
            return items if items is not None else generate(tuple(wide), n=n, seed=1)
        return dense.eval(), tuple(example), model, data, 8
    if not isinstance(model, torch.nn.Module):
        raise DIOEError(f"prune takes a zoo model name ({', '.join(PRUNABLE_ZOO)}) or an nn.Module; got "
                        f"{type(model).__name__}")
    if example_inputs is None:
        raise DIOEError("pruning an nn.Module needs its example_inputs, a tuple of tensors to trace it with")
    example = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    return model.eval(), example, type(model).__name__, lambda n: generate(example, n=n, seed=1), _rows(example)


__all__ = ["PRUNABLE_ZOO", "STRATEGIES", "check_model", "check_options", "load_stage", "prune", "prune_stage",
           "recover", "save_stage", "vector_width", "dense_widths"]
