"""OnnxRunner: text in, logits and labels out, with onnxruntime (CUDA when present, else CPU).

Reads what export_onnx recorded in the file's metadata (task, label names, hot-swap LoRA
inputs), feeds the graph exactly the inputs it declares (a tokenizer's extra outputs are
dropped, a missing ``token_type_ids`` is zeros), and activates an adapter file for hot-swap
exports through ``RunOptions.add_active_adapter``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .adapters import ADAPTER_SUFFIX, read_onnx_adapter


@dataclass
class RunnerOutput:
    """logits: [batch, labels] (seq-cls) or [batch, seq, vocab] (causal-lm).
    labels: per row, the predicted label name (id2label) or id for seq-cls; the predicted
    next token id after the last real token for causal-lm.
    """

    logits: np.ndarray
    labels: list[Any]


def default_providers() -> list[str]:
    """CUDA first when this onnxruntime build has it, CPU always."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


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
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads is not None:
            if threads < 1:
                raise ValueError(f"threads: got {threads}, need >= 1")
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(
            str(self.path), options, providers=list(providers or default_providers())
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
        import onnxruntime as ort

        self._run_options = ort.RunOptions()
        self.adapter_path = None
        if adapter is None:
            return
        if not self.lora_inputs:
            raise ValueError(
                f"adapter: {self.path.name} was exported merged (no LoRA graph inputs); "
                "export with merge=False (--hot-swap) to swap adapters"
            )
        path = Path(adapter)
        if path.suffix != ADAPTER_SUFFIX:
            raise ValueError(f"adapter: got {str(path)!r}, need a {ADAPTER_SUFFIX} file")
        for name, value in read_onnx_adapter(path).items():
            if name not in self._lora_shapes:
                raise ValueError(
                    f"adapter: {path.name} has tensor {name!r}, which is not a LoRA input of "
                    f"{self.path.name} (inputs like {self.lora_inputs[0]!r})"
                )
            fixed = 0 if name.endswith(".lora_A.weight") else 1  # the non-rank axis
            need = self._lora_shapes[name][fixed]
            if value.ndim != 2 or (isinstance(need, int) and value.shape[fixed] != need):
                raise ValueError(
                    f"adapter: {path.name} tensor {name!r} has shape {list(value.shape)}, the "
                    f"model needs {self._lora_shapes[name]}"
                )
        lora_adapter = ort.LoraAdapter()
        lora_adapter.Load(str(path))
        self._run_options.add_active_adapter(lora_adapter)
        self._adapter = lora_adapter  # the run options refer to it: keep it alive
        self.adapter_path = path

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
