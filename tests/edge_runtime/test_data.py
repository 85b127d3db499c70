"""Local data files: formats, joined columns, malformed rows with file and line, label checks, the hold-out split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.data import DataError, DataSpec, EncodedData, TextEncoder, encode_examples, load_examples, parse_label_map

LABELS = ["World", "Sports", "Business"]


def write_csv(path: Path, rows: list[str]) -> Path:
    path.write_text("label,title,description\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return path


def test_csv_with_joined_columns_and_label_map(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", ['1,Talks resume,"Leaders met, again."', "2,Team wins,Final score 3-1", "3,Stocks rise,"])
    spec = DataSpec(("title", "description"), "label", parse_label_map("1=World,2=Sports,3=Business"))
    ex = load_examples(path, spec, LABELS)
    assert ex.texts == ["Talks resume. Leaders met, again.", "Team wins. Final score 3-1", "Stocks rise"]
    assert ex.labels.tolist() == [0, 1, 2]
    assert ex.where == [f"{path}:2", f"{path}:3", f"{path}:4"]


def test_jsonl_and_parquet_read_the_same_rows(tmp_path: Path) -> None:
    rows = [{"text": "a game", "label": "Sports"}, {"text": "the market", "label": "Business"}]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    a = load_examples(jsonl, DataSpec(), LABELS)
    b = load_examples(parquet, DataSpec(), LABELS)
    assert a.texts == b.texts == ["a game", "the market"]
    assert a.labels.tolist() == b.labels.tolist() == [1, 2]
    assert b.where[1] == f"{parquet}:row 2"


def test_integer_labels_in_parquet_map_like_strings(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([{"text": "x", "label": 2}, {"text": "y", "label": 1}]), path)
    ex = load_examples(path, DataSpec(label_map={"1": "World", "2": "Sports"}), LABELS)
    assert ex.labels.tolist() == [1, 0]


@pytest.mark.parametrize(
    ("content", "line", "reason"),
    [
        ("label,title,description\n1,ok,fine\n2,only two\n", 3, "2 fields, the header has 3"),
        ("label,title,description\n1,ok,fine\n2,,\n", 3, "empty text"),
        ("label,title,description\n1,ok,fine\n,x,y\n", 3, "empty label"),
    ],
)
def test_malformed_csv_row_names_file_and_line(tmp_path: Path, content: str, line: int, reason: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(content)
    spec = DataSpec(("title", "description"), label_map={"1": "World", "2": "Sports"})
    with pytest.raises(DataError, match=rf"bad.csv:{line}: .*{reason}.*--skip-bad-rows"):
        load_examples(path, spec, LABELS)
    skipping = DataSpec(("title", "description"), label_map={"1": "World", "2": "Sports"}, skip_bad_rows=True)
    ex = load_examples(path, skipping, LABELS)
    assert len(ex) == 1 and len(ex.skipped) == 1 and f"bad.csv:{line}" in ex.skipped[0]


def test_multiline_quoted_csv_field_keeps_the_starting_line(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", ['1,"two\nline title",x', "2,,"])
    with pytest.raises(DataError, match=r"d.csv:4: empty text"):
        load_examples(path, DataSpec(("title", "description"), label_map={"1": "World", "2": "Sports"}), LABELS)


def test_jsonl_bad_line_and_missing_column(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": "World"}\n{not json\n{"txt": "b", "label": "World"}\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: not JSON"):
        load_examples(path, DataSpec(), LABELS)
    ex = load_examples(path, DataSpec(skip_bad_rows=True), LABELS)
    assert len(ex) == 1
    assert [s.split(": ", 1)[0] for s in ex.skipped] == [f"{path}:2", f"{path}:3"]
    assert "no column(s) ['text']" in ex.skipped[1]


def test_unknown_labels_list_both_sets_even_when_skipping(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", ["1,a,b", "7,c,d", "9,e,f"])
    spec = DataSpec(("title",), skip_bad_rows=True)
    with pytest.raises(DataError) as info:
        load_examples(path, spec, LABELS)
    message = str(info.value)
    assert "Data labels: ['1', '7', '9']" in message and "bundle labels: ['World', 'Sports', 'Business']" in message
    assert "--label-map" in message


def test_bad_arguments_are_named() -> None:
    with pytest.raises(DataError, match="--label-map entry 'World'"):
        parse_label_map("World")
    with pytest.raises(DataError, match="--text-column"):
        DataSpec(())


def test_unknown_suffix_and_missing_file(tmp_path: Path) -> None:
    (tmp_path / "d.xlsx").write_text("x")
    with pytest.raises(DataError, match="unknown file type '.xlsx'"):
        load_examples(tmp_path / "d.xlsx", DataSpec(), LABELS)
    with pytest.raises(DataError, match="no such file"):
        load_examples(tmp_path / "nope.csv", DataSpec(), LABELS)


def test_split_is_stratified_seeded_and_disjoint(tmp_path: Path) -> None:
    rows = [f"{1 + i % 3},t{i},d" for i in range(60)]
    ex = load_examples(write_csv(tmp_path / "d.csv", rows), DataSpec(("title",), label_map={"1": "World", "2": "Sports", "3": "Business"}), LABELS)
    train, held = ex.split(0.2, seed=3)
    assert len(held) == 12 and len(train) == 48
    assert np.bincount(held.labels).tolist() == [4, 4, 4]
    assert not set(train.texts) & set(held.texts)
    assert ex.split(0.2, seed=3)[1].texts == held.texts
    with pytest.raises(DataError, match="--eval-fraction"):
        ex.split(1.5)


def test_tokenised_batches_pad_to_the_longest_row(tiny_bundle: Path) -> None:
    encoder = TextEncoder(tiny_bundle / "tokenizer", max_seq_len=16)
    from edge_runtime.data import Examples

    ex = Examples(["the news", "the game the team win the market rise fall the world news game team"], np.array([0, 1]), ["a", "b"])
    data = encode_examples(ex, encoder)
    assert isinstance(data, EncodedData)
    assert len(data.ids[1]) == 16  # truncated to max_seq_len, [CLS] ... [SEP]
    ids, mask, labels = data.batch(np.array([0, 1]))
    assert ids.shape == mask.shape == (2, 16)
    assert mask[0].sum() == len(data.ids[0]) and (ids[0, mask[0] == 0] == encoder.pad_id).all()
    assert labels.tolist() == [0, 1]
    order = [b[2].tolist() for b in data.batches(1, shuffle=True, seed=1)]
    assert sorted(sum(order, [])) == [0, 1]
    assert [b[2].tolist() for b in data.batches(1, shuffle=True, seed=1, start=1)] == order[1:]
