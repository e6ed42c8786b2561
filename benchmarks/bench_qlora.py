"""QLoRA on the CPU: SmolLM2-135M training tokens/s and peak memory over a float32, bfloat16 and
bitsandbytes nf4 frozen base (lora_ext vs PEFT + bitsandbytes), and the error of a bf16 merge of
the nf4 base (lora_ext vs PEFT's merge_and_unload), as max |delta| against a float64 merge.

Each training configuration runs in its own subprocess (``--child NAME``) so that its memory
figures are its own: the model is loaded (bundled SmolLM2-135M-Instruct, float32, through
``lora_ext.training.models.load_model``), converted (bf16 / nf4), LoRA is added (r 16, alpha 32,
dropout 0.05, q/k/v/o/gate/up/down_proj), freed memory is given back to the OS (malloc_trim,
and MALLOC_MMAP_THRESHOLD_ fixed at 128 KiB in every child: the peak is the live memory's, not
glibc's heap high-water mark; it also makes every large temporary an mmap, which slows those
steps, so the speed comparison to read is the interleaved one below), the kernel's peak-RSS
counter is reset
(/proc/self/clear_refs) and ``--steps`` AdamW steps run on the same batches of Rotten Tomatoes
text. Then lora_ext and PEFT train over the same nf4 base in one process (this one, default
allocator), their steps alternating on the same batches: tokens/s of each, robust to the load
of a shared machine drifting between processes. Reported per configuration: tokens/s (median step after ``--warmup``), peak RSS during
training (VmHWM), the RSS of the runtime alone (after imports, before the model), the training
peak above it, the model's tensor bytes (state_dict: base + adapter), and the whole process's
ru_maxrss (which includes loading the float32 model).

The merge part (in this process): the model in bfloat16, its linear layers quantized to nf4
(compute dtype bf16), adapters with seeded random B; max |W' - W64| over the adapted layers,
where W64 = dequantize(W) (float32, exact) + s B A in float64: ours is merge_and_unload(dtype=
bf16) (float32 tiles, one rounding), PEFT's is its merge_and_unload (dequantize in bf16, add,
re-quantize to nf4), read back by dequantizing. The floor is W64 rounded once to bf16.

    flock /tmp/heavy.lock python benchmarks/bench_qlora.py              # ~4 min on 2 cores
    python benchmarks/bench_qlora.py --tiny --steps 2                   # dry run (tiny Llama)

Writes benchmarks/results/bench_qlora_cpu.json (--tiny: bench_qlora_cpu_tiny.json) and prints
a table after '== table'.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# base + implementation; "nf4-bf16": the model in bfloat16, its linear layers nf4 with bf16 compute
# (QLoRA's usual set-up), "nf4": nf4 with float32 compute and float32 embeddings/norms
CONFIGS = [
    "fp32+lora_ext", "bf16+lora_ext", "nf4+lora_ext", "nf4+peft", "nf4-bf16+lora_ext",
    "nf4-bf16+peft",
]  # fmt: skip
TINY = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    tie_word_embeddings=True,
)  # fmt: skip


def _rss_kib(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _give_back_memory() -> None:
    import contextlib
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def load(tiny: bool):
    """(LlamaForCausalLM float32 eval, tokenizer or None, description)."""
    if tiny:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(**TINY)).eval(), None, "tiny Llama (dry run)"
    from lora_ext.config import Task
    from lora_ext.training import models

    model, tok = models.load_model("smollm2", Task.CAUSAL_LM)
    return model, tok, "SmolLM2-135M-Instruct (bundled GGUF, dequantized to float32)"


def batches(tok, vocab: int, n: int, batch: int, seq: int) -> list[torch.Tensor]:
    """n batches of token ids [batch, seq]: Rotten Tomatoes text, else seeded random ids."""
    if tok is not None:
        from lora_ext.training import data as D

        stream: list[int] = []
        for text in D.load_rotten_tomatoes().texts:
            stream += tok(text, add_special_tokens=False)["input_ids"]
            if len(stream) >= n * batch * seq:
                break
        ids = torch.tensor(stream[: n * batch * seq]).view(n, batch, seq)
        return list(ids)
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (batch, seq), generator=g) for _ in range(n)]


def _tensor_bytes(model) -> int:
    """Bytes of the model's tensors (state_dict; a tied lm_head counted once)."""
    seen, total = set(), 0
    for t in model.state_dict().values():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def build(name: str, model, r: int, dropout: float):
    """The model of one configuration (in place where possible)."""
    import lora_ext
    from lora_ext import quantized

    base, impl = name.split("+")
    lcfg = dict(r=r, alpha=2 * r, dropout=dropout, target_modules=TARGETS)
    if "bf16" in base:
        model = model.to(torch.bfloat16)
    if impl == "lora_ext":
        quant = "nf4" if base.startswith("nf4") else None
        return lora_ext.inject_(model, lora_ext.LoraConfig(**lcfg, base_quantization=quant))
    from peft import LoraConfig, get_peft_model

    quantized.quantize_base_(model, "nf4")  # the same bitsandbytes layers PEFT would get
    model.__dict__["is_loaded_in_4bit"] = True  # what PEFT reads to pick its bnb LoRA layer
    return get_peft_model(
        model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=TARGETS)
    )


