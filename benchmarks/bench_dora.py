"""DoRA: lora_ext vs PEFT on SmolLM2-135M, training speed, peak memory and bf16 merge error.

Training: both implementations train the same model (SmolLM2-135M, float32 on the CPU) with
DoRA (r=8, alpha=16, LoRA dropout 0.05) on q/k/v/o_proj, on the same fixed batch of real
text, with AdamW over the same trainable tensors (A, B and the magnitude vectors). Timed
steps alternate between the two (round robin) so machine noise hits both alike; the figure
is the median step time (forward + backward + optimizer step). Peak memory: the peak resident
set a fresh child process per configuration adds while running the same steps (Linux's VmHWM
reset once the model is loaded; ru_maxrss of the whole child where that reset is refused).

Merge error: a few of SmolLM2's projections in bfloat16 get the same trained-looking DoRA
adapter (A, B, m in float32); the merged bf16 weight m / ||W + sBA|| (W + sBA) of each
implementation is compared with the float64 merge (max |delta| over all the layers), next to
the float32 merge rounded once to bfloat16 (the floor for a bf16 weight).

    flock /tmp/heavy.lock python benchmarks/bench_dora.py            # ~3 min on 2 cores

Writes benchmarks/results/bench_dora_cpu.json and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from _common import cpu_name

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
IMPLS = ("peft", "lora_ext")
MERGE_LAYERS = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"]
MERGE_LAYERS += ["model.layers.15.self_attn.v_proj", "model.layers.29.mlp.up_proj"]


def make_batch(tokenizer: Any, batch: int, seq: int) -> dict[str, torch.Tensor]:
    """A fixed batch of real text, every row exactly ``seq`` tokens (tokens/s is exact)."""
    from lora_ext.training import data as D

    stream: list[int] = []
    for text in D.load_rotten_tomatoes().texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(stream) >= batch * seq:
            break
    ids = torch.tensor(stream[: batch * seq]).view(batch, seq)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def build(impl: str, base: torch.nn.Module, r: int, dropout: float, copy_base: bool = True):
    """(DoRA model in train mode, AdamW over its trainable tensors, their count); on a deep
    copy of ``base`` unless ``copy_base`` is False."""
    torch.manual_seed(1)
    model = copy.deepcopy(base) if copy_base else base
    if impl == "peft":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(
            r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=TARGETS, use_dora=True
        )
        model = get_peft_model(model, cfg)
    else:
        import lora_ext

        cfg = lora_ext.LoraConfig(
            r=r, alpha=2 * r, dropout=dropout, target_modules=TARGETS, use_dora=True
        )
        lora_ext.inject_(model, cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, lr=1e-4), sum(p.numel() for p in params)


def step(model, opt, batch) -> None:
    loss = model(**batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def run_child(args: argparse.Namespace) -> None:
    """One configuration in a fresh process: print the peak RSS its training adds."""
    import resource

    from lora_ext.training import models

    base, tok = models.load_smollm2()
    batch = make_batch(tok, args.batch, args.seq)
    model, opt, _ = build(args.child, base, args.r, args.dropout, copy_base=False)
    del base
    try:  # hand the heap's free pages (loading temporaries) back, so training cannot hide in them
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    baseline = _status_kb("VmRSS")
    try:  # reset VmHWM: the peak below is what training adds, not the loading spike
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    except OSError:
        reset = False
    for _ in range(args.child_steps):
        step(model, opt, batch)
    if reset:
        peak = (_status_kb("VmHWM") - baseline) * 1024
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak_rss_bytes": peak, "since_model_loaded": reset}))


def child_rss(args: argparse.Namespace, impl: str) -> tuple[int, bool]:
    cmd = [sys.executable, __file__, "--child", impl, "--batch", str(args.batch)]
    cmd += ["--seq", str(args.seq), "--r", str(args.r), "--dropout", str(args.dropout)]
    cmd += ["--threads", str(torch.get_num_threads())]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    row = json.loads(out.strip().splitlines()[-1])
    return int(row["peak_rss_bytes"]), bool(row["since_model_loaded"])


def _ulps(merged: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """|merged - exact| in units of bfloat16's spacing at |exact| (0.5: correctly rounded)."""
    _, e = torch.frexp(exact)
    return (merged.double() - exact).abs() / torch.ldexp(torch.ones_like(exact), e - 8)


