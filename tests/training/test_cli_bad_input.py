"""The ``lora-ext train`` / ``demo`` bad-input table: every row exits non-zero with one line
on stderr, no traceback, and leaves no output directory behind.

Rows run in-process (``cli.main``) on the tiny settings of test_train.py; rows that get past
the data checks load MiniLM once each (about a second). Corrupt checkpoints on ``--resume``
are in test_faults.py, next to the kill -9 and disk-full tests.
"""

from __future__ import annotations

import io
import traceback
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
from test_train import TINY

from lora_ext import cli

GOOD = "".join(f"text {i},{'pos' if i % 2 else 'neg'}\n" for i in range(40))


def _files(tmp: Path) -> dict[str, str]:
    """Hostile and malformed data files; returns {placeholder: path}."""

    def put(name: str, content: str | bytes) -> str:
        path = tmp / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return str(path)

    big = "x" * (10 * 1024 * 1024)
    return {
        "tmp": str(tmp),
        "good": put("good.csv", "text,label\n" + GOOD),
        "bigfield": put("big.csv", "text,label\n" + GOOD + f'"{big}",pos\n'),
        "latin1": put(
            "latin1.csv", ("text,label\n" + GOOD + "caf\u00e9 cr\u00e8me,pos\n").encode("latin-1")
        ),
        "latin1_jsonl": put(
            "latin1.jsonl", b'{"text": "ok", "label": 1}\n{"text": "caf\xe9", "label": 0}\n'
        ),
        "latin1_txt": put("latin1.txt", b"good text\n\nmore \xff text\n"),
        "binary": put("binary.csv", bytes(range(256)) * 64),
        "empty": put("empty.csv", ""),
        "header_only": put("header.csv", "text,label\n"),
        "one_class": put("one.csv", "text,label\n" + "".join(f"t{i},a\n" for i in range(40))),
        "dir_csv": str((tmp / "folder.csv").mkdir() or tmp / "folder.csv"),
        "model_dir": str((tmp / "not_a_model").mkdir() or tmp / "not_a_model"),
        "badjson": put("bad.jsonl", '{"text": "a", "label": 1}\n{"text": \n'),
    }


