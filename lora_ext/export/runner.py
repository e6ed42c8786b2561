"""OnnxRunner: text in, logits and labels out, with onnxruntime (CUDA when present, else CPU).

Reads what export_onnx recorded in the file's metadata (task, label names, hot-swap LoRA
inputs), feeds the graph exactly the inputs it declares (a tokenizer's extra outputs are
dropped, a missing ``token_type_ids`` is zeros), and activates an adapter file for hot-swap
exports through ``RunOptions.add_active_adapter``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .adapters import ADAPTER_SUFFIX, read_onnx_adapter
from .session import default_providers, ort_session

__all__ = ["OnnxRunner", "RunnerOutput", "default_providers"]


@dataclass
class RunnerOutput:
    """logits: [batch, labels] (seq-cls) or [batch, seq, vocab] (causal-lm).
    labels: per row, the predicted label name (id2label) or id for seq-cls; the predicted
    next token id after the last real token for causal-lm.
    """

    logits: np.ndarray
    labels: list[Any]


class OnnxRunner:
    """Run an exported model on text.

    Args:
        path: the .onnx (or .ort) file.
        tokenizer: a transformers tokenizer, or None to feed arrays through ``run``.
        providers: onnxruntime execution providers; default CUDA (if present) then CPU.
        adapter: an ``.onnx_adapter`` file for a hot-swap export (``set_adapter`` changes it).
        threads: intra-op threads (default: onnxruntime's choice, all cores).
        max_length: tokenizer truncation length.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        tokenizer: Any = None,
        providers: Sequence[str] | None = None,
        adapter: str | os.PathLike | None = None,
        threads: int | None = None,
        max_length: int = 512,
    ) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"path: {str(self.path)!r} does not exist")
        self.session = ort_session(
            self.path, providers=list(providers) if providers else None, threads=threads
        )
        meta = self.session.get_modelmeta().custom_metadata_map
        self.task: str | None = meta.get("lora_ext.task")
        self.id2label: dict[int, str] = {
            int(k): v for k, v in json.loads(meta.get("lora_ext.id2label", "{}")).items()
        }
        self.lora_inputs: list[str] = json.loads(meta.get("lora_ext.lora_inputs", "[]"))
        lora = set(self.lora_inputs)
        # LoRA inputs carry a rank-0 default, so onnxruntime lists them as overridable
        # initializers rather than inputs
        declared = list(self.session.get_inputs()) + list(
            self.session.get_overridable_initializers()
        )
        self._lora_shapes = {i.name: i.shape for i in declared if i.name in lora}
        self.input_names = [i.name for i in self.session.get_inputs() if i.name not in lora]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.tokenizer = tokenizer
        self.max_length = max_length
        self._run_options = ort.RunOptions()
        self.adapter_path: Path | None = None
        if adapter is not None:
            self.set_adapter(adapter)

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def set_adapter(self, adapter: str | os.PathLike | None) -> None:
        """Activate an adapter file (hot-swap exports), or None for the base model.

        The file's tensors are checked against the graph's LoRA inputs (names and the
        in/out sizes) before use, so a wrong adapter fails with a message, not a wrong
        answer.
        """
        self._run_options, self._adapter, self.adapter_path = activate_adapter(
            adapter, self._lora_shapes, self.path.name
        )

    def run(self, feeds: Mapping[str, Any]) -> np.ndarray:
        """Logits for ready inputs {name: int64 array [batch, seq]} (extra names ignored,
        a missing token_type_ids is zeros)."""
        arrays = {k: np.asarray(v) for k, v in feeds.items()}
        missing = [n for n in self.input_names if n not in arrays and n != "token_type_ids"]
        if missing:
            raise ValueError(
                f"feeds: missing input(s) {missing}; the model takes {self.input_names}"
            )
        out = {}
        for name in self.input_names:
            if name in arrays:
                out[name] = arrays[name].astype(np.int64, copy=False)
            else:
                like = arrays[next(iter(arrays))]
                out[name] = np.zeros(like.shape, dtype=np.int64)
        return self.session.run(self.output_names[:1], out, self._run_options)[0]

    def encode(self, texts: str | Sequence[str]) -> dict[str, np.ndarray]:
        if self.tokenizer is None:
            raise ValueError("tokenizer: this runner has none; pass one, or call run(feeds)")
        batch = [texts] if isinstance(texts, str) else list(texts)
        if not batch:
            raise ValueError("texts: got an empty list")
        enc = self.tokenizer(
            batch, padding=True, truncation=True, max_length=self.max_length, return_tensors="np"
        )
        return {k: np.asarray(v) for k, v in enc.items()}

    def __call__(self, texts: str | Sequence[str]) -> RunnerOutput:
        """Tokenize, run, and read labels (seq-cls) or next tokens (causal-lm)."""
        enc = self.encode(texts)
        logits = self.run(enc)
        if logits.ndim == 3:
            mask = enc.get("attention_mask", np.ones(logits.shape[:2], dtype=np.int64))
            # the last real token of each row, whichever side the tokenizer pads
            last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1] > 0, axis=1)
            next_ids = logits[np.arange(logits.shape[0]), last].argmax(-1)
            return RunnerOutput(logits, [int(i) for i in next_ids])
        ids = logits.argmax(-1)
        return RunnerOutput(logits, [self.id2label.get(int(i), int(i)) for i in ids])

    def generate(self, prompt: str, max_new_tokens: int = 20) -> str:
        """Greedy continuation of ``prompt`` (causal-lm exports). The graph has no KV cache,
        so every step runs the full sequence: fine for short demos on small models."""
        if self.tokenizer is None:
            raise ValueError("tokenizer: generate needs one")
        ids = list(self.tokenizer(prompt)["input_ids"])
        eos = getattr(self.tokenizer, "eos_token_id", None)
        new: list[int] = []
        for _ in range(max_new_tokens):
            arr = np.array([ids + new], dtype=np.int64)
            logits = self.run({"input_ids": arr, "attention_mask": np.ones_like(arr)})
            if logits.ndim != 3:
                raise ValueError(f"generate: {self.path.name} is not a causal LM (logits 2-D)")
            token = int(logits[0, -1].argmax())
            if token == eos:
                break
            new.append(token)
        return self.tokenizer.decode(new, skip_special_tokens=True)


