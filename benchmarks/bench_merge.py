"""Merge bandwidth: ``merge_`` (W += s·B·A in place) against the device's own copy bandwidth.

merge_ reads and writes every weight element once, as ``dst.copy_(W)`` reads and writes it
once, so their time ratio is the fraction of the copy bandwidth the merge reaches (target on a
GPU: >= 70%). Each CUDA kernel variant (``ops.cuda_kernel_variants()``: the simple kernel and
the vectorised one) is timed, interleaved with the copy and with PyTorch's
``W.add_(s * B @ A)``; median of many repeats after warm-up (CUDA events on a GPU).

    python benchmarks/bench_merge.py --device cuda      # bf16 and fp32, 8192 x 8192, r = 16
    python benchmarks/bench_merge.py --device cpu --tiny --quick   # the dry run's smoke shapes

Writes benchmarks/results/bench_merge_<device>[_<gpu>].json, prints a table after '== table'.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

import torch
from _common import cpu_name, time_call

from lora_ext import ops

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_FRAC = 0.70  # of the measured copy bandwidth, on a GPU


def _time(fns: dict, device: torch.device, repeats: int, warmup: int) -> dict[str, float]:
    """Median seconds per call, round-robin over fns."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(time_call(fn, device))
    return {k: statistics.median(v) for k, v in times.items()}


def case(size: tuple[int, int], r: int, dtype: torch.dtype, device: torch.device, repeats, warmup):
    out_f, in_f = size
    g = torch.Generator(device="cpu").manual_seed(0)
    w = torch.randn(out_f, in_f, generator=g).to(device=device, dtype=dtype)
    a = (torch.randn(r, in_f, generator=g) * 0.01).to(device)  # fp32 adapters, as trained
    b = (torch.randn(out_f, r, generator=g) * 0.01).to(device)
    dst = torch.empty_like(w)
    sign = [1.0]

    def merge_with(variant: str):
        def run():
            sign[0] = -sign[0]  # +s / -s: the weight stays bounded over any number of repeats
            with ops.cuda_kernels(variant):
                ops.merge_(w, a, b, 2.0 * sign[0])

        return run

    def naive():
        sign[0] = -sign[0]
        w.add_(2.0 * sign[0] * (b.to(dtype) @ a.to(dtype)))

    variants = ops.cuda_kernel_variants() if device.type == "cuda" else ["cpu"]
    fns = {f"merge_{v}": merge_with(v if device.type == "cuda" else "simple") for v in variants}
    fns["copy"] = lambda: dst.copy_(w)
    fns["naive"] = naive
    t = _time(fns, device, repeats, warmup)
    moved = 2 * w.numel() * w.element_size()  # read + write of W
    row = {
        "out": out_f, "in": in_f, "r": r, "dtype": str(dtype).replace("torch.", ""),
        "ms": {k: v * 1e3 for k, v in t.items()},
        "copy_GBps": moved / t["copy"] / 1e9,
        "variants": {},
    }  # fmt: skip
    for v in variants:
        tv = t[f"merge_{v}"]
        row["variants"][v] = {
            "ms": tv * 1e3,
            "GBps": moved / tv / 1e9,
            "frac_of_copy": t["copy"] / tv,
            "speedup_vs_naive": t["naive"] / tv,
        }
    row["best"] = max(row["variants"], key=lambda v: row["variants"][v]["frac_of_copy"])
    return row


def table(res: dict) -> str:
    lines = [
        f"merge_ bandwidth on {res['device']} (torch {res['torch']}, median of {res['repeats']})",
        f"{'case':<28}{'variant':<9}{'ms':>9}{'GB/s':>9}{'of copy':>9}{'vs naive':>10}  target",
    ]
    for row in res["rows"]:
        name = f"{row['out']}x{row['in']} r{row['r']} {row['dtype']}"
        for v, m in row["variants"].items():
            verdict = ""
            if res["device_type"] == "cuda":
                ok = m["frac_of_copy"] >= TARGET_FRAC
                verdict = f">= {TARGET_FRAC:.0%} {'ok' if ok else 'MISSED'}"
                verdict += " (best)" if v == row["best"] else ""
            lines.append(
                f"{name:<28}{v:<9}{m['ms']:>9.3f}{m['GBps']:>9.1f}{m['frac_of_copy']:>8.0%}"
                f"{m['speedup_vs_naive']:>9.2f}x  {verdict}"
            )
        lines.append(f"{'':<28}{'copy':<9}{row['ms']['copy']:>9.3f}{row['copy_GBps']:>9.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    ap.add_argument("--tiny", action="store_true", help="smoke shapes (the CPU dry run)")
    ap.add_argument("--quick", action="store_true", help="few repeats")
    ap.add_argument("--out", type=Path, default=RESULTS, help="directory for the JSON")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    if args.tiny:
        sizes = [((64, 96), 4)]
    elif device.type == "cuda":  # 128 MiB of bf16: several times the 60 MB L2 of an H200
        sizes = [((8192, 8192), 16), ((4096, 4096), 16)]
    else:
        sizes = [((4096, 4096), 16)]
    dtypes = [torch.bfloat16, torch.float32]
    repeats, warmup = (5, 1) if args.quick else (50, 10)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        tag = "_" + re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    else:
        name, tag = f"{cpu_name()} ({torch.get_num_threads()} threads)", ""
    res = {
        "benchmark": "merge_bandwidth", "device": name, "device_type": device.type,
        "torch": torch.__version__, "build_info": ops.build_info(), "repeats": repeats,
        "target_frac_of_copy": TARGET_FRAC if device.type == "cuda" else None, "rows": [],
    }  # fmt: skip
    for size, r in sizes:
        for dtype in dtypes:
            res["rows"].append(case(size, r, dtype, device, repeats, warmup))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"bench_merge_{device.type}{tag}{'_tiny' if args.tiny else ''}.json"
    path.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {path}")
    print("== table")
    print(table(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