def merge_errors(base: torch.nn.Module, r: int) -> dict[str, dict[str, float]]:
    """Over MERGE_LAYERS, for our bf16 merge, PEFT's and the float32 merge rounded once:
    max |W_merged - W_float64|, the same in bf16 ulps of each element, and the fraction of
    elements that differ from the float64 merge correctly rounded to bfloat16. (The ulps are
    dominated by elements where W + sBA nearly cancels, whose float32 error is large next to
    their own tiny bf16 spacing: the same for every float32 implementation.)"""
    import peft

    import lora_ext
    from lora_ext import reference as R

    g = torch.Generator().manual_seed(0)
    keys = ("lora_ext", "peft", "float32_rounded_once")
    errors = {k: {"max_abs": 0.0, "max_ulps": 0.0, "not_correctly_rounded": 0} for k in keys}
    total = 0

    def record(key: str, merged: torch.Tensor, exact: torch.Tensor) -> None:
        e = errors[key]
        e["max_abs"] = max(e["max_abs"], float((merged.double() - exact).abs().max()))
        e["max_ulps"] = max(e["max_ulps"], float(_ulps(merged, exact).max()))
        best = exact.to(torch.bfloat16)
        e["not_correctly_rounded"] += int((merged != best).sum())

    for name in MERGE_LAYERS:
        linear = copy.deepcopy(base.get_submodule(name)).to(torch.bfloat16)
        out_f, in_f = linear.weight.shape
        a = torch.randn(r, in_f, generator=g) / in_f**0.5
        b = torch.randn(out_f, r, generator=g) * 0.02
        scale = 2.0
        w = linear.weight.detach().clone()
        m = R.dora_norm(w, a, b, scale).float() * (1 + 0.05 * torch.randn(out_f, generator=g))
        exact = R.dora_merge(w, a, b, scale, m)
        f32 = R.dora_merge_float32(w, a, b, scale, m).to(torch.bfloat16)
        record("float32_rounded_once", f32, exact)
        total += exact.numel()

        ours = lora_ext.inject_(
            torch.nn.Sequential(copy.deepcopy(linear)),
            lora_ext.LoraConfig(r=r, alpha=2 * r, target_modules=["0"], use_dora=True),
        )
        layer = ours[0]
        theirs = peft.get_peft_model(
            torch.nn.Sequential(copy.deepcopy(linear)),
            peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"], use_dora=True),
        )
        t = theirs.base_model.model[0]
        with torch.no_grad():
            for a_, b_, m_ in (
                (
                    layer.lora_A["default"],
                    layer.lora_B["default"],
                    layer.lora_magnitude_vector["default"],
                ),
                (
                    t.lora_A["default"].weight,
                    t.lora_B["default"].weight,
                    t.lora_magnitude_vector["default"].weight,
                ),
            ):
                a_.copy_(a)
                b_.copy_(b)
                m_.copy_(m)
        layer.merge()
        t.merge()
        record("lora_ext", layer.weight.detach(), exact)
        record("peft", t.base_layer.weight.detach(), exact)
    for e in errors.values():
        e["not_correctly_rounded"] /= total
    return errors


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--steps", type=int, default=4, help="timed steps per configuration per round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-rss", action="store_true", help="skip the per-configuration children")
    p.add_argument("--child", choices=IMPLS, help=argparse.SUPPRESS)
    p.add_argument("--child-steps", type=int, default=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        run_child(args)
        return

    from lora_ext.training import models

    base, tok = models.load_smollm2()
    batch = make_batch(tok, args.batch, args.seq)
    tokens = args.batch * args.seq
    built = {}
    for impl in IMPLS:
        model, opt, n_train = build(impl, base, args.r, args.dropout)
        for _ in range(args.warmup):
            step(model, opt, batch)
        built[impl] = (model, opt, n_train)
    times: dict[str, list[float]] = {impl: [] for impl in IMPLS}
    for _ in range(args.rounds * args.steps):
        for impl in IMPLS:
            model, opt, _ = built[impl]
            t = time.perf_counter()
            step(model, opt, batch)
            times[impl].append(time.perf_counter() - t)
    del built
    errors = merge_errors(base, args.r)
    del base
    peaks = {} if args.no_rss else {impl: child_rss(args, impl) for impl in IMPLS}

    rows = []
    for impl in IMPLS:
        med = statistics.median(times[impl])
        peak = peaks.get(impl, (None, None))
        rows.append(
            {
                "impl": impl,
                "step_ms": 1e3 * med,
                "tokens_per_s": tokens / med,
                "peak_memory_bytes": peak[0],
                "peak_since_model_loaded": peak[1],
                "bf16_merge_max_abs_err": errors[impl]["max_abs"],
                "bf16_merge_max_ulps": errors[impl]["max_ulps"],
                "bf16_merge_not_correctly_rounded": errors[impl]["not_correctly_rounded"],
                "steps_timed": len(times[impl]),
            }
        )
    by = {r["impl"]: r for r in rows}
    for r in rows:
        r["speedup_vs_peft"] = by["peft"]["step_ms"] / r["step_ms"]
        if r["peak_memory_bytes"] and by["peft"]["peak_memory_bytes"]:
            r["memory_vs_peft"] = r["peak_memory_bytes"] / by["peft"]["peak_memory_bytes"]
    import peft
    import transformers

    import lora_ext

    result = {
        "benchmark": "dora_train_step_and_bf16_merge",
        "device": cpu_name(),
        "threads": torch.get_num_threads(),
        "model": "smollm2 (SmolLM2-135M-Instruct, float32)",
        "batch": args.batch,
        "seq": args.seq,
        "r": args.r,
        "alpha": 2 * args.r,
        "dropout": args.dropout,
        "targets": TARGETS,
        "memory": "peak RSS added by training (child process per configuration, VmHWM)",
        "merge_layers": MERGE_LAYERS,
        "bf16_merge_float32_rounded_once": errors["float32_rounded_once"],
        "versions": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "lora_ext": lora_ext.__version__,
        },
        "rows": rows,
    }
    out_dir = ROOT / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "bench_dora_cpu.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"DoRA train step, SmolLM2-135M fp32, batch {args.batch} x seq {args.seq}, r={args.r}, "
        f"dropout {args.dropout}, {result['device']}, {result['threads']} threads"
    )
    print(
        f"{'impl':<9} {'step ms':>8} {'tokens/s':>9} {'peak mem':>9} {'speed vs PEFT':>14} "
        f"{'bf16 merge max|d|':>18} {'not correctly rounded':>22}"
    )
    for r in rows:
        mem = f"{r['peak_memory_bytes'] / 2**20:.0f}MiB" if r["peak_memory_bytes"] else "-"
        print(
            f"{r['impl']:<9} {r['step_ms']:>8.0f} {r['tokens_per_s']:>9.1f} {mem:>9} "
            f"{r['speedup_vs_peft']:>13.2f}x {r['bf16_merge_max_abs_err']:>18.3g} "
            f"{r['bf16_merge_not_correctly_rounded']:>22.2e}"
        )
    once = errors["float32_rounded_once"]
    print(
        f"float32 merge rounded once to bf16: max|d| {once['max_abs']:.3g}, "
        f"{once['not_correctly_rounded']:.2e} not correctly rounded"
    )
    print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
