"""Training step: lora_ext vs PEFT with the same LoRA config, side by side in one process.

For each LoRA dropout (0.05 and 0) both implementations train the same model on the same
fixed batch (real Rotten Tomatoes snippets for MiniLM, real text for SmolLM2) with AdamW over
the same trainable tensors (LoRA + the classifier head for MiniLM). Timed steps alternate
between the configurations (round robin) so that machine noise hits them alike; the figure is
the median step time (forward + backward + optimizer) over all timed steps.

Peak memory: on CUDA torch.cuda.max_memory_allocated while a configuration is built and
warmed up, less what earlier configurations hold; on the CPU the peak
resident set of a fresh child process per configuration that runs the same steps, counted from
the moment the model is loaded (Linux's VmHWM reset), i.e. what training adds.

    python benchmarks/bench_train.py                        # MiniLM on the CPU
    python benchmarks/bench_train.py --model smollm2 --batch 8 --seq 256   # on a GPU

Writes benchmarks/results/bench_train_<device>.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from _common import cpu_name

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGETS = {
    "minilm": ["query", "key", "value", "dense"],
    "smollm2": ["q_proj", "k_proj", "v_proj", "o_proj"],
}
IMPLS = ("peft", "lora_ext")


def make_batch(model_name: str, tokenizer: Any, batch: int, seq: int) -> dict[str, torch.Tensor]:
    """A fixed batch of real text, every row exactly ``seq`` tokens (tokens/s is exact)."""
    from lora_ext.training import data as D

    ds = D.load_rotten_tomatoes()
    stream: list[int] = []
    for text in ds.texts[: 40 * batch * max(1, seq // 16)]:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(stream) >= batch * seq:
            break
    ids = torch.tensor(stream[: batch * seq]).view(batch, seq)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if model_name == "minilm":
        out["labels"] = torch.tensor([i % 2 for i in range(batch)])
    else:
        out["labels"] = ids.clone()
    return out


def build(impl: str, model_name: str, r: int, alpha: float, dropout: float, device: torch.device):
    """(model in train mode on device, AdamW over its trainable tensors)."""
    from lora_ext.training import models

    if model_name == "minilm":
        model, _ = models.load_minilm_classifier(2, seed=0)
        head = ["classifier"]
    else:
        model, _ = models.load_smollm2()
        head = []
    torch.manual_seed(1)
    if impl == "peft":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(
            r=r,
            lora_alpha=alpha,
            lora_dropout=dropout,
            target_modules=TARGETS[model_name],
            modules_to_save=head or None,
        )
        model = get_peft_model(model, cfg)
    else:
        import lora_ext

        lora_ext.inject_(
            model,
            lora_ext.LoraConfig(
                r=r, alpha=alpha, dropout=dropout, target_modules=TARGETS[model_name]
            ),
        )
        for name in head:
            for p in getattr(model, name).parameters():
                p.requires_grad_(True)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, lr=1e-4), sum(p.numel() for p in params)


def step(model, opt, batch, amp: torch.dtype | None, device: torch.device) -> None:
    ctx = (
        torch.autocast(device.type, dtype=amp)
        if amp
        else torch.autocast(device.type, enabled=False)
    )
    with ctx:
        loss = model(**batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def child_rss(args: argparse.Namespace, impl: str, dropout: float) -> int:
    """Peak RSS (bytes) of a fresh process running the same steps of one configuration."""
    cmd = [sys.executable, __file__, "--child", impl, str(dropout), "--model", args.model]
    cmd += [
        "--batch",
        str(args.batch),
        "--seq",
        str(args.seq),
        "--r",
        str(args.r),
        "--steps",
        "3",
        "--device",
        "cpu",
    ]
    cmd += ["--threads", str(torch.get_num_threads())]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return int(json.loads(out.strip().splitlines()[-1])["peak_rss_bytes"])


def run_child(args: argparse.Namespace) -> None:
    impl, dropout = args.child[0], float(args.child[1])
    device = torch.device("cpu")
    from lora_ext.training import models

    tok = models.load_tokenizer(args.model)
    batch = make_batch(args.model, tok, args.batch, args.seq)
    model, opt, _ = build(impl, args.model, args.r, 2.0 * args.r, dropout, device)
    # Reset the kernel's peak-RSS mark (VmHWM) once the model is loaded, so the peak below is
    # what training adds (activations, gradients, optimizer state), not the loading spike.
    baseline = _status_kb("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    except OSError:
        reset = False
    for _ in range(args.steps):
        step(model, opt, batch, None, device)
    if reset:
        peak = (_status_kb("VmHWM") - baseline) * 1024
    else:  # no reset possible: the whole process's peak
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak_rss_bytes": peak, "since_model_loaded": reset}))


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="minilm", choices=sorted(TARGETS))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--steps", type=int, default=10, help="timed steps per configuration per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--no-rss", action="store_true", help="CPU: skip the per-configuration child processes"
    )
    p.add_argument("--child", nargs=2, metavar=("IMPL", "DROPOUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        run_child(args)
        return
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else args.device.replace("auto", "cpu")
    )
    amp = torch.bfloat16 if device.type == "cuda" else None

    from lora_ext.training import models

    tok = models.load_tokenizer(args.model)
    batch = {k: v.to(device) for k, v in make_batch(args.model, tok, args.batch, args.seq).items()}
    tokens = args.batch * args.seq
    configs = [(impl, d) for d in (0.05, 0.0) for impl in IMPLS]
    built = {}
    peak_mem: dict[tuple[str, float], int | None] = {}
    for impl, d in configs:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            before = torch.cuda.memory_allocated(device)  # the configurations built so far
            torch.cuda.reset_peak_memory_stats(device)
        model, opt, n_train = build(impl, args.model, args.r, 2.0 * args.r, d, device)
        for _ in range(args.warmup):
            step(model, opt, batch, amp, device)
        sync(device)
        if device.type == "cuda":
            # this configuration's own peak: its weights, optimizer state and activations
            peak_mem[(impl, d)] = torch.cuda.max_memory_allocated(device) - before
        built[(impl, d)] = (model, opt, n_train)
    # Step-level round robin: each timed step of one configuration is followed by one of
    # each other, so a burst of machine noise lands on all of them alike.
    times: dict[tuple[str, float], list[float]] = {c: [] for c in configs}
    for _ in range(args.rounds * args.steps):
        for c in configs:
            model, opt, _ = built[c]
            sync(device)
            t = time.perf_counter()
            step(model, opt, batch, amp, device)
            sync(device)
            times[c].append(time.perf_counter() - t)
    if device.type == "cpu" and not args.no_rss:
        for c in configs:
            peak_mem[c] = child_rss(args, *c)

    rows = []
    for impl, d in configs:
        med = statistics.median(times[(impl, d)])
        rows.append(
            {
                "impl": impl,
                "dropout": d,
                "step_ms": 1e3 * med,
                "tokens_per_s": tokens / med,
                "peak_memory_bytes": peak_mem.get((impl, d)),
                "trainable_params": built[(impl, d)][2],
                "steps_timed": len(times[(impl, d)]),
            }
        )
    by = {(r["impl"], r["dropout"]): r for r in rows}
    for r in rows:
        peft = by[("peft", r["dropout"])]
        r["speedup_vs_peft"] = peft["step_ms"] / r["step_ms"]
        if r["peak_memory_bytes"] and peft["peak_memory_bytes"]:
            r["memory_vs_peft"] = r["peak_memory_bytes"] / peft["peak_memory_bytes"]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    result = {
        "benchmark": "train_step",
        "device": name,
        "device_type": device.type,
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "model": args.model,
        "batch": args.batch,
        "seq": args.seq,
        "r": args.r,
        "alpha": 2.0 * args.r,
        "targets": TARGETS[args.model],
        "precision": "bf16 autocast" if amp else "fp32",
        "memory": "torch.cuda.max_memory_allocated"
        if device.type == "cuda"
        else "peak RSS added by training (child process, VmHWM)",
        "versions": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            **_versions(),
        },
        "rows": rows,
    }
    out_dir = ROOT / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"bench_train_{args.model}_{device.type}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"train step, {args.model}, batch {args.batch} x seq {args.seq}, r={args.r}, {result['precision']}, {name}"
    )
    print(
        f"{'impl':<10} {'dropout':>7} {'step ms':>9} {'tokens/s':>10} {'peak mem':>10} {'speed vs PEFT':>14} {'mem vs PEFT':>12}"
    )
    for r in rows:
        mem = f"{r['peak_memory_bytes'] / 2**20:.0f}MiB" if r["peak_memory_bytes"] else "-"
        ratio = f"{r['memory_vs_peft']:.2f}x" if r.get("memory_vs_peft") else "-"
        print(
            f"{r['impl']:<10} {r['dropout']:>7.2f} {r['step_ms']:>9.1f} {r['tokens_per_s']:>10.0f} "
            f"{mem:>10} {r['speedup_vs_peft']:>13.2f}x {ratio:>12}"
        )
    print(f"wrote {path.relative_to(ROOT)}")


def _versions() -> dict[str, str]:
    import peft
    import transformers

    import lora_ext

    return {
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "lora_ext": lora_ext.__version__,
    }


if __name__ == "__main__":
    main()
