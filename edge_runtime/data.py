"""Local text-classification data: CSV/TSV, JSON Lines or Parquet files, tokenised with the bundle's tokenizer.

A row that cannot be used (a missing column, an empty text, a line that is not JSON, a CSV row with the wrong
number of fields) is reported with its file and line; with ``skip_bad_rows`` it is skipped and counted instead.
Label values that the bundle does not know are always an error that lists both sets: they mean the data and the
bundle do not belong together, not that one row is damaged.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}


class DataError(ValueError):
    """The data cannot be used; the message names the file, the line and what is wrong."""


@dataclass(frozen=True)
class DataSpec:
    """Which columns hold the text and the label, and how label values map to the bundle's labels."""

    text_columns: tuple[str, ...] = ("text",)
    """Columns joined (with ``separator``) into the text to classify, e.g. ``("title", "description")``."""
    label_column: str = "label"
    label_map: dict[str, str] | None = None
    """Data label value -> bundle label, e.g. ``{"1": "World"}``; None: the values are the bundle's labels."""
    separator: str = ". "
    skip_bad_rows: bool = False

    def __post_init__(self) -> None:
        if not self.text_columns or any(not c for c in self.text_columns):
            raise DataError("--text-column must name at least one column")
        if not self.label_column:
            raise DataError("--label-column must name a column")


def parse_label_map(value: str | None) -> dict[str, str] | None:
    """``"1=World,2=Sports"`` -> ``{"1": "World", "2": "Sports"}``."""
    if not value:
        return None
    out = {}
    for part in value.split(","):
        if "=" not in part:
            raise DataError(f"--label-map entry {part!r} is not VALUE=LABEL; e.g. --label-map 1=World,2=Sports")
        k, v = part.split("=", 1)
        out[k.strip()] = v.strip()
    return out


@dataclass
class Examples:
    """Texts with label indices into the bundle's labels, and what was skipped."""

    texts: list[str]
    labels: np.ndarray  # [N] int64
    where: list[str]  # "file:line" of each example
    skipped: list[str] = field(default_factory=list)  # "file:line: reason" of each skipped row

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, index: np.ndarray) -> Examples:
        return Examples([self.texts[i] for i in index], self.labels[index], [self.where[i] for i in index], [])

    def split(self, eval_fraction: float, seed: int = 0) -> tuple[Examples, Examples]:
        """A seeded, stratified hold-out split: (train, eval)."""
        if not 0.0 < eval_fraction < 1.0:
            raise DataError(f"--eval-fraction must be in (0, 1), got {eval_fraction}")
        rng = np.random.default_rng(seed)
        train_idx, eval_idx = [], []
        for label in np.unique(self.labels):
            idx = np.flatnonzero(self.labels == label)
            rng.shuffle(idx)
            n_eval = int(round(len(idx) * eval_fraction))
            eval_idx.extend(idx[:n_eval])
            train_idx.extend(idx[n_eval:])
        train, held = self.subset(np.sort(np.array(train_idx, int))), self.subset(np.sort(np.array(eval_idx, int)))
        if len(train) == 0 or len(held) == 0:
            raise DataError(f"--eval-fraction {eval_fraction} leaves {len(train)} training and {len(held)} evaluation rows")
        return train, held


def _rows(path: Path) -> Iterator[tuple[str, Any]]:
    """Yield (location, row dict or an error string) for every data row of a file."""
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: unknown file type {path.suffix!r}; use one of {', '.join(sorted(SUFFIXES))}")
    if kind in ("csv", "tsv"):
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.reader(fh, delimiter="," if kind == "csv" else "\t")
            try:
                header = next(reader, None)
                if header is None:
                    raise DataError(f"{path}: empty file (no header row)")
                start = reader.line_num + 1
                for values in reader:
                    where = f"{path}:{start}"
                    start = reader.line_num + 1
                    if not values:
                        continue
                    if len(values) != len(header):
                        yield where, f"{len(values)} fields, the header has {len(header)}"
                        continue
                    yield where, dict(zip(header, values))
            except csv.Error as exc:
                raise DataError(f"{path}:{reader.line_num}: malformed CSV: {exc}") from exc
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}: not UTF-8 text ({exc})") from exc
    elif kind == "jsonl":
        with open(path, encoding="utf-8") as fh:
            n = 0
            try:
                for n, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as exc:
                        yield f"{path}:{n}", f"not JSON ({exc.msg})"
                        continue
                    yield f"{path}:{n}", row if isinstance(row, dict) else f"a JSON {type(row).__name__}, not an object"
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}: after line {n}: not UTF-8 text ({exc})") from exc
    else:
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise DataError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from exc
        try:
            table = pq.read_table(path)
        except Exception as exc:  # pyarrow raises several unrelated types for damaged files
            raise DataError(f"{path}: not a readable Parquet file ({exc})") from exc
        for n, row in enumerate(table.to_pylist(), 1):
            yield f"{path}:row {n}", row