def child(args) -> dict:
    """One configuration, in this (fresh) process; returns its row."""
    torch.set_num_threads(args.threads)
    import bitsandbytes  # noqa: F401  (imported by every child: the runtime is the same)
    import peft  # noqa: F401
    import transformers  # noqa: F401

    import lora_ext  # noqa: F401

    _give_back_memory()
    runtime_kib = _rss_kib()
    model, tok, what = load(args.tiny)
    data = batches(tok, model.config.vocab_size, args.steps, args.batch, args.seq)
    torch.manual_seed(2)
    model = build(args.child, model, args.r, args.dropout).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    tensor_bytes = _tensor_bytes(model)
    _give_back_memory()
    reset = _reset_peak()
    start_kib = _rss_kib()
    times, losses = [], []
    for ids in data:
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    peak_kib = _rss_kib("VmHWM")
    warm = min(args.warmup, len(times) - 1)
    step_s = statistics.median(times[warm:])
    return {
        "config": args.child, "model": what, "step_ms": step_s * 1e3,
        "tokens_per_s": args.batch * args.seq / step_s,
        "peak_rss_train_bytes": peak_kib * 1024, "runtime_rss_bytes": runtime_kib * 1024,
        "train_above_runtime_bytes": (peak_kib - runtime_kib) * 1024,
        "rss_before_steps_bytes": start_kib * 1024, "peak_reset": reset,
        "model_tensor_bytes": tensor_bytes,
        "process_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "first_loss": losses[0], "last_loss": losses[-1],
        "trainable_params": sum(p.numel() for p in params),
        "steps": len(times), "timed_steps": len(times) - warm,
        "loadavg_after": Path("/proc/loadavg").read_text().split()[:3],
    }  # fmt: skip


def interleaved_speed(args, base: str) -> dict:
    """tokens/s of lora_ext and PEFT over one nf4 base (``base``: "nf4" or "nf4-bf16") in one
    process, their steps alternating on the same batches: the ratio is robust to a shared
    machine's load drifting between the separate processes above (no memory figures here)."""
    import copy

    from peft import LoraConfig, get_peft_model

    import lora_ext
    from lora_ext import quantized

    torch.set_num_threads(args.threads)
    model, tok, _ = load(args.tiny)
    if base == "nf4-bf16":
        model = model.to(torch.bfloat16)
    quantized.quantize_base_(model, "nf4")
    steps = args.interleaved_steps
    data = batches(tok, model.config.vocab_size, steps, args.batch, args.seq)
    lcfg = dict(r=args.r, alpha=2 * args.r, dropout=args.dropout, target_modules=TARGETS)
    torch.manual_seed(2)
    ours = lora_ext.inject_(copy.deepcopy(model), lora_ext.LoraConfig(**lcfg)).train()
    twin = copy.deepcopy(model)
    twin.__dict__["is_loaded_in_4bit"] = True
    theirs = get_peft_model(
        twin,
        LoraConfig(
            r=args.r, lora_alpha=2 * args.r, lora_dropout=args.dropout, target_modules=TARGETS
        ),
    ).train()
    del model
    # lora_ext's two 4-bit paths (quantized.qlora_path): the default on this device, and the
    # other one, each with its own model copy and optimizer
    default = "fused" if quantized._use_fused_on(torch.device("cpu")) else "separate"
    other = "separate" if default == "fused" else "fused"
    runs = {}
    for name, m, path in (
        ("lora_ext", ours, default), (f"lora_ext_{other}", copy.deepcopy(ours), other),
        ("peft", theirs, "auto"),
    ):  # fmt: skip
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
        runs[name] = (m, opt, path, [])
    for ids in data:
        for m, opt, path, times in runs.values():
            with quantized.qlora_path(path):
                t0 = time.perf_counter()
                m(input_ids=ids, labels=ids).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                times.append(time.perf_counter() - t0)
    warm = min(args.warmup, steps - 1)
    tps = {n: args.batch * args.seq / statistics.median(r[3][warm:]) for n, r in runs.items()}
    return {
        "base": base, "tokens_per_s_lora_ext": tps["lora_ext"], "tokens_per_s_peft": tps["peft"],
        "speedup_vs_peft": tps["lora_ext"] / tps["peft"], "timed_steps": steps - warm,
        "lora_ext_path": default, f"tokens_per_s_lora_ext_{other}": tps[f"lora_ext_{other}"],
        f"speedup_vs_peft_{other}": tps[f"lora_ext_{other}"] / tps["peft"],
    }  # fmt: skip