# (id, extra args, words the one line must contain). Placeholders come from _files.
ROWS = [
    # data files
    ("csv-10MB-field", ["--data", "{bigfield}"], ["big.csv", "line 42"]),
    ("csv-not-utf8", ["--data", "{latin1}"], ["latin1.csv", "line 42", "UTF-8"]),
    ("jsonl-not-utf8", ["--data", "{latin1_jsonl}"], ["latin1.jsonl", "line 2", "UTF-8"]),
    ("txt-not-utf8", ["--data", "{latin1_txt}"], ["latin1.txt", "line 3", "UTF-8"]),
    ("csv-binary", ["--data", "{binary}"], ["binary.csv"]),
    ("csv-empty", ["--data", "{empty}"], ["empty.csv", "empty"]),
    ("csv-header-only", ["--data", "{header_only}"], ["header.csv", "no examples"]),
    ("csv-one-class", ["--data", "{one_class}"], ["2 classes"]),
    ("csv-is-a-directory", ["--data", "{dir_csv}"], ["folder.csv"]),
    ("jsonl-bad-json", ["--data", "{badjson}"], ["bad.jsonl", "row 2"]),
    ("missing-file", ["--data", "{tmp}/nope.csv"], ["nope.csv", "does not exist"]),
    ("unknown-data", ["--data", "imdb"], ["imdb", "bundled"]),
    ("missing-text-column", ["--data", "{good}", "--text-column", "body"], ["'body'", "--text-column"]),
    ("duplicate-classes", ["--data", "{good}", "--classes", "neg,neg"], ["distinct"]),
    ("empty-class-name", ["--data", "{good}", "--classes", "neg,,pos"], ["--classes", "'neg,,pos'"]),
    # numbers
    ("alpha-inf", ["--alpha", "inf"], ["--alpha", "inf"]),
    ("alpha-nan", ["--alpha", "nan"], ["--alpha", "nan"]),
    ("alpha-negative", ["--alpha", "-1"], ["--alpha", "-1"]),
    ("rank-2000000", ["--r", "2000000"], ["--r", "2000000"]),
    ("rank-above-layer", ["--r", "385"], ["--r", "385", "384"]),
    ("rank-float", ["--r", "4.9"], ["--r", "4.9"]),
    ("rank-zero", ["--r", "0"], ["--r", "got 0"]),
    ("steps-float", ["--steps", "2.5"], ["--steps", "2.5"]),
    ("steps-negative", ["--steps", "-3"], ["--steps", "-3"]),
    ("batch-size-float", ["--batch-size", "4.0"], ["--batch-size", "4.0"]),
    ("lr-inf", ["--lr", "inf"], ["--lr", "inf"]),
    ("lr-nan", ["--lr", "nan"], ["--lr", "nan"]),
    ("lr-zero", ["--lr", "0"], ["--lr", "0"]),
    ("lr-word", ["--lr", "fast"], ["--lr", "fast"]),
    ("dropout-one", ["--dropout", "1"], ["--dropout", "1"]),
    ("dropout-nan", ["--dropout", "nan"], ["--dropout", "nan"]),
    ("weight-decay-inf", ["--weight-decay", "inf"], ["--weight-decay", "inf"]),
    ("weight-decay-negative", ["--weight-decay", "-0.1"], ["--weight-decay", "-0.1"]),
    ("max-grad-norm-zero", ["--max-grad-norm", "0"], ["--max-grad-norm", "0"]),
    ("max-grad-norm-nan", ["--max-grad-norm", "nan"], ["--max-grad-norm", "nan"]),
    ("val-fraction-one", ["--val-fraction", "1"], ["--val-fraction", "1"]),
    ("warmup-ratio-nan", ["--warmup-ratio", "nan"], ["--warmup-ratio", "nan"]),
    ("max-length-zero", ["--max-length", "0"], ["--max-length", "0"]),
    ("max-length-above-model", ["--max-length", "100000"], ["--max-length", "100000", "512"]),
    ("seed-negative", ["--seed", "-1"], ["--seed", "-1"]),
    ("seed-huge", ["--seed", str(2**70)], ["--seed"]),
    ("threads-zero", ["--threads", "0"], ["--threads", "0"]),
    ("threads-huge", ["--threads", "100000"], ["--threads", "100000"]),
    ("stop-at-zero", ["--stop-at", "0"], ["--stop-at", "0"]),
    ("save-every-zero", ["--save-every", "0"], ["--save-every", "0"]),
    ("keep-checkpoints-zero", ["--keep-checkpoints", "0"], ["--keep-checkpoints", "0"]),
    ("eval-every-zero", ["--eval-every", "0"], ["--eval-every", "0"]),
    ("eval-batch-size-zero", ["--eval-batch-size", "0"], ["--eval-batch-size", "0"]),
    ("grad-accum-zero", ["--grad-accum", "0"], ["--grad-accum", "0"]),
    ("max-train-zero", ["--max-train", "0"], ["--max-train", "0"]),
    ("max-val-zero", ["--max-val", "0"], ["--max-val", "0"]),
    ("min-lr-ratio-two", ["--min-lr-ratio", "2"], ["--min-lr-ratio", "2"]),
    ("model-dropout-one", ["--model-dropout", "1"], ["--model-dropout", "1"]),
    ("head-lr-negative", ["--head-lr", "-1"], ["--head-lr", "-1"]),
    ("loraplus-ratio-zero", ["--loraplus-ratio", "0"], ["--loraplus-ratio", "0"]),
    # choices and names
    ("precision-fp8", ["--precision", "fp8"], ["--precision", "fp8"]),
    ("init-unknown", ["--init", "xavier"], ["--init", "xavier"]),
    ("device-mps", ["--device", "mps"], ["--device", "mps"]),
    ("device-cuda-garbage", ["--device", "cuda:abc"], ["--device", "cuda:abc"]),
    ("device-cuda-absent", ["--device", "cuda"], ["--device", "cuda"]),
    ("targets-empty", ["--targets", ","], ["--targets"]),
    ("targets-trailing-comma", ["--targets", "query,"], ["--targets", "'query,'"]),
    ("targets-nothing", ["--targets", "querry"], ["--targets", "'querry'"]),
    ("model-missing", ["--model", "{tmp}/nowhere"], ["--model", "nowhere"]),
    ("model-dir-without-config", ["--model", "{model_dir}"], ["--model", "not_a_model"]),
    ("minilm-on-text", ["--data", "{latin1_txt}"], ["latin1.txt"]),
    ("unknown-flag", ["--learning-rate", "1e-3"], ["--learning-rate"]),
    ("batch-too-big", ["--data", "{good}", "--batch-size", "64"], ["--batch-size", "64"]),
    ("resume-and-overwrite", ["--resume", "--overwrite"], ["--resume and --overwrite"]),
    # --out
    ("out-is-a-file", ["--out", "{good}"], ["--out", "good.csv"]),
    ("out-name-too-long", ["--out", "{tmp}/" + "x" * 300], ["--out", "too long"]),
    ("out-under-a-file", ["--out", "{good}/run"], ["--out", "good.csv"]),
]  # fmt: skip