def load_examples(path: Path | str, spec: DataSpec, labels: list[str]) -> Examples:
    """Read every row of ``path``; map labels to indices into ``labels`` (the bundle's)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    index = {label: i for i, label in enumerate(labels)}
    texts, label_ids, wheres, skipped = [], [], [], []
    unknown: dict[str, str] = {}  # label value -> first location
    for where, row in _rows(path):
        problem = row if isinstance(row, str) else None
        if problem is None:
            missing = [c for c in (*spec.text_columns, spec.label_column) if c not in row]
            if missing:
                problem = f"no column(s) {missing}; the row has {sorted(row)}"
        if problem is None:
            parts = [row[c] for c in spec.text_columns]
            if any(p is not None and not isinstance(p, str) for p in parts):
                problem = f"text column(s) {list(spec.text_columns)} must hold strings"
            else:
                text = spec.separator.join(p.strip() for p in parts if p and p.strip())
                if not text:
                    problem = f"empty text in column(s) {list(spec.text_columns)}"
        if problem is None:
            raw = row[spec.label_column]
            if raw is None or (isinstance(raw, str) and not raw.strip()):
                problem = f"empty label in column {spec.label_column!r}"
        if problem is not None:
            if not spec.skip_bad_rows:
                raise DataError(f"{where}: {problem} (use --skip-bad-rows to skip such rows)")
            skipped.append(f"{where}: {problem}")
            continue
        value = str(raw).strip()
        if isinstance(raw, float) and raw.is_integer():
            value = str(int(raw))
        label = spec.label_map.get(value, None) if spec.label_map is not None else value
        if label not in index:
            unknown.setdefault(value, where)
            continue
        texts.append(text)
        label_ids.append(index[label])
        wheres.append(where)
    if unknown:
        first = ", ".join(f"{v!r} ({w})" for v, w in list(unknown.items())[:5])
        mapped = f" after --label-map {spec.label_map}" if spec.label_map is not None else ""
        raise DataError(
            f"{path}: label value(s) not in the bundle's labels{mapped}: {first}. "
            f"Data labels: {sorted(unknown)}; bundle labels: {labels}. "
            f"Map them with --label-map, e.g. --label-map {','.join(f'{v}={labels[i % len(labels)]}' for i, v in enumerate(sorted(unknown)[:2]))}"
        )
    if not texts:
        raise DataError(f"{path}: no usable rows ({len(skipped)} skipped)")
    return Examples(texts, np.array(label_ids, np.int64), wheres, skipped)


class TextEncoder:
    """The bundle's tokenizer (``tokenizer/tokenizer.json``, no transformers needed), truncating to max_seq_len."""

    def __init__(self, tokenizer_dir: Path, max_seq_len: int) -> None:
        from tokenizers import Tokenizer

        path = Path(tokenizer_dir) / "tokenizer.json"
        if not path.is_file():
            raise DataError(f"{path}: missing; the bundle's tokenizer must be a fast tokenizer (tokenizer.json)")
        self.tokenizer = Tokenizer.from_file(str(path))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=max_seq_len)
        self.max_seq_len = max_seq_len
        pads = [self.tokenizer.token_to_id(t) for t in ("[PAD]", "<pad>")]  # BERT-style, RoBERTa-style
        self.pad_id = next((p for p in pads if p is not None), 0)  # padded positions are masked out anyway

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        return [np.array(e.ids, np.int64) for e in self.tokenizer.encode_batch(texts)]


PAD_MULTIPLE = 16
"""Batches are padded to the longest row rounded up to a multiple of this: few distinct shapes (ONNX Runtime plans
memory per input shape, and every new shape costs a slow first step) at little extra compute."""


@dataclass
class EncodedData:
    """Token ids (unpadded) and labels; ``batches`` pads each batch to its longest row, rounded up to a multiple
    of ``pad_multiple`` and capped at ``max_len``."""

    ids: list[np.ndarray]
    labels: np.ndarray
    pad_id: int = 0
    max_len: int | None = None
    pad_multiple: int = PAD_MULTIPLE

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_tokens(self) -> int:
        return int(sum(len(x) for x in self.ids))

    def order(self, shuffle: bool, seed: int) -> np.ndarray:
        return np.random.default_rng(seed).permutation(len(self)) if shuffle else np.arange(len(self))

    def batch(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(input_ids [B, S], attention_mask [B, S], labels [B]) for the rows in ``index``."""
        width = max(len(self.ids[i]) for i in index)
        width = -(-width // self.pad_multiple) * self.pad_multiple
        if self.max_len is not None:
            width = min(width, max(self.max_len, max(len(self.ids[i]) for i in index)))
        ids = np.full((len(index), width), self.pad_id, np.int64)
        mask = np.zeros((len(index), width), np.int64)
        for row, i in enumerate(index):
            n = len(self.ids[i])
            ids[row, :n] = self.ids[i]
            mask[row, :n] = 1
        return ids, mask, self.labels[index]

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0, start: int = 0) -> Iterator[tuple[np.ndarray, ...]]:
        """Batches in a seeded order; ``start`` skips the first batches (resuming inside an epoch)."""
        order = self.order(shuffle, seed)
        for b in range(start, (len(order) + batch_size - 1) // batch_size):
            yield self.batch(order[b * batch_size : (b + 1) * batch_size])


def encode_examples(examples: Examples, encoder: TextEncoder) -> EncodedData:
    return EncodedData(encoder.encode(examples.texts), examples.labels, encoder.pad_id, encoder.max_seq_len)