def merge_errors(args) -> dict:
    """max |W' - W64| of a bf16 merge of the nf4 base: ours vs PEFT's merge_and_unload."""
    import copy

    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    import lora_ext
    from lora_ext import quantized
    from lora_ext.inject import lora_layers

    model, _, _ = load(args.tiny)
    model = quantized.quantize_base_(model.to(torch.bfloat16), "nf4")
    base = copy.deepcopy(model)
    lora_ext.inject_(model, lora_ext.LoraConfig(r=args.r, alpha=2 * args.r, target_modules=TARGETS))
    g = torch.Generator().manual_seed(3)
    exact, ours_layers = {}, {}
    with torch.no_grad():
        for name, layer in lora_layers(model):
            b = layer.lora_B["default"]
            b.copy_(torch.randn(b.shape, generator=g) * 0.02)
            w64 = quantized.dequantized_weight(layer.base_layer).double()
            exact[name] = w64 + layer.get_delta_weight("default").double()
            ours_layers[name] = layer
    twin = copy.deepcopy(base)
    twin.__dict__["is_loaded_in_4bit"] = True
    pm = get_peft_model(
        twin, LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=0.0, target_modules=TARGETS)
    )
    with torch.no_grad():
        for name, layer in ours_layers.items():
            theirs = pm.base_model.model.get_submodule(name)
            theirs.lora_A["default"].weight.copy_(layer.lora_A["default"])
            theirs.lora_B["default"].weight.copy_(layer.lora_B["default"])
    t0 = time.perf_counter()
    merged = lora_ext.merge_and_unload(model, dtype=torch.bfloat16)
    ours_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    peft_merged = pm.merge_and_unload()
    peft_s = time.perf_counter() - t0
    err_ours = err_peft = floor = 0.0
    for name, w64 in exact.items():
        mine = merged.get_submodule(name).weight.double()
        theirs_layer = peft_merged.get_submodule(name)
        assert isinstance(theirs_layer, bnb.nn.Linear4bit)  # PEFT merged back into 4 bits
        theirs = quantized.dequantized_weight(theirs_layer, torch.bfloat16).double()
        err_ours = max(err_ours, float((mine - w64).abs().max()))
        err_peft = max(err_peft, float((theirs - w64).abs().max()))
        floor = max(floor, float((w64.to(torch.bfloat16).double() - w64).abs().max()))
    return {
        "layers": len(exact), "max_abs_err_lora_ext": err_ours, "max_abs_err_peft": err_peft,
        "max_abs_err_one_rounding": floor, "merge_s_lora_ext": ours_s, "merge_s_peft": peft_s,
        "peft_result": "bitsandbytes Linear4bit (re-quantized), dequantized to bf16 to compare",
    }  # fmt: skip


def table(res: dict) -> str:
    mib = 2**20
    lines = [
        f"QLoRA training on {res['device']} ({res['cpu']}, {res['threads']} threads), "
        f"{res['model']}, batch {res['batch']} x seq {res['seq']}, r={res['r']}, "
        f"dropout {res['dropout']}, {res['steps']} steps ({res['warmup']} warm-up)",
        f"{'config':<19}{'tokens/s':>10}{'step ms':>9}{'peak RSS':>10}{'above rt':>10}"
        f"{'tensors':>9}{'maxrss':>9}{'loss first->last':>19}",
    ]
    for row in res["rows"]:
        lines.append(
            f"{row['config']:<19}{row['tokens_per_s']:>10.1f}{row['step_ms']:>9.0f}"
            f"{row['peak_rss_train_bytes'] / mib:>8.0f}Mi{row['train_above_runtime_bytes'] / mib:>8.0f}Mi"
            f"{row['model_tensor_bytes'] / mib:>7.0f}Mi{row['process_maxrss_bytes'] / mib:>7.0f}Mi"
            f"{row['first_loss']:>10.3f}->{row['last_loss']:<7.3f}"
        )
    for row in res.get("interleaved", []):
        other = "separate" if row.get("lora_ext_path", "fused") == "fused" else "fused"
        lines.append(
            f"interleaved in one process, {row['base']}: lora_ext ({row.get('lora_ext_path')} "
            f"path) {row['tokens_per_s_lora_ext']:.1f} vs PEFT {row['tokens_per_s_peft']:.1f} "
            f"tokens/s = {row['speedup_vs_peft']:.2f}x; {other} path "
            f"{row.get(f'tokens_per_s_lora_ext_{other}', float('nan')):.1f} tokens/s = "
            f"{row.get(f'speedup_vs_peft_{other}', float('nan')):.2f}x"
        )
    m = res.get("merge")
    if m:
        lines.append(
            f"bf16 merge of the nf4 base, {m['layers']} layers, max |W' - W64|: lora_ext "
            f"{m['max_abs_err_lora_ext']:.3g} (one rounding: {m['max_abs_err_one_rounding']:.3g}), "
            f"PEFT merge_and_unload {m['max_abs_err_peft']:.3g} (re-quantized to nf4)"
        )
    lines += res["verdicts"]
    return "\n".join(lines)