# -- causal LM folders (onnxruntime-genai layout): generation with the KV cache --------------
@dataclass
class GenerationOutput:
    """tokens: the new tokens of each prompt (its EOS included when it stopped there).
    texts: their decoded text (with a tokenizer). logits: with ``return_logits``, per prompt
    the step logits [steps, vocab] float32 its tokens were chosen from. Times in seconds:
    prefill (the prompt, one run) and decode (every later step)."""

    tokens: list[list[int]]
    texts: list[str] | None = None
    logits: list[np.ndarray] | None = None
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0


@dataclass
class SharedCache:
    """DecoderRunner's KV buffers for GQA graphs: one IOBinding with every layer's buffer
    bound as past and present; ``keep`` holds the OrtValues it refers to."""

    binding: Any
    keep: list[Any] = field(default_factory=list)


def sample_next(
    logits: np.ndarray,
    rng: np.random.Generator | None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> np.ndarray:
    """Next token per row from logits [batch, vocab]: argmax without ``rng``, else a draw
    from softmax(logits / temperature) restricted to the top_k tokens (0: all) and to the
    smallest set whose probability reaches top_p. Returns int64 [batch]."""
    if rng is None:
        return logits.argmax(-1).astype(np.int64)
    out = np.empty(logits.shape[0], dtype=np.int64)
    for b, row in enumerate(logits.astype(np.float64) / temperature):
        order = np.argsort(-row, kind="stable")
        if top_k > 0:
            order = order[:top_k]
        z = row[order] - row[order[0]]
        p = np.exp(z)
        p /= p.sum()
        if top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(p), top_p) + 1)
            order, p = order[:keep], p[:keep] / p[:keep].sum()
        out[b] = order[rng.choice(len(order), p=p)]
    return out


