"""Benchmark of the compiled core: lora_linear forward+backward and merge_, side by side.

Measured in one process, interleaved (round-robin over the variants, median of many repeats
after warm-up), so the ratios hold on a noisy machine:

- fwd+bwd of lora_linear vs the frozen nn.Linear (backward computes dx only) vs PEFT's
  lora.Linear, at dropout 0 and 0.1 (GPU: 0.05);
- bytes saved for backward by three adapted projections sharing one input (q, k, v), counted
  with torch.autograd.graph.saved_tensors_hooks (unique storages, parameters excluded);
- merge_ of a 4096x4096 weight, r = 16, vs ``W.add_(s * B @ A)``, with the memory allocated
  during the call (GPU: also as a fraction of the measured device copy bandwidth).

Prints a table, writes JSON to benchmarks/results/bench_op_<device>.json (on a GPU,
bench_op_cuda_<gpu name>.json).

    python benchmarks/bench_op.py            # CPU float32 (and the GPU too, if there is one)
    python benchmarks/bench_op.py --quick    # fewer repeats, for a smoke run
    python benchmarks/bench_op.py --device cpu --tiny --quick   # gpu-check's dry run (seconds)

On a GPU every CUDA kernel variant (``ops.cuda_kernel_variants()``) is timed and the table
says which wins. The table comes last, after a line '== table'.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
from _common import cpu_name, time_call
from torch import nn

from lora_ext import ops

RESULTS = Path(__file__).resolve().parent / "results"

# (tokens, in, out, r)
CPU_SHAPES = [(2048, 1024, 1024, 16), (4096, 2048, 2048, 16)]
GPU_SHAPES = [(8192, 4096, 4096, 16)]
TINY_SHAPES = [(64, 48, 40, 4)]
TARGETS = {  # upper bounds on ratios (ours / other) unless said otherwise
    "cpu": {"fwd_bwd_vs_frozen_p0": 1.10, "fwd_bwd_vs_frozen_p>0": 1.15, "saved_vs_peft_p0": 1.05,
            "merge_speedup_min": 1.5},
    "cuda": {"fwd_bwd_vs_frozen_p0": 1.08, "speedup_vs_peft_p>0_min": 1.3,
             "merge_bandwidth_frac_min": 0.70},
}  # fmt: skip


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(
    fns: dict[str, Callable[[], object]],
    device: torch.device,
    repeats: int,
    warmup: int,
    raw: dict[str, list[float]] | None = None,
):
    """Median seconds per call of each fn, measured round-robin so drift hits all equally.
    ``raw``, if given, receives every timing (seconds, in round order) per fn."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(time_call(fn, device))
    if raw is not None:
        raw.update(times)
    return {k: statistics.median(v) for k, v in times.items()}


def paired_ratio(raw: dict[str, list[float]], num: str, den: str) -> float:
    """Median over rounds of num's time / den's time in the same round: the two ran back to
    back, so a slow stretch of the machine (another process, the allocator returning memory
    to the OS) hits both; a second estimate beside the ratio of the medians."""
    return statistics.median(a / b for a, b in zip(raw[num], raw[den], strict=True))


def _have_peft() -> bool:
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    return True


class Ours(nn.Module):
    """The fused op over a frozen base layer; A and B are this module's parameters."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, p: float):
        super().__init__()
        self.base, self.scale, self.p = base, alpha / r, p
        w = base.weight
        self.a = nn.Parameter(torch.empty(r, w.shape[1], device=w.device, dtype=w.dtype))
        self.b = nn.Parameter(torch.empty(w.shape[0], r, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.a, a=5**0.5)
        nn.init.normal_(self.b, std=0.02)  # B = 0 (the usual init) would make the test too easy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, bias = self.base.weight, self.base.bias
        p = self.p if self.training else 0.0
        return ops.lora_linear(x, w, bias, self.a, self.b, self.scale, p)


def _peft_linear(base: nn.Linear, ours: Ours, r: int, alpha: float, p: float) -> nn.Module:
    """PEFT's lora.Linear over the same base layer, with the same A and B values as ``ours``."""
    from peft import LoraConfig
    from peft.tuners.lora import Linear as PeftLinear

    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=p)
    layer = PeftLinear(base, "default", config=cfg, r=r, lora_alpha=alpha, lora_dropout=p)
    layer = layer.to(device=base.weight.device, dtype=base.weight.dtype)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(ours.a)
        layer.lora_B["default"].weight.copy_(ours.b)
    return layer