def verdicts(rows: dict, merge: dict | None, interleaved: list[dict]) -> list[str]:
    out = []
    for row in interleaved:
        speed = row["speedup_vs_peft"]
        out.append(
            f"target ours >= 1.2x PEFT tokens/s ({row['base']}, interleaved): {speed:.2f}x "
            f"({'met' if speed >= 1.2 else 'NOT met'})"
        )
    fp32 = rows.get("fp32+lora_ext")
    for base in ("nf4", "nf4-bf16"):
        nf4, peft_row = rows.get(f"{base}+lora_ext"), rows.get(f"{base}+peft")
        if fp32 and nf4:
            raw = nf4["peak_rss_train_bytes"] / fp32["peak_rss_train_bytes"]
            above = nf4["train_above_runtime_bytes"] / fp32["train_above_runtime_bytes"]
            out.append(
                f"target {base} peak memory <= 0.5x fp32: {above:.2f}x above the runtime "
                f"({'met' if above <= 0.5 else 'NOT met'}), {raw:.2f}x of the whole process "
                f"RSS ({'met' if raw <= 0.5 else 'NOT met'})"
            )
        if nf4 and peft_row:
            speed = nf4["tokens_per_s"] / peft_row["tokens_per_s"]
            out.append(
                f"target ours >= 1.2x PEFT tokens/s ({base}, separate processes): {speed:.2f}x "
                f"({'met' if speed >= 1.2 else 'NOT met'})"
            )
    if merge:
        ok = merge["max_abs_err_lora_ext"] <= merge["max_abs_err_peft"]
        out.append(f"target bf16 merge error <= PEFT's: {'met' if ok else 'NOT met'}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="a 2-layer random Llama (dry run)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument(
        "--interleaved-steps", type=int, default=16, help="steps of each model, alternating"
    )
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--no-merge", action="store_true", help="skip the merge-error part")
    ap.add_argument(
        "--no-interleaved", action="store_true", help="skip the one-process speed comparison"
    )
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print("== row " + json.dumps(child(args)))
        return 0
    rows = {}
    # a fixed mmap threshold: freed temporaries go back to the OS at once, so the peak RSS is
    # the live memory's peak and not glibc's heap high-water mark (it slows every row's steps:
    # the speed comparison that counts is the interleaved one, in this process, without it)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", PYTHONPATH=os.pathsep.join(sys.path))
    for name in args.configs.split(","):
        cmd = [sys.executable, __file__, "--child", name, *(argv or sys.argv[1:])]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = next((s for s in proc.stdout.splitlines() if s.startswith("== row ")), None)
        if proc.returncode or line is None:
            sys.stderr.write(proc.stdout[-2000:] + proc.stderr[-4000:])
            raise SystemExit(f"{name}: the child process failed (exit {proc.returncode})")
        rows[name] = json.loads(line[len("== row ") :])
        print(f"{name}: {rows[name]['tokens_per_s']:.1f} tokens/s", file=sys.stderr)
    torch.set_num_threads(args.threads)
    merge = None if args.no_merge else merge_errors(args)
    bases = [] if args.no_interleaved else ["nf4", "nf4-bf16"]
    interleaved = [interleaved_speed(args, b) for b in bases]
    from _common import cpu_name

    res = {
        "device": "cpu", "cpu": cpu_name(), "threads": args.threads,
        "model": next(iter(rows.values()))["model"], "batch": args.batch, "seq": args.seq,
        "r": args.r, "dropout": args.dropout, "steps": args.steps, "warmup": args.warmup,
        "interleaved_steps": args.interleaved_steps,
        "torch": torch.__version__, "bitsandbytes": __import__("bitsandbytes").__version__,
        "peft": __import__("peft").__version__, "rows": list(rows.values()), "merge": merge,
        "interleaved": interleaved,
        "note": "shared 2-core machine: other jobs may have run at the same time",
    }  # fmt: skip
    res["verdicts"] = verdicts(rows, merge, interleaved)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / ("bench_qlora_cpu_tiny.json" if args.tiny else "bench_qlora_cpu.json")
    path.write_text(json.dumps(res, indent=2) + "\n")
    print("== table")
    print(table(res))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