class DecoderRunner:
    """Generate from an onnxruntime-genai model folder with plain onnxruntime and the KV
    cache: the prompt in one run (prefill), then one token per run.

    Two kinds of graph, told apart by whether it takes ``position_ids``:
    - the builder's (GroupQueryAttention: rotary positions and each row's length come from
      the attention mask's row sums, the cache is written at each row's length): a batch of
      prompts is laid out left-aligned, row b's tokens and cache entries at [0, n_b), its
      mask row n_b leading ones, a new token at column n_b;
    - ours (kv_graph, GPT-2: the cache is concatenated, every new token takes the next
      column for all rows): the prompt is laid out the same way, and each later step adds a
      column that the mask keeps, with ``position_ids`` counting each row's own tokens, so a
      row's padding stays masked between its prompt and its new tokens.

    Args:
        folder: the model folder (genai_config.json, the .onnx file it names).
        tokenizer: a transformers tokenizer for text in and out, or None for token ids.
        providers: onnxruntime execution providers; default CUDA (if present) then CPU.
        threads: intra-op threads (default: onnxruntime's choice).
        adapter: an ``.onnx_adapter`` file for a hot-swap folder (``set_adapter`` changes it).
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        tokenizer: Any = None,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
        adapter: str | os.PathLike | None = None,
    ) -> None:
        import onnxruntime as ort

        self.folder = Path(folder)
        config_file = self.folder / "genai_config.json"
        if not config_file.is_file():
            raise FileNotFoundError(
                f"folder: {str(self.folder)!r} has no genai_config.json (need a model folder "
                "written by export_decoder / lora-ext export on a causal LM)"
            )
        config = json.loads(config_file.read_text())
        model_cfg = config["model"]
        dec = model_cfg["decoder"]
        self.num_layers = int(dec["num_hidden_layers"])
        self.kv_heads = int(dec["num_key_value_heads"])
        self.head_size = int(dec["head_size"])
        self.vocab_size = int(model_cfg["vocab_size"])
        eos = model_cfg.get("eos_token_id")
        self.eos_ids: set[int] = set(
            eos if isinstance(eos, list) else [eos] if eos is not None else []
        )
        pad = model_cfg.get("pad_token_id")
        self.pad_id = int(pad[0] if isinstance(pad, list) else pad if pad is not None else 0)
        ins, outs = dec["inputs"], dec["outputs"]
        self.past_names = [
            (ins["past_key_names"] % i, ins["past_value_names"] % i) for i in range(self.num_layers)
        ]
        self.present_names = [
            n
            for i in range(self.num_layers)
            for n in (outs["present_key_names"] % i, outs["present_value_names"] % i)
        ]
        self.logits_name = outs["logits"]
        self.ids_name, self.mask_name = ins["input_ids"], ins["attention_mask"]
        self.session = ort_session(  # the one session set-up (export/session.py)
            self.folder / dec["filename"], providers=providers or None, threads=threads
        )
        declared = {i.name: i for i in self.session.get_inputs()}
        self.positions_name: str | None = ins.get("position_ids")
        if (self.positions_name in declared) != ("position_ids" in declared):
            raise ValueError(
                f"folder: {self.folder.name}'s graph and genai_config.json disagree on "
                "position_ids (the graph takes them exactly when the config names them)"
            )
        kv_type = declared[self.past_names[0][0]].type
        self.kv_dtype = np.float16 if "float16" in kv_type else np.float32
        self.tokenizer = tokenizer
        # hot-swap folders: LoRA A/B are initializers with empty defaults, overridable
        self._lora_shapes = {
            i.name: i.shape
            for i in self.session.get_overridable_initializers()
            if ".lora_A." in i.name or ".lora_B." in i.name
        }
        self._run_options = ort.RunOptions()
        self.adapter_path: Path | None = None
        self._adapter_arrays: dict[str, np.ndarray] = {}
        if adapter is not None:
            self.set_adapter(adapter)

    def set_adapter(self, adapter: str | os.PathLike | None) -> None:
        """Activate an ``.onnx_adapter`` file on a hot-swap folder, or None for the base.
        Its tensors are checked against the graph's LoRA inputs (names, in/out sizes)."""
        self._run_options, self._adapter, self.adapter_path = activate_adapter(
            adapter, self._lora_shapes, self.folder.name
        )
        # shared_cache binds them itself (an IOBinding run ignores RunOptions' adapters)
        self._adapter_arrays = {} if adapter is None else read_onnx_adapter(Path(adapter))

    def forward(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        past: list[np.ndarray],
        position_ids: np.ndarray | None = None,
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """One run. input_ids [batch, seq] int64; attention_mask [batch, past + seq] int64
        (row b: n_b leading ones); past: 2 x layers arrays [batch, kv_heads, past, head_size]
        (key, value per layer); position_ids [batch, seq] int64 for graphs that take them
        (default: the columns past .. past + seq - 1). Returns (logits [batch, seq, vocab],
        present, same layout)."""
        feeds = self.feeds(input_ids, attention_mask, past, position_ids)
        out = self.session.run([self.logits_name, *self.present_names], feeds, self._run_options)
        return out[0], out[1:]

    def feeds(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray | None = None,
        past: list[np.ndarray] | None = None,
        position_ids: np.ndarray | None = None,
    ) -> dict[str, np.ndarray]:
        """The graph's feed dict for one run (``forward``'s arguments; by default a prefill:
        a mask of ones and an empty cache)."""
        if attention_mask is None:
            attention_mask = np.ones_like(input_ids)
        if past is None:
            past = self.empty_past(input_ids.shape[0])
        feeds = {self.ids_name: input_ids, self.mask_name: attention_mask}
        if self.positions_name is not None:
            if position_ids is None:
                start = attention_mask.shape[1] - input_ids.shape[1]
                position_ids = np.broadcast_to(
                    np.arange(start, attention_mask.shape[1], dtype=np.int64), input_ids.shape
                )
            feeds[self.positions_name] = np.ascontiguousarray(position_ids, dtype=np.int64)
        for (k, v), i in zip(self.past_names, range(0, 2 * self.num_layers, 2)):
            feeds[k], feeds[v] = past[i], past[i + 1]
        return feeds

    def shared_cache(
        self, batch: int, capacity: int, past: list[np.ndarray] | None = None
    ) -> SharedCache:
        """KV buffers [batch, kv_heads, capacity, head_size] (key, value per layer) for
        ``forward_shared``: zeros, then ``past`` (forward's present, [batch, kv_heads, n,
        head_size]) copied into the first n columns; bound once, each as both the past input
        and the present output, with the active adapter's tensors (an IOBinding run does not
        apply RunOptions' active adapters: measured, the logits were the base model's)."""
        import onnxruntime as ort

        shape = (batch, self.kv_heads, capacity, self.head_size)
        cache = SharedCache(self.session.io_binding())
        for i in range(2 * self.num_layers):
            buffer = np.zeros(shape, dtype=self.kv_dtype)
            if past is not None:
                buffer[:, :, : past[i].shape[2]] = past[i]
            cache.keep.append(ort.OrtValue.ortvalue_from_numpy(buffer))
        for (k, v), i in zip(self.past_names, range(0, 2 * self.num_layers, 2)):
            cache.binding.bind_ortvalue_input(k, cache.keep[i])
            cache.binding.bind_ortvalue_input(v, cache.keep[i + 1])
        for name, value in zip(self.present_names, cache.keep):
            cache.binding.bind_ortvalue_output(name, value)
        for name, array in self._adapter_arrays.items():
            cache.keep.append(ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array)))
            cache.binding.bind_ortvalue_input(name, cache.keep[-1])
        return cache

    def forward_shared(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, cache: SharedCache
    ) -> np.ndarray:
        """One run of a GroupQueryAttention graph with past and present bound to the same
        buffers (``shared_cache``), updated in place. input_ids [batch, seq];
        attention_mask [batch, capacity]: row b's ones cover its tokens so far, this run's
        included. Returns logits [batch, seq, vocab]."""
        import onnxruntime as ort

        fed = [
            ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(input_ids, dtype=np.int64)),
            ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(attention_mask)),
        ]
        cache.binding.bind_ortvalue_input(self.ids_name, fed[0])
        cache.binding.bind_ortvalue_input(self.mask_name, fed[1])
        cache.binding.bind_output(self.logits_name)
        self.session.run_with_iobinding(cache.binding, self._run_options)
        return cache.binding.get_outputs()[-1].numpy()

    def empty_past(self, batch: int) -> list[np.ndarray]:
        shape = (batch, self.kv_heads, 0, self.head_size)
        return [np.zeros(shape, dtype=self.kv_dtype) for _ in range(2 * self.num_layers)]

    def score(self, input_ids: np.ndarray) -> np.ndarray:
        """Teacher-forced logits of whole sequences, one run without a cache.
        input_ids [batch, seq] -> logits [batch, seq, vocab] float32."""
        ids = np.asarray(input_ids, dtype=np.int64)
        logits, _ = self.forward(ids, np.ones_like(ids), self.empty_past(ids.shape[0]))
        return logits.astype(np.float32, copy=False)

    def _prompt_ids(
        self, prompts: str | Sequence[str] | Sequence[Sequence[int]]
    ) -> list[list[int]]:
        batch = [prompts] if isinstance(prompts, str) else list(prompts)
        if not batch:
            raise ValueError("prompts: got an empty list")
        rows = []
        for p in batch:
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise ValueError("prompts: text needs a tokenizer; pass one or token ids")
                p = list(self.tokenizer(p)["input_ids"])
            row = [int(t) for t in p]
            if not row:
                raise ValueError("prompts: a prompt has no tokens")
            bad = [t for t in row if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(
                    f"prompts: token id {bad[0]} outside the vocab ({self.vocab_size})"
                )
            rows.append(row)
        return rows

    def generate(
        self,
        prompts: str | Sequence[str] | Sequence[Sequence[int]],
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_at_eos: bool = True,
        stream: Callable[[int, int], None] | None = None,
        return_logits: bool = False,
    ) -> GenerationOutput:
        """Continue each prompt (text, or token ids) by up to ``max_new_tokens`` tokens.

        Greedy by default; ``do_sample`` draws with ``temperature``, ``top_k`` (0: off),
        ``top_p`` (1: off) from a generator seeded with ``seed``. A row stops at an EOS token
        of the folder's config (kept in its output) when ``stop_at_eos``; the batch stops
        when every row has. ``stream(row, token)`` is called for each new token as it comes.
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: got {max_new_tokens}, need >= 1")
        if do_sample:
            if temperature <= 0:
                raise ValueError(f"temperature: got {temperature}, need > 0 (or do_sample=False)")
            if not 0 < top_p <= 1:
                raise ValueError(f"top_p: got {top_p}, need 0 < top_p <= 1")
            if top_k < 0:
                raise ValueError(f"top_k: got {top_k}, need >= 0 (0: off)")
        rng = np.random.default_rng(seed) if do_sample else None
        rows = self._prompt_ids(prompts)
        batch, width = len(rows), max(len(r) for r in rows)
        lengths = np.array([len(r) for r in rows], dtype=np.int64)
        ids = np.full((batch, width), self.pad_id, dtype=np.int64)
        mask = np.zeros((batch, width), dtype=np.int64)
        for b, r in enumerate(rows):
            ids[b, : len(r)] = r
            mask[b, : len(r)] = 1
        t0 = time.perf_counter()
        # GQA graphs (the builder's): past and present share one buffer of the final length,
        # written in place at each row's length (no copy of the cache per token, as
        # onnxruntime-genai's past_present_share_buffer); ours concatenate.
        # (GQA refuses a batch > 1 prefill over a past buffer: the prefill runs without
        # one and its cache is copied into the buffers once)
        shared = self.positions_name is None
        positions = np.broadcast_to(np.arange(width, dtype=np.int64), (batch, width))
        logits, past = self.forward(ids, mask, self.empty_past(batch), positions)
        if shared:
            capacity = width + max_new_tokens
            cache = self.shared_cache(batch, capacity, past)
            del past
        last = logits[np.arange(batch), lengths - 1]  # [batch, vocab]
        prefill = time.perf_counter() - t0
        tokens: list[list[int]] = [[] for _ in range(batch)]
        kept: list[list[np.ndarray]] = [[] for _ in range(batch)]
        done = np.zeros(batch, dtype=bool)
        t1 = time.perf_counter()
        steps = 0
        for step in range(max_new_tokens):
            nxt = sample_next(last, rng, temperature, top_k, top_p)
            for b in range(batch):
                if done[b]:
                    continue
                tokens[b].append(int(nxt[b]))
                if return_logits:
                    kept[b].append(last[b].astype(np.float32))
                if stream is not None:
                    stream(b, int(nxt[b]))
                if stop_at_eos and int(nxt[b]) in self.eos_ids:
                    done[b] = True
            if done.all() or step == max_new_tokens - 1:
                break
            nxt = np.where(done, self.pad_id, nxt)
            positions = lengths[:, None]  # each row's own next position
            lengths = lengths + 1
            if shared:  # GQA: the token goes to column n_b of the buffer
                mask = (np.arange(capacity)[None, :] < lengths[:, None]).astype(np.int64)
                logits = self.forward_shared(nxt[:, None], mask, cache)
            else:  # concatenated cache: the token takes the next column in every row
                mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
                logits, past = self.forward(nxt[:, None], mask, past, positions)
            last = logits[:, -1]
            steps += 1
        decode = time.perf_counter() - t1
        texts = None
        if self.tokenizer is not None:
            texts = [self.tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
        return GenerationOutput(
            tokens=tokens,
            texts=texts,
            logits=[np.stack(k) for k in kept] if return_logits else None,
            prefill_s=prefill,
            decode_s=decode,
            decode_steps=steps,
        )


def activate_adapter(
    adapter: str | os.PathLike | None, lora_shapes: Mapping[str, Any], model_name: str
) -> tuple[Any, Any, Path | None]:
    """Run options with an ``.onnx_adapter`` file active, for both runners; None: the base.

    The file's tensors are checked against the graph's LoRA inputs (names, and the non-rank
    axis of each: A' [in, r], B' [r, out]) before use, so a wrong adapter fails with a
    message, not a wrong answer.

    Returns:
        (onnxruntime RunOptions, the LoraAdapter they refer to (keep it alive), its path).
    """
    import onnxruntime as ort

    options = ort.RunOptions()
    if adapter is None:
        return options, None, None
    if not lora_shapes:
        raise ValueError(
            f"adapter: {model_name} was exported merged (no LoRA graph inputs); export with "
            "merge=False (--hot-swap) to swap adapters"
        )
    path = Path(adapter)
    if path.suffix != ADAPTER_SUFFIX:
        raise ValueError(f"adapter: got {str(path)!r}, need a {ADAPTER_SUFFIX} file")
    for name, value in read_onnx_adapter(path).items():
        shape = lora_shapes.get(name)
        if shape is None:
            raise ValueError(
                f"adapter: {path.name} has tensor {name!r}, which is not a LoRA input of "
                f"{model_name}: an adapter for another base"
            )
        fixed = 0 if ".lora_A." in name else 1  # the non-rank axis
        need = shape[fixed]
        if value.ndim != 2 or (isinstance(need, int) and value.shape[fixed] != need):
            raise ValueError(
                f"adapter: {path.name} tensor {name!r} has shape {list(value.shape)}, the "
                f"model needs {shape}"
            )
    lora_adapter = ort.LoraAdapter()
    lora_adapter.Load(str(path))
    options.add_active_adapter(lora_adapter)
    return options, lora_adapter, path