def _layers(d_in, d_out, r, p, dtype, device):
    """(frozen base, ours, PEFT or None) sharing one base layer."""
    base = nn.Linear(d_in, d_out, device=device, dtype=dtype).requires_grad_(False)
    ours = Ours(base, r, 2 * r, p)
    peft = _peft_linear(base, ours, r, 2 * r, p) if _have_peft() else None
    return base, ours, peft


def fwd_bwd(shape, p, dtype, device, repeats, warmup, kernels="simple"):
    n, d_in, d_out, r = shape
    base, ours, peft = _layers(d_in, d_out, r, p, dtype, device)
    x = torch.randn(n, d_in, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(n, d_out, device=device, dtype=dtype)

    def step(layer):
        def run():
            x.grad = None
            for prm in (ours.a, ours.b):
                prm.grad = None
            with ops.cuda_kernels(kernels):
                layer(x).backward(g)

        return run

    fns = {"frozen": step(base), "ours": step(ours)}
    if peft is not None:
        fns["peft"] = step(peft)
    raw: dict[str, list[float]] = {}
    t = bench(fns, device, repeats, warmup, raw)
    return {
        "tokens": n, "in": d_in, "out": d_out, "r": r, "dropout": p, "kernels": kernels,
        "ms": {k: v * 1e3 for k, v in t.items()},
        "ours_vs_frozen": t["ours"] / t["frozen"],
        "ours_vs_frozen_paired": paired_ratio(raw, "ours", "frozen"),
        "ours_vs_peft": t["ours"] / t["peft"] if peft is not None else None,
        "peft_vs_frozen": t["peft"] / t["frozen"] if peft is not None else None,
    }  # fmt: skip


def saved_bytes(shape, dtype, device):
    """Bytes held for backward by q, k, v projections of one input (unique storages)."""
    n, d_in, d_out, r = shape

    def count(make_layer, p):
        torch.manual_seed(0)
        layers = [make_layer(p) for _ in range(3)]
        params = {prm.untyped_storage().data_ptr() for lay in layers for prm in lay.parameters()}
        x = torch.randn(n, d_in, device=device, dtype=dtype, requires_grad=True)
        storages: dict[int, int] = {}

        def pack(t):
            st = t.untyped_storage()
            if st.data_ptr() not in params:
                storages[st.data_ptr()] = st.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            outs = [lay(x) for lay in layers]
        total = sum(storages.values())
        del outs
        return total

    def make_ours(p):
        return _layers(d_in, d_out, r, p, dtype, device)[1]

    def make_peft(p):
        return _layers(d_in, d_out, r, p, dtype, device)[2]

    res = {
        "ours_p0.1": count(make_ours, 0.1),
        "input_bytes": n * d_in * torch.finfo(dtype).bits // 8,
    }
    if _have_peft():
        res["peft_p0"] = count(make_peft, 0.0)
        res["peft_p0.1"] = count(make_peft, 0.1)
        res["ours_p0.1_vs_peft_p0"] = res["ours_p0.1"] / res["peft_p0"]
        res["peft_p0.1_vs_peft_p0"] = res["peft_p0.1"] / res["peft_p0"]
    return res


def _cpu_alloc(fn) -> dict[str, int]:
    """Memory allocated during fn on the CPU, from the profiler's per-op memory records.

    Returns the largest single allocation (the question is whether a weight-sized temporary
    exists) and the sum of all allocations (an upper bound of the temporary memory held).
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    allocs = [e.self_cpu_memory_usage for e in prof.events() if e.name != "[memory]"]
    allocs = [a for a in allocs if a > 0]
    return {"largest": max(allocs, default=0), "total": sum(allocs)}


def _gpu_alloc(fn, device) -> dict[str, int]:
    """Peak memory allocated during fn on the GPU beyond what was allocated before."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    return {"largest": peak, "total": peak}


def merge(dtype, device, repeats, warmup, size=4096, r=16):
    """merge_ against ``W.add_(s * B @ A)`` (bench_merge.py measures the bandwidth in depth)."""
    w = torch.randn(size, size, device=device, dtype=dtype)
    a = torch.randn(r, size, device=device, dtype=dtype) * 0.01
    b = torch.randn(size, r, device=device, dtype=dtype) * 0.01
    s = 2.0
    # alternate +s / -s so the weight stays bounded however many repeats run
    sign = [1.0]

    def ours():
        sign[0] = -sign[0]
        ops.merge_(w, a, b, sign[0] * s)

    def naive():
        sign[0] = -sign[0]
        w.add_(sign[0] * s * (b @ a))

    dst = torch.empty_like(w)
    fns = {"ours": ours, "naive": naive}
    if device.type == "cuda":
        fns["copy"] = lambda: dst.copy_(w)
    t = bench(fns, device, repeats, warmup)
    alloc = (lambda f: _gpu_alloc(f, device)) if device.type == "cuda" else _cpu_alloc
    res = {
        "size": size, "r": r, "dtype": str(dtype).replace("torch.", ""),
        "ms": {k: v * 1e3 for k, v in t.items()},
        "speedup_vs_naive": t["naive"] / t["ours"],
        "weight_bytes": w.numel() * w.element_size(),
        "temp_bytes": {"ours": alloc(ours), "naive": alloc(naive)},
    }  # fmt: skip
    if device.type == "cuda":
        # both move 2 x weight bytes (read + write)
        res["bandwidth_frac_of_copy"] = t["copy"] / t["ours"]
    return res


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = cpu_name()
    return f"{name} ({torch.get_num_threads()} threads)"


def run_device(
    device: torch.device, quick: bool, repeats: int | None = None, tiny: bool = False
) -> dict:
    cpu = device.type == "cpu"
    dtype = torch.float32 if cpu else torch.bfloat16
    shapes = TINY_SHAPES if tiny else (CPU_SHAPES if cpu else GPU_SHAPES)
    variants = ["simple"] if cpu else ops.cuda_kernel_variants()
    drops = (0.0, 0.1) if cpu else (0.0, 0.05)
    default_repeats, warmup = (5, 1) if quick else ((25, 3) if cpu else (50, 10))
    repeats = repeats or default_repeats
    peft_version = None
    if _have_peft():
        import peft

        peft_version = peft.__version__
    out = {
        "device": device_name(device), "device_type": device.type,
        "dtype": str(dtype).replace("torch.", ""),
        "torch": torch.__version__, "peft": peft_version, "build_info": ops.build_info(),
        "repeats": repeats, "warmup": warmup, "fwd_bwd": [], "saved_bytes": [],
        "targets": TARGETS["cpu" if cpu else "cuda"],
    }  # fmt: skip
    for shape in shapes:
        for p in drops:
            for kernels in variants:
                out["fwd_bwd"].append(fwd_bwd(shape, p, dtype, device, repeats, warmup, kernels))
                print(_fmt_fwd(out["fwd_bwd"][-1]), flush=True)
        out["saved_bytes"].append({"shape": list(shape), **saved_bytes(shape, dtype, device)})
    out["merge"] = merge(dtype, device, repeats, warmup, size=64 if tiny else 4096)
    if len(variants) > 1:  # which CUDA kernels win, per case (ours' median time)
        best: dict[str, tuple[float, str]] = {}
        for row in out["fwd_bwd"]:
            key = f"{row['tokens']}x{row['in']}x{row['out']} r{row['r']} p={row['dropout']}"
            cand = (row["ms"]["ours"], row["kernels"])
            best[key] = min(best.get(key, cand), cand)
        out["fastest_kernels"] = {k: v[1] for k, v in best.items()}
    return out


def _fmt_fwd(row: dict) -> str:
    ms = row["ms"]
    return (
        f"  fwd+bwd {row['tokens']}x{row['in']}->{row['out']} r={row['r']} p={row['dropout']}: "
        f"frozen {ms['frozen']:.2f} ms, ours {ms['ours']:.2f} ms ({row['ours_vs_frozen']:.3f}x, "
        f"paired {row['ours_vs_frozen_paired']:.3f}x), "
        f"peft {ms['peft']:.2f} ms ({row['peft_vs_frozen']:.3f}x)"
    )


def table(res: dict) -> str:
    tg = res["targets"]
    lines = [f"lora_ext op benchmark on {res['device']} ({res['dtype']}, torch {res['torch']}, "
             f"peft {res['peft']}, median of {res['repeats']})"]  # fmt: skip
    lines.append(
        f"{'case':<44}{'frozen':>9}{'ours':>9}{'peft':>9}{'ours/frz':>10}{'paired':>9}"
        f"{'peft/ours':>10}  target"
    )
    for row in res["fwd_bwd"]:
        ms = {"peft": float("nan"), **row["ms"]}
        p = row["dropout"]
        vs_peft = 1 / row["ours_vs_peft"] if row["ours_vs_peft"] else float("nan")
        target = tg.get("fwd_bwd_vs_frozen_p0" if p == 0 else "fwd_bwd_vs_frozen_p>0")
        verdict = ""
        if target is not None:
            verdict = f"<= {target:.2f}x {'ok' if row['ours_vs_frozen'] <= target else 'MISSED'}"
        if p > 0 and "speedup_vs_peft_p>0_min" in tg:
            need = tg["speedup_vs_peft_p>0_min"]
            verdict += f" peft/ours >= {need} {'ok' if vs_peft >= need else 'MISSED'}"
        case = f"fwd+bwd {row['tokens']}x{row['in']}x{row['out']} r{row['r']} p={p}"
        if res["device_type"] == "cuda":
            case += f" [{row.get('kernels', 'simple')}]"
        lines.append(
            f"{case:<44}{ms['frozen']:>7.2f}ms{ms['ours']:>7.2f}ms{ms['peft']:>7.2f}ms"
            f"{row['ours_vs_frozen']:>9.3f}x{row.get('ours_vs_frozen_paired', float('nan')):>8.3f}x"
            f"{vs_peft:>9.3f}x  {verdict}"
        )
    for sb in res["saved_bytes"]:
        mb = 1 / 2**20
        if "peft_p0" not in sb:
            lines.append(
                f"saved for bwd, q/k/v of one x: ours p=0.1 {sb['ours_p0.1'] * mb:.1f} MiB (no peft)"
            )
            continue
        ratio = sb["ours_p0.1_vs_peft_p0"]
        target = tg.get("saved_vs_peft_p0")
        verdict = f"<= {target}x {'ok' if ratio <= target else 'MISSED'}" if target else ""
        lines.append(
            f"saved for bwd, q/k/v of one x {sb['shape'][0]}x{sb['shape'][1]}: ours p=0.1 "
            f"{sb['ours_p0.1'] * mb:.1f} MiB, peft p=0 {sb['peft_p0'] * mb:.1f} MiB, peft p=0.1 "
            f"{sb['peft_p0.1'] * mb:.1f} MiB -> ours/peft_p0 {ratio:.3f}x  {verdict}"
        )
    m = res["merge"]
    mb = 1 / 2**20
    line = (
        f"merge_ {m['size']}x{m['size']} r{m['r']} {m['dtype']}: ours {m['ms']['ours']:.2f} ms, "
        f"W.add_(s*B@A) {m['ms']['naive']:.2f} ms -> {m['speedup_vs_naive']:.2f}x faster; largest "
        f"temporary ours {m['temp_bytes']['ours']['largest'] * mb:.2f} MiB vs "
        f"{m['temp_bytes']['naive']['largest'] * mb:.1f} MiB (weight {m['weight_bytes'] * mb:.0f} MiB)"
    )
    if "merge_speedup_min" in tg:
        line += f"  >= {tg['merge_speedup_min']}x {'ok' if m['speedup_vs_naive'] >= tg['merge_speedup_min'] else 'MISSED'}"
    if "bandwidth_frac_of_copy" in m:
        need = tg["merge_bandwidth_frac_min"]
        line += f"; {100 * m['bandwidth_frac_of_copy']:.0f}% of copy bandwidth (>= {100 * need:.0f}% {'ok' if m['bandwidth_frac_of_copy'] >= need else 'MISSED'})"
    lines.append(line)
    for case, kernels in res.get("fastest_kernels", {}).items():
        lines.append(f"fastest CUDA kernels for {case}: {kernels}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda", "all"], default="all",
                    help="all = the CPU, and the GPU when there is one")  # fmt: skip
    ap.add_argument("--quick", action="store_true", help="few repeats (smoke run)")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (gpu-check's dry run)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="directory for the JSON results")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed rounds per case (default: 25 on the CPU, 50 on a GPU)")  # fmt: skip
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = []
    if args.device in ("cpu", "all"):
        devices.append(torch.device("cpu"))
    if args.device in ("cuda", "all") and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    elif args.device == "cuda":
        raise SystemExit("--device cuda: no CUDA device available")
    tables = []
    for device in devices:
        print(f"== {device_name(device)}", flush=True)
        res = run_device(device, args.quick, args.repeats, args.tiny)
        args.out.mkdir(parents=True, exist_ok=True)
        if device.type == "cuda":  # the GPU named in the file: bench_op_cuda_nvidia_h100_....json
            tag = "_" + re.sub(r"[^a-z0-9]+", "_", device_name(device).lower()).strip("_")
        else:
            tag = f"_t{args.threads}" if args.threads else ""
        tag += "_tiny" if args.tiny else ("_quick" if args.quick else "")
        path = args.out / f"bench_op_{device.type}{tag}.json"
        path.write_text(json.dumps(res, indent=2))
        print(f"wrote {path}")
        tables.append(table(res))
    print("== table")
    print("\n\n".join(tables))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
