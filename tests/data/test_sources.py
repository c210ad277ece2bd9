"""megatron_tst.data.sources: expanding inputs (files, directories, globs, Hugging Face datasets)
and reading their documents (.jsonl/.json/.txt, .gz/.bz2/.zst, .parquet, .arrow), on real files."""

from __future__ import annotations

import bz2
import gzip
import json
import os
from pathlib import Path

import pytest

from megatron_tst.data.errors import DataError
from megatron_tst.data.sources import (
    DocumentCounter,
    ExpandedInputs,
    Source,
    expand_inputs,
    read_documents,
)

zstandard = pytest.importorskip("zstandard")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def docs(prefix: str, count: int) -> list[str]:
    return [f"{prefix} document {i}.\nIts second line." for i in range(count)]


def jsonl_bytes(texts, key: str = "text") -> bytes:
    return "".join(json.dumps({"id": i, key: t}) + "\n" for i, t in enumerate(texts)).encode()


def write_zst(path: Path, data: bytes, frames: int = 1) -> Path:
    """``data`` as ``frames`` concatenated zstd frames (what `cat a.zst b.zst` or pzstd make)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    step = -(-len(data) // frames) if data else 1
    compressor = zstandard.ZstdCompressor(level=3)
    chunks = [data[i:i + step] for i in range(0, len(data), step)] or [b""]
    path.write_bytes(b"".join(compressor.compress(chunk) for chunk in chunks))
    return path


def long_window_zst(data: bytes) -> bytes:
    """A frame that needs a 1 GiB window (`zstd --long=30` on a stream of unknown size)."""
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=30, enable_ldm=True)
    stream = zstandard.ZstdCompressor(compression_params=params).compressobj()
    return stream.compress(data) + stream.flush()


def write_parquet(path: Path, texts, row_group_size: int = 10, **columns) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({"id": list(range(len(texts))), "text": texts, **columns})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def read_all(inputs, text_key: str = "text", counter=None) -> list[str]:
    counter = counter if counter is not None else DocumentCounter()
    return [d for s in expand_inputs(inputs).sources for d in read_documents(s, text_key, counter)]


def names(inputs) -> list[str]:
    return [s.name for s in expand_inputs(inputs).sources]


def raises(pattern: str):
    return pytest.raises(DataError, match=pattern)


@pytest.fixture(scope="module")
def hf_dataset(tmp_path_factory):
    """A Dataset saved in two arrow shards, and a DatasetDict with two splits."""
    datasets = pytest.importorskip("datasets")
    root = tmp_path_factory.mktemp("hf")
    texts = docs("hf", 25)
    dataset = datasets.Dataset.from_dict({"text": texts, "n": list(range(25))})
    dataset.save_to_disk(str(root / "fineweb"), num_shards=2)
    split = datasets.Dataset.from_dict({"text": docs("split", 3)})
    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(str(root / "dict"))
    with_null = datasets.Dataset.from_dict({"text": ["fine", "also fine", None]})
    with_null.save_to_disk(str(root / "nulls"))
    return root, texts


# --- formats ---------------------------------------------------------------------------------------
def test_zst_shards_in_a_dclm_layout(tmp_path):
    root = tmp_path / "dclm"
    expected, paths = [], []
    for g in (1, 2):
        for shard in range(2):
            texts = docs(f"g{g}s{shard}", 7)
            name = f"global-shard_0{g}_of_10/local-shard_0_of_10/shard_0000000{shard}_processed"
            paths.append(write_zst(root / f"{name}.jsonl.zst", jsonl_bytes(texts), frames=shard + 1))
            expected += texts
    expanded = expand_inputs([root])
    assert [s.name for s in expanded.sources] == [
        "global-shard_01_of_10/local-shard_0_of_10/shard_00000000_processed",
        "global-shard_01_of_10/local-shard_0_of_10/shard_00000001_processed",
        "global-shard_02_of_10/local-shard_0_of_10/shard_00000000_processed",
        "global-shard_02_of_10/local-shard_0_of_10/shard_00000001_processed",
    ]
    assert [s.path for s in expanded.sources] == paths and expanded.ignored == []
    assert {(s.format, s.compression) for s in expanded.sources} == {("jsonl", ".zst")}
    assert read_all([root]) == expected
    # a file argument is named by its file name alone
    assert expand_inputs([paths[0]]).sources == [
        Source(paths[0], "shard_00000000_processed", "jsonl", ".zst")
    ]


def test_every_text_format_and_compression(tmp_path):
    texts = docs("t", 4)
    txt = "\n\n".join(texts).encode()
    files = {
        "a.jsonl": jsonl_bytes(texts),
        "b.json": jsonl_bytes(texts),
        "c.jsonl.gz": gzip.compress(jsonl_bytes(texts)),
        "d.txt.bz2": bz2.compress(txt),
        "e.JSON.ZST": zstandard.ZstdCompressor().compress(jsonl_bytes(texts)),
        "f.txt.zst": zstandard.ZstdCompressor().compress(txt),
        "g.txt": txt,
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    sources = expand_inputs([tmp_path / n for n in files]).sources
    assert [(s.name, s.format, s.compression) for s in sources] == [
        ("a", "jsonl", None), ("b", "jsonl", None), ("c", "jsonl", ".gz"), ("d", "txt", ".bz2"),
        ("e", "jsonl", ".zst"), ("f", "txt", ".zst"), ("g", "txt", None),
    ]
    for source in sources:
        assert list(read_documents(source)) == texts, source


def test_zst_empty_frames_and_multi_frame(tmp_path):
    texts = docs("z", 50)
    path = write_zst(tmp_path / "many.jsonl.zst", jsonl_bytes(texts), frames=9)
    # a skippable frame (zstd's metadata frame) between data frames is fine
    skippable = (0x184D2A50).to_bytes(4, "little") + (3).to_bytes(4, "little") + b"abc"
    path.write_bytes(skippable + path.read_bytes())
    assert read_all([path]) == texts


def test_parquet_shards_with_row_groups(tmp_path):
    root = tmp_path / "fineweb-edu" / "data"
    a, b = docs("pa", 35), docs("pb", 12)
    write_parquet(root / "CC-MAIN-2024-10" / "000_00000.parquet", a, row_group_size=10)
    write_parquet(root / "CC-MAIN-2024-10" / "000_00001.parquet", b, row_group_size=5)
    assert pq.ParquetFile(root / "CC-MAIN-2024-10" / "000_00000.parquet").num_row_groups == 4
    sources = expand_inputs([tmp_path / "fineweb-edu"]).sources
    assert [(s.name, s.format, s.compression) for s in sources] == [
        ("data/CC-MAIN-2024-10/000_00000", "parquet", None),
        ("data/CC-MAIN-2024-10/000_00001", "parquet", None),
    ]
    counter = DocumentCounter()
    assert read_all([tmp_path / "fineweb-edu"], counter=counter) == a + b
    assert (counter.documents, counter.skipped) == (47, 0)


def test_parquet_other_column_empty_rows_and_large_string(tmp_path):
    path = tmp_path / "x.parquet"
    table = pa.table({"content": pa.array(["one", "", "  \n", "two"], type=pa.large_string())})
    pq.write_table(table, path, row_group_size=3)
    counter = DocumentCounter()
    assert read_all([path], text_key="content", counter=counter) == ["one", "two"]
    assert (counter.documents, counter.skipped) == (2, 2)


def test_parquet_is_streamed_a_row_group_at_a_time(tmp_path):
    """Documents come out before later row groups are read: a corrupt last row group only fails
    once the reader gets there (so memory does not grow with the file)."""
    path = write_parquet(tmp_path / "big.parquet", docs("s", 200), row_group_size=10)
    metadata = pq.ParquetFile(path).metadata
    assert metadata.num_row_groups == 20
    last = metadata.row_group(19).column(1)  # the text column's chunk in the last row group
    start = last.dictionary_page_offset or last.data_page_offset
    data = bytearray(path.read_bytes())
    data[start:start + last.total_compressed_size] = b"\xff" * last.total_compressed_size
    path.write_bytes(bytes(data))
    documents = read_documents(expand_inputs([path]).sources[0])
    assert next(documents) == "s document 0.\nIts second line."
    assert [next(documents) for _ in range(189)][-1].startswith("s document 189.")
    with raises(r"big\.parquet: cannot read row group 19 \(rows from 190, counting from 0\).*complete"):
        list(documents)


def test_hf_dataset_given_directly(hf_dataset):
    root, texts = hf_dataset
    expanded = expand_inputs([root / "fineweb"])
    assert [(s.name, s.format, s.compression) for s in expanded.sources] == [
        ("fineweb/data-00000-of-00002", "arrow", None),
        ("fineweb/data-00001-of-00002", "arrow", None),
    ]
    assert read_all([root / "fineweb"]) == texts
    # a split of a DatasetDict is a dataset
    assert names([root / "dict" / "train"]) == ["train/data-00000-of-00001"]
    assert read_all([root / "dict" / "test"]) == docs("split", 3)


def test_hf_dataset_inside_a_walk_and_a_glob(hf_dataset, tmp_path):
    import shutil

    root, texts = hf_dataset
    corpus = tmp_path / "corpus"
    shutil.copytree(root / "fineweb", corpus / "hf" / "fineweb")
    (corpus / "hf" / "fineweb" / "cache-0123abcd.arrow").write_bytes(b"a datasets cache file")
    (corpus / "a.jsonl").write_bytes(jsonl_bytes(["first"]))
    expanded = expand_inputs([corpus])
    assert [s.name for s in expanded.sources] == [
        "a", "hf/fineweb/data-00000-of-00002", "hf/fineweb/data-00001-of-00002"
    ]
    assert expanded.ignored == [corpus / "hf" / "fineweb" / "cache-0123abcd.arrow"]
    assert read_all([corpus]) == ["first"] + texts
    # a glob that matches the dataset directory
    assert names([str(corpus / "hf" / "fine*")]) == [
        "fineweb/data-00000-of-00002", "fineweb/data-00001-of-00002"
    ]


def test_stray_arrow_files_stream_and_file_format(hf_dataset, tmp_path):
    root, texts = hf_dataset
    stream = root / "fineweb" / "data-00001-of-00002.arrow"
    table = pa.table({"text": docs("f", 30)})
    file_format = tmp_path / "table.arrow"
    with pa.OSFile(str(file_format), "wb") as sink:
        with pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table, max_chunksize=7)
    sources = expand_inputs([stream, file_format]).sources
    assert [(s.name, s.format) for s in sources] == [
        ("data-00001-of-00002", "arrow"), ("table", "arrow")
    ]
    assert list(read_documents(sources[1])) == docs("f", 30)
    second = list(read_documents(sources[0]))
    first = read_all([root / "fineweb" / "data-00000-of-00002.arrow"])
    assert 0 < len(first) < len(texts) and first + second == texts


# --- inputs: directories, globs, names ---------------------------------------------------------------
def test_walk_is_sorted_skips_hidden_and_reports_ignored(tmp_path):
    root = tmp_path / "d"
    for name in ["b/2.jsonl", "b/1.txt", "a.jsonl", "c/x/y.json", "B.jsonl"]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(jsonl_bytes([name]) if "json" in name else name.encode())
    for name in ["README.md", "b/table.csv", ".hidden.jsonl", ".git/x.jsonl", "c/data.parquet.gz"]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")
    expanded = expand_inputs([root])
    assert [s.name for s in expanded.sources] == ["B", "a", "b/1", "b/2", "c/x/y"]
    assert expanded.ignored == [root / "README.md", root / "b" / "table.csv",
                                root / "c" / "data.parquet.gz"]
    assert isinstance(expanded, ExpandedInputs)
    assert read_all([root]) == ["B.jsonl", "a.jsonl", "b/1.txt", "b/2.jsonl", "c/x/y.json"]


def test_globs(tmp_path, monkeypatch):
    for name in ["x/a/1.jsonl.zst", "x/a/2.jsonl.zst", "x/b/3.jsonl.zst", "x/b/4.txt", "y/5.jsonl.zst"]:
        write_zst(tmp_path / name, jsonl_bytes([name]))
    (tmp_path / "x" / "b" / "4.txt").write_text("4.txt")
    # names are relative to the pattern's leading directory without glob characters
    assert names([str(tmp_path / "x" / "**" / "*.jsonl.zst")]) == ["a/1", "a/2", "b/3"]
    assert names([str(tmp_path / "x" / "*" / "[12].jsonl.zst")]) == ["a/1", "a/2"]
    # a matched directory is read like a directory argument, names relative to the base
    assert names([str(tmp_path / "x" / "?")]) == ["a/1", "a/2", "b/3", "b/4"]
    # relative patterns, several inputs: in the order given
    monkeypatch.chdir(tmp_path)
    assert names(["y/*.zst", "x/b/*"]) == ["5", "3", "4"]
    assert names(["*/a/*"]) == ["x/a/1", "x/a/2"]
    # a pattern that also matches a file through a matched directory reads it once
    assert names(["x/**"]) == ["a/1", "a/2", "b/3", "b/4"]
    assert read_all(["y/*", "x/a/1.jsonl.zst"]) == ["y/5.jsonl.zst", "x/a/1.jsonl.zst"]


def test_inputs_keep_the_given_order(tmp_path):
    for name in ["b.jsonl", "a.jsonl"]:
        (tmp_path / name).write_bytes(jsonl_bytes([name]))
    assert read_all([tmp_path / "b.jsonl", tmp_path / "a.jsonl"]) == ["b.jsonl", "a.jsonl"]
    assert read_all(str(tmp_path / "a.jsonl")) == ["a.jsonl"]  # one input, not a list


def test_name_collisions(tmp_path):
    data = tmp_path / "data"
    for name in ["one/shard.jsonl", "two/shard.jsonl.zst", "other/same.jsonl", "other/same.txt"]:
        (data / name).parent.mkdir(parents=True, exist_ok=True)
        (data / name).write_bytes(b"x")
    with raises(rf"one/shard\.jsonl and .*two/shard\.jsonl\.zst get the same output name 'shard'.*"
                rf"pass their common directory {data} instead"):
        expand_inputs([data / "one" / "shard.jsonl", data / "two" / "shard.jsonl.zst"])
    with raises(r"one/shard\.jsonl and .*two/shard\.jsonl\.zst get the same output name 'shard'"):
        expand_inputs([data / "one", data / "two"])
    with raises(r"same\.jsonl and .*same\.txt get the same output name 'same'.*rename one"):
        expand_inputs([data / "other"])
    # their common directory (or a pattern below it) keeps them apart
    (data / "other" / "same.txt").unlink()
    assert names([data]) == ["one/shard", "other/same", "two/shard"]
    assert names([str(data / "[ot][nw]*")]) == ["one/shard", "two/shard"]


def test_same_file_twice(tmp_path):
    path = tmp_path / "d" / "a.jsonl"
    path.parent.mkdir()
    path.write_bytes(jsonl_bytes(["x"]))
    with raises(r"a\.jsonl: the same file is reached by input .*a\.jsonl' and again by input .*d'.*"
                r"Pass each file once"):
        expand_inputs([path, tmp_path / "d"])
    with raises(r"the same file is reached by input"):
        expand_inputs([path, str(tmp_path / "d" / "*.jsonl")])
    with raises(r"a\.jsonl: the same file is given twice as input"):
        expand_inputs([path, path])
    os.symlink(path, tmp_path / "d" / "link.jsonl")
    with raises(r"the same file is reached twice within input .*d' \(also as .*link\.jsonl, a link\)"):
        expand_inputs([tmp_path / "d"])


# --- errors --------------------------------------------------------------------------------------------
def test_expand_errors(tmp_path, hf_dataset):
    root, _ = hf_dataset
    (tmp_path / "table.csv").write_bytes(b"a,b\n")
    (tmp_path / "data.parquet.gz").write_bytes(b"x")
    (tmp_path / "only-docs").mkdir()
    (tmp_path / "only-docs" / "README.md").write_text("x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".hidden.jsonl").write_text("{}")
    cases = [
        ([], r"no inputs given"),
        ([tmp_path / "missing.jsonl"], r"missing\.jsonl: input file not found"),
        ([tmp_path / "table.csv"], r"table\.csv: unsupported input format '\.csv'.*\.zst.*rename"),
        ([str(tmp_path / "*.csv")], r"table\.csv: unsupported input format"),
        ([tmp_path / "data.parquet.gz"], r"data\.parquet\.gz: Parquet and Arrow files cannot be "
                                         r"read compressed.*decompress"),
        ([str(tmp_path / "nothing" / "*.jsonl")], r"nothing/\*\.jsonl: the pattern matches no files.*quote"),
        ([tmp_path / "only-docs"], r"only-docs: no input files found in the directory; it holds only 1 "
                                   r"file\(s\) with other suffixes, e\.g\. README\.md\."),
        ([tmp_path / "empty"], r"empty: no input files found in the directory; it holds no files"),
        ([str(tmp_path / "empt?")], r"empt\?: the pattern matches only directories without input files"),
        ([root / "dict"], r"dict: a Hugging Face DatasetDict \(splits: 'train', 'test'\).*"
                          r"pass the directory of the split.*dict/train"),
        ([root], r"dict: a Hugging Face DatasetDict"),  # met in a walk
        ([str(root / "fineweb" / "*")], r"fineweb/dataset_info\.json: metadata of the Hugging Face "
                                         r"dataset .*fineweb, not data; pass the dataset directory"),
        ([root / "dict" / "dataset_dict.json"], r"dict: a Hugging Face DatasetDict"),
    ]
    for inputs, pattern in cases:
        with raises(pattern) as info:
            expand_inputs(inputs)
        assert "\n" not in str(info.value)


def test_broken_hf_datasets(hf_dataset, tmp_path):
    import shutil

    root, _ = hf_dataset
    incomplete = tmp_path / "incomplete"
    shutil.copytree(root / "fineweb", incomplete)
    (incomplete / "data-00001-of-00002.arrow").unlink()
    with raises(r"data-00001-of-00002\.arrow: listed in .*state\.json but missing.*save_to_disk"):
        expand_inputs([incomplete])
    (incomplete / "state.json").write_text("{not json")
    with raises(r"state\.json: not the state\.json of a Hugging Face dataset: invalid JSON"):
        expand_inputs([incomplete])
    (incomplete / "state.json").write_text('{"_data_files": []}')
    with raises(r"state\.json: lists no data files"):
        expand_inputs([incomplete])


@pytest.mark.parametrize(
    "name, make, pattern",
    [
        ("corrupt.jsonl.zst", lambda: b"this is not zstd data at all",
         r"corrupt\.jsonl\.zst: cannot read compressed data \(.*\)\. Check that the file is complete "
         r"and matches its suffix"),
        ("truncated.jsonl.zst",
         lambda: zstandard.ZstdCompressor().compress(jsonl_bytes(docs("t", 500)))[:-7],
         r"truncated\.jsonl\.zst: cannot read compressed data \(.*truncated.*\)\. Check that the "
         r"file is complete"),
        ("header-only.txt.zst", lambda: zstandard.ZstdCompressor().compress(b"text")[:3],
         r"header-only\.txt\.zst: cannot read compressed data"),
        ("garbage-after.jsonl.zst",
         lambda: zstandard.ZstdCompressor().compress(jsonl_bytes(["ok"])) + b"trailing junk",
         r"garbage-after\.jsonl\.zst: cannot read compressed data"),
        ("truncated.jsonl.gz", lambda: gzip.compress(jsonl_bytes(docs("t", 50)))[:-20],
         r"truncated\.jsonl\.gz: cannot read compressed data"),
        ("empty.jsonl.zst", lambda: zstandard.ZstdCompressor().compress(b""),
         r"empty\.jsonl\.zst: no documents found \(the file is empty"),
        ("blank.txt.zst", lambda: zstandard.ZstdCompressor().compress(b"\n \n"),
         r"blank\.txt\.zst: no documents found"),
        ("allempty.json", lambda: b'{"text": " "}\n{"text": ""}\n',
         r"allempty\.json: no documents found \(all 2 'text' values are empty\)"),
        ("pretty.json", lambda: b'{\n  "text": "x"\n}\n',
         r"pretty\.json:1: invalid JSON .*read as JSON Lines.*jq -c"),
        ("array.json", lambda: b'[{"text": "x"}]\n',
         r"array\.json:1: expected a JSON object .*got list\. A '\.json' file is read as JSON Lines"),
        ("long-window.jsonl.zst", lambda: long_window_zst(jsonl_bytes(["x"])),
         r"long-window\.jsonl\.zst: cannot read compressed data \(.*too much memory.*\)\. The file "
         r"was compressed with a window over 128 MiB.*zstd -d --long=31 long-window\.jsonl\.zst"),
        ("latin1.jsonl.zst", lambda: zstandard.ZstdCompressor().compress(b'{"text": "caf\xe9"}\n'),
         r"latin1\.jsonl\.zst:1: not valid UTF-8"),
    ],
)
def test_bad_text_files(tmp_path, name, make, pattern):
    path = tmp_path / name
    path.write_bytes(make())
    with raises(pattern) as info:
        read_all([path])
    assert "\n" not in str(info.value)


def test_bad_parquet_files(tmp_path):
    good = write_parquet(tmp_path / "good.parquet", docs("g", 30), row_group_size=10)
    data = good.read_bytes()
    (tmp_path / "truncated.parquet").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.parquet").write_bytes(b"plain text, not parquet\n")
    write_parquet(tmp_path / "nulls.parquet", ["a"] * 25 + [None] + ["b"] * 4, row_group_size=10)
    pq.write_table(pa.table({"body": ["x"], "url": ["u"]}), tmp_path / "nocolumn.parquet")
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    pq.write_table(pa.table({"text": pa.array([b"x"], type=pa.binary())}), tmp_path / "bytes.parquet")
    pq.write_table(pa.table({"text": pa.array([], type=pa.string())}), tmp_path / "norows.parquet")
    write_parquet(tmp_path / "allempty.parquet", ["", " "])
    cases = {
        "truncated": r"truncated\.parquet: not a readable Parquet file \(.*magic bytes.*\)\. "
                     r"Check that the file is complete",
        "text": r"text\.parquet: not a readable Parquet file",
        "nulls": r"nulls\.parquet: row 25 \(row group 2, counting from 0\): the 'text' value is null, "
                 r"not a string\. Drop or fill",
        "nocolumn": r"nocolumn\.parquet: no 'text' column \(columns: 'body', 'url'\)\. .*--text-key",
        "ints": r"ints\.parquet: the 'text' column has type int64, not string.*--text-key",
        "bytes": r"bytes\.parquet: the 'text' column has type binary, not string",
        "norows": r"norows\.parquet: no documents found \(the file holds no rows\)",
        "allempty": r"allempty\.parquet: no documents found \(all 2 'text' values are empty\)",
    }
    for stem, pattern in cases.items():
        with raises(pattern) as info:
            read_all([tmp_path / f"{stem}.parquet"])
        assert "\n" not in str(info.value)


def test_bad_arrow_files(hf_dataset, tmp_path):
    root, _ = hf_dataset
    with raises(r"nulls/data-00000-of-00001\.arrow: row 2 \(record batch 0, counting from 0\): the "
                r"'text' value is null"):
        read_all([root / "nulls"])
    with raises(r"data-00000-of-00002\.arrow: no 'body' column \(columns: 'text', 'n'\)"):
        read_all([root / "fineweb"], text_key="body")
    with raises(r"data-00000-of-00002\.arrow: the 'n' column has type int64, not string"):
        read_all([root / "fineweb"], text_key="n")
    data = (root / "fineweb" / "data-00000-of-00002.arrow").read_bytes()
    (tmp_path / "cut.arrow").write_bytes(data[:-40])
    with raises(r"cut\.arrow: cannot read record batch 0 \(rows from 0, counting from 0\)"):
        read_all([tmp_path / "cut.arrow"])
    (tmp_path / "junk.arrow").write_bytes(b"not arrow data")
    with raises(r"junk\.arrow: not readable as Arrow IPC stream or file data"):
        read_all([tmp_path / "junk.arrow"])


def test_counter_is_shared_and_read_documents_is_lazy(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(jsonl_bytes(["x", " ", "y"]))
    (tmp_path / "b.jsonl").write_bytes(jsonl_bytes(["", "z"]) + b"{broken\n")
    counter = DocumentCounter()
    sources = expand_inputs([tmp_path]).sources
    assert list(read_documents(sources[0], counter=counter)) == ["x", "y"]
    documents = read_documents(sources[1], counter=counter)
    assert next(documents) == "z"
    assert (counter.documents, counter.skipped) == (3, 2)
    with raises(r"b\.jsonl:3: invalid JSON"):
        next(documents)
