"""lora_ext.training.data: bundled corpora, user CSV/JSONL/text files, split, batching."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from lora_ext.training import data
from lora_ext.training.data import DataError


@pytest.fixture(scope="module")
def rotten() -> data.TextDataset:
    return data.load_rotten_tomatoes()


def test_rotten_tomatoes_counts(rotten):
    assert len(rotten) == 12_808
    assert rotten.classes == ["rotten", "fresh"]
    counts = Counter(rotten.labels)
    assert counts == {1: 7403, 0: 5405}
    assert all(t and t == t.strip() for t in rotten.texts)
    # A known snippet keeps its label (fresh = 1): the file's first review.
    i = rotten.texts.index("A three-hour cinema master class.")
    assert rotten.labels[i] == 1


def test_bbc_news_counts_order_and_encoding():
    ds = data.load_bbc_news()
    assert len(ds) == 2225
    assert ds.classes == list(data.BBC_CLASSES)
    assert Counter(ds.labels) == {0: 510, 1: 386, 2: 417, 3: 511, 4: 401}
    # Sorted order: labels are non-decreasing and the first article is business/001.txt.
    assert ds.labels == sorted(ds.labels)
    assert ds.texts[0].startswith("Ad sales boost Time Warner profit")
    # sports/199.txt is cp1252: its pound sign must be decoded, not dropped or replaced.
    sports_199 = ds.texts[ds.labels.index(3) + 198]
    assert "\ufffd" not in sports_199 and "£" in sports_199


def test_split_is_seeded_stratified_and_disjoint(rotten):
    a = data.split_dataset(rotten, 0.1, seed=0)
    b = data.split_dataset(rotten, 0.1, seed=0)
    c = data.split_dataset(rotten, 0.1, seed=1)
    assert a.train.texts == b.train.texts and a.val.texts == b.val.texts
    assert a.val.texts != c.val.texts
    assert len(a.train) + len(a.val) == len(rotten)
    assert len(a.val) == 541 + 740  # 10% of each class, rounded half up
    # Stratified: the validation class balance is the data's, to within one example.
    assert sum(a.val.labels) == 740
    # No example is in both parts (texts repeat in the corpus, so compare by index).
    assert not set(a.train_indices) & set(a.val_indices)
    assert sorted(a.train_indices + a.val_indices) == list(range(len(rotten)))
    assert a.val.texts == [rotten.texts[i] for i in a.val_indices]
    limited = data.split_dataset(rotten, 0.1, seed=0, max_train=100)
    assert limited.train.texts == a.train.texts[:100] and limited.val.texts == a.val.texts


def _write(tmp_path, name: str, content: str):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    return path


def test_csv_and_jsonl_agree(tmp_path):
    csv_path = _write(tmp_path, "d.csv", 'text,label\n"good, really",pos\nbad,neg\nfine,pos\n')
    rows = [{"text": "good, really", "label": "pos"}, {"text": "bad", "label": "neg"}]
    rows.append({"text": "fine", "label": "pos"})
    jsonl_path = _write(tmp_path, "d.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    array_path = _write(tmp_path, "d.json", json.dumps(rows, indent=1))
    a, b = data.load_dataset(csv_path), data.load_dataset(jsonl_path)
    assert data.load_dataset(array_path).texts == a.texts
    assert a.texts == b.texts == ["good, really", "bad", "fine"]
    assert a.classes == b.classes == ["neg", "pos"]
    assert a.labels == b.labels == [1, 0, 1]
    # Declared classes fix the order; integer labels sort numerically.
    c = data.load_table(csv_path, classes=["pos", "neg"])
    assert c.labels == [0, 1, 0]
    ints = _write(tmp_path, "i.jsonl", '{"text":"a","label":10}\n{"text":"b","label":2}\n')
    assert data.load_table(ints).classes == ["2", "10"]
    # Other column names.
    other = _write(tmp_path, "o.csv", "review,stars\nnice,5\nmeh,1\n")
    assert data.load_table(other, "review", "stars").labels == [1, 0]


BAD_FILES = [
    # (file name, content, kwargs, words the message must contain)
    ("missing.csv", None, {}, ["missing.csv", "does not exist"]),
    ("cols.csv", "sentence,label\nhi,1\n", {}, ["missing column", "'text'", "sentence"]),
    ("short.csv", "text,label\nok,1\nnolabel\n", {}, ["row 3", "1 fields", "header has 2"]),
    ("long.csv", "text,label\nok,1\nx,1,extra\n", {}, ["row 3", "3 fields"]),
    ("empty_text.csv", "text,label\nok,1\n  ,0\n", {}, ["row 3", "non-empty string"]),
    ("empty_label.csv", "text,label\nok,1\nno,\n", {}, ["row 3", "'label'"]),
    (
        "classes.csv",
        "text,label\nok,pos\nno,meh\n",
        {"classes": ["neg", "pos"]},
        ["row 3", "'meh'"],
    ),
    (
        "json.jsonl",
        '{"text":"a","label":1}\n{"text": "b", "label": \n',
        {},
        ["row 2", "invalid JSON"],
    ),
    ("key.jsonl", '{"text":"a","label":1}\n{"txt":"b","label":0}\n', {}, ["row 2", "'text'"]),
    ("list.jsonl", '{"text":"a","label":1}\n[1, 2]\n', {}, ["row 2", "JSON object"]),
    (
        "nulllabel.jsonl",
        '{"text":"a","label":1}\n{"text":"b","label":null}\n',
        {},
        ["row 2", "None"],
    ),
    ("array.json", '[{"text":"a","label":1}, "b"]', {}, ["row 2", "JSON object"]),
    ("one_class.csv", "text,label\na,1\nb,1\n", {}, ["at least 2 classes"]),
    ("blank.csv", "", {}, ["empty"]),
    ("d.parquet", "x", {}, ["suffix", ".parquet"]),
]


@pytest.mark.parametrize("name,content,kwargs,words", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_files_name_file_and_row(tmp_path, name, content, kwargs, words):
    path = tmp_path / name
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as err:
        if name.endswith(".parquet"):
            data.load_table(path, **kwargs)
        else:
            data.load_dataset(path, **kwargs)
    message = str(err.value)
    for word in words:
        assert word in message, (word, message)


def test_unknown_data_name():
    with pytest.raises(DataError, match="neither a bundled data set"):
        data.load_dataset("rotten-tomatos")


def test_empty_split_and_missing_class(tmp_path):
    tiny = data.load_table(_write(tmp_path, "t.csv", "text,label\na,x\nb,y\n"))
    with pytest.raises(DataError, match="validation split is empty"):
        data.split_dataset(tiny, 0.1)
    with pytest.raises(DataError, match="val_fraction"):
        data.split_dataset(tiny, 1.5)
    with pytest.raises(DataError, match="training split is empty"):
        data.split_dataset(tiny, 0.5)
    three = data.load_table(_write(tmp_path, "3.csv", "text,label\na,x\nb,x\nc,y\n"))
    with pytest.raises(DataError, match=r"no training example of class\(es\) \['y'\]"):
        data.split_dataset(three, 0.5)


def test_plain_text_paragraphs_and_blocks(tmp_path):
    path = _write(tmp_path, "c.txt", "First para\nstill first.\n\n\nSecond.\r\n\r\nThird one.\n")
    ds = data.load_dataset(path)
    assert ds.task == "causal-lm" and ds.labels is None
    assert ds.texts == ["First para\nstill first.", "Second.", "Third one."]

    class CharTokenizer:  # a real (if trivial) tokenizer: one id per character
        eos_token_id = 0
        pad_token_id = None

        def __call__(self, texts, add_special_tokens=False, **_):
            return {"input_ids": [[ord(c) for c in t] for t in texts]}

    enc = data.encode_causal_lm(ds, CharTokenizer(), block_size=8)
    stream = [c for t in ds.texts for c in [*map(ord, t), 0]]
    assert enc.input_ids == [stream[i : i + 8] for i in range(0, len(stream) - 7, 8)]
    batch = data.collate(enc, [1, 0])
    assert torch.equal(batch["labels"], batch["input_ids"])  # full blocks: nothing masked
    with pytest.raises(DataError, match="no block of 1000 tokens"):
        data.encode_causal_lm(ds, CharTokenizer(), block_size=1000)
    _write(tmp_path, "empty.txt", "\n\n  \n")
    with pytest.raises(DataError, match="no text"):
        data.load_dataset(tmp_path / "empty.txt")


def test_collate_pads_right_and_masks():
    enc = data.Encoded([[5, 6, 7], [8]], [1, 0], pad_id=0)
    batch = data.collate(enc, [1, 0])
    assert batch["input_ids"].tolist() == [[8, 0, 0], [5, 6, 7]]
    assert batch["attention_mask"].tolist() == [[1, 0, 0], [1, 1, 1]]
    assert batch["labels"].tolist() == [0, 1]
    lm = data.collate(data.Encoded([[5, 6, 7], [8]], None, pad_id=0), [0, 1])
    assert lm["labels"].tolist() == [[5, 6, 7], [8, -100, -100]]


def test_batch_order_is_a_function_of_seed_and_index():
    n, b = 10, 3
    batches = [data.global_batch_indices(n, b, seed=4, index=i) for i in range(6)]
    # 3 full batches per epoch; each epoch covers 9 distinct examples.
    assert all(len(x) == b for x in batches)
    assert len(set(sum(batches[:3], []))) == 9 and len(set(sum(batches[3:], []))) == 9
    assert batches[:3] != batches[3:6]  # a fresh permutation each epoch
    # Random access (what resume does) gives the same batches as walking from the start.
    assert data.global_batch_indices(n, b, seed=4, index=4) == batches[4]
    assert data.global_batch_indices(n, b, seed=5, index=0) != batches[0]
    assert data.shard([1, 2, 3, 4], 1, 2) == [3, 4]
    with pytest.raises(DataError, match="batch_size"):
        data.global_batch_indices(2, 3, 0, 0)


def test_length_grouped_batches_cover_each_epoch_and_pad_less():
    n, b = 1000, 8
    lengths = [(i * 7919) % 61 + 3 for i in range(n)]  # a spread of lengths
    per_epoch = n // b
    grouped = [data.global_batch_indices(n, b, 3, k, lengths) for k in range(2 * per_epoch)]
    plain = [data.global_batch_indices(n, b, 3, k) for k in range(per_epoch)]
    for epoch in (grouped[:per_epoch], grouped[per_epoch:]):
        assert sorted(sum(epoch, [])) == sorted(sum(plain, []))  # same examples, once each
    assert grouped[:per_epoch] != grouped[per_epoch:]

    def padded(batches):
        return sum(len(x) * max(lengths[i] for i in x) for x in batches)

    assert padded(grouped[:per_epoch]) < 0.7 * padded(plain)
    # batches are shuffled, not served longest first
    firsts = [max(lengths[i] for i in x) for x in grouped[:10]]
    assert firsts != sorted(firsts, reverse=True)
    # random access equals walking the stream (what --resume relies on)
    assert data.global_batch_indices(n, b, 3, per_epoch + 5, lengths) == grouped[per_epoch + 5]