def run_cli(argv: list[str]) -> tuple[int, str]:
    """(exit status, stderr) of ``lora-ext ARGV`` in-process; an exception that escapes
    ``cli.main`` comes back as its traceback on stderr with status -1."""
    err = io.StringIO()
    with redirect_stderr(err), redirect_stdout(io.StringIO()):
        try:
            status = cli.main(argv)
        except SystemExit as e:
            status = e.code if isinstance(e.code, int) else 1
        except Exception:  # noqa: BLE001 - the point: report it as the failure it is
            traceback.print_exc(file=err)
            status = -1
    return status, err.getvalue()


def check_one_line(status: int, err: str, words: list[str]) -> None:
    assert "Traceback" not in err, err
    assert status not in (0, -1), (status, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for word in words:
        assert word in lines[0], (word, lines[0])


@pytest.mark.parametrize("case,args,words", ROWS, ids=[r[0] for r in ROWS])
def test_train_bad_input_is_one_line(tmp_path, case, args, words):
    files = _files(tmp_path)
    out = tmp_path / "out"
    argv = ["train", *TINY, "--steps", "2", "--out", str(out)]
    argv += [a.format(**files) for a in args]
    status, err = run_cli(argv)
    check_one_line(status, err, words)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        Path(p).name for k, p in files.items() if k != "tmp"
    )  # nothing else created either (no half-made --out, no lock file)


DEMO_ROWS = [
    ("demo-steps-float", ["--steps", "1.5"], ["--steps", "1.5"]),
    ("demo-rank-zero", ["--r", "0"], ["--r", "got 0"]),
    ("demo-lr-nan", ["--lr", "nan"], ["--lr", "nan"]),
    ("demo-out-is-a-file", ["--out", "{good}"], ["--out", "good.csv"]),
    ("demo-latency-negative", ["--latency-sentences", "-1"], ["--latency-sentences", "-1"]),
]  # fmt: skip


@pytest.mark.parametrize("case,args,words", DEMO_ROWS, ids=[r[0] for r in DEMO_ROWS])
def test_demo_bad_input_is_one_line(tmp_path, case, args, words):
    files = _files(tmp_path)
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--steps", "2", "--max-train", "64", "--max-val", "16"]
    argv += ["--threads", "1", "--no-progress", *[a.format(**files) for a in args]]
    status, err = run_cli(argv)
    check_one_line(status, err, words)
    assert not out.exists()


def test_rows_cover_every_numeric_flag():
    """Each numeric flag of ``train`` has at least one bad-input row."""
    parser = cli.build_parser()
    train = next(
        a for a in parser._subparsers._group_actions[0].choices.items() if a[0] == "train"
    )[1]
    numeric = {
        o
        for a in train._actions
        if a.type in (int, float)
        for o in a.option_strings
        if o.startswith("--") and o != "--rank"
    }
    covered = {a for _, args, _ in ROWS for a in args if a.startswith("--")}
    assert numeric, "no numeric flag found: the parser layout changed"
    assert not numeric - covered, sorted(numeric - covered)
