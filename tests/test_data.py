"""Data pipeline: tokenizer, preprocessing, GPT datasets, and the locked default-data build.

Everything runs on a few small standard-library files and a 512-token vocabulary; the real
default pipeline (tens of MB) is only exercised up to writing its corpus JSONL.
"""

from __future__ import annotations

import fcntl
import json
import subprocess
import sys
import sysconfig
import textwrap
import time
from pathlib import Path

import numpy
import pytest
import torch
import torch.distributed as dist

from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.tokenizers import MegatronTokenizerBase
from megatron_swiftmoe.training import preprocess_data
from megatron_swiftmoe.training.data import (
    SentencePieceTokenizer,
    build_gpt_datasets,
    build_mock_datasets,
    default_cache_dir,
    default_corpus,
    default_data_dir,
    iter_documents,
    load_tokenizer,
    prepare_default_data,
    stdlib_source_files,
    tokenize_to_indexed_dataset,
    train_tokenizer,
)
from tests.distributed import run_distributed

VOCAB = 512
STDLIB = Path(sysconfig.get_paths()["stdlib"])
# ~150 kB of real text: enough for a 512-token BPE vocabulary, trained in well under a second.
SMALL_CORPUS = [STDLIB / name for name in ("textwrap.py", "string.py", "bisect.py", "shlex.py",
                                           "colorsys.py", "fnmatch.py", "getopt.py", "queue.py")]
NON_ASCII = "naïve café — 世界 🙂\tTab\n\n    indented  double  spaces \r\n"


@pytest.fixture(scope="module")
def tokenizer_model(tmp_path_factory) -> Path:
    return train_tokenizer(SMALL_CORPUS, tmp_path_factory.mktemp("tok") / "tok", VOCAB)


@pytest.fixture(scope="module")
def tokenizer(tokenizer_model) -> SentencePieceTokenizer:
    return load_tokenizer(tokenizer_model, VOCAB)


@pytest.fixture(scope="module")
def data_prefix(tmp_path_factory, tokenizer) -> Path:
    prefix = tmp_path_factory.mktemp("data") / "small_text_document"
    tokenize_to_indexed_dataset(SMALL_CORPUS, prefix, tokenizer)
    return prefix


def read_sequences(prefix: Path) -> list[list[int]]:
    """The token sequences of PREFIX.bin, copied out: megatron's arrays view an mmap that
    closes (and would crash a later read) when its IndexedDataset is garbage-collected."""
    dataset = IndexedDataset(str(prefix))
    return [dataset[i].tolist() for i in range(len(dataset))]


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trips_any_text(tokenizer):
    assert isinstance(tokenizer, MegatronTokenizerBase)
    assert tokenizer.vocab_size == VOCAB
    assert (tokenizer.eod, tokenizer.pad) == (2, 3)
    for text in [NON_ASCII, "", "x", SMALL_CORPUS[0].read_text(), "\x00\x7f\ufffd"]:
        ids = tokenizer.tokenize(text)
        assert all(isinstance(i, int) and 0 <= i < VOCAB for i in ids)
        assert tokenizer.detokenize(ids) == text
        assert tokenizer.detokenize(numpy.array(ids)) == text
    # Characters outside the vocabulary are spelled out as UTF-8 bytes.
    assert len(tokenizer.tokenize("🙂")) == 4


def test_train_tokenizer_from_texts_is_deterministic(tmp_path):
    texts = [path.read_text() for path in SMALL_CORPUS]
    first = train_tokenizer(iter(texts), tmp_path / "a", 400)
    second = train_tokenizer((t for t in texts), tmp_path / "b", 400)
    # (the .model files differ only in the model_prefix recorded in them)
    assert (tmp_path / "a.vocab").read_text() == (tmp_path / "b.vocab").read_text()
    assert load_tokenizer(first).vocab_size == 400
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a.model", "a.vocab", "b.model", "b.vocab"
    ]


def test_tokenizer_errors(tmp_path, tokenizer_model):
    with pytest.raises(FileNotFoundError, match="tokenizer model not found: .*missing.model"):
        load_tokenizer(tmp_path / "missing.model")
    with pytest.raises(ValueError, match=f"vocabulary of {VOCAB} tokens but vocab_size=8192"):
        load_tokenizer(tokenizer_model, vocab_size=8192)
    with pytest.raises(ValueError, match="vocab_size must exceed 260"):
        train_tokenizer(SMALL_CORPUS, tmp_path / "tiny", 200)
    with pytest.raises(ValueError, match="Vocabulary size is smaller than required_chars"):
        train_tokenizer(iter([NON_ASCII * 3 + "".join(map(chr, range(33, 127)))]),
                        tmp_path / "t", 270)
    assert not list(tmp_path.iterdir())  # nothing half-written


# ------------------------------------------------------------------------------ preprocessing


def test_iter_documents_formats_and_errors(tmp_path):
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text('{"text": "a", "title": "t"}\n\n{"text": "b\\n\\nc", "title": "u"}\n')
    assert list(iter_documents(jsonl)) == ["a", "b\n\nc"]
    assert list(iter_documents(jsonl, ["title", "text"])) == ["t", "a", "u", "b\n\nc"]
    txt = tmp_path / "doc.txt"
    txt.write_bytes(b"line\n\nnext \xff\n")
    assert list(iter_documents(txt)) == ["line\n\nnext \ufffd\n"]

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: invalid JSON"):
        list(iter_documents(bad))
    bad.write_text('{"text": "ok"}\n["text"]\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: expected a JSON object with .* 'text'"):
        list(iter_documents(bad))
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: .*'body'"):
        list(iter_documents(bad, ["body"]))
    with pytest.raises(FileNotFoundError, match="input file not found"):
        list(iter_documents(tmp_path / "nope.jsonl"))


def test_preprocess_round_trip(tmp_path, tokenizer, tokenizer_model, capsys):
    docs = ["first document", NON_ASCII, "", "def f(x):\n    return x  # ok\n"]
    jsonl = write_jsonl(tmp_path / "docs.jsonl", docs)
    txt = tmp_path / "book.txt"
    txt.write_text("Chapter 1\n\nIt was a dark night.\n", encoding="utf-8")
    prefix = tmp_path / "out" / "corpus"
    status = preprocess_data.main(["--input", str(jsonl), str(txt), "--output-prefix", str(prefix),
                                   "--tokenizer-model", str(tokenizer_model)])
    assert status == 0
    assert "4 documents (1 empty skipped)" in capsys.readouterr().out

    assert IndexedDataset(str(prefix)).index.dtype == numpy.uint16
    sequences = read_sequences(prefix)
    expected = [d for d in docs if d] + [txt.read_text()]
    assert len(sequences) == len(expected)
    everything = [token for sequence in sequences for token in sequence]
    # The stream is the documents in order, each followed by EOD, and nothing else.
    pieces, current = [], []
    for token in everything:
        if token == tokenizer.eod:
            pieces.append(tokenizer.detokenize(current))
            current = []
        else:
            current.append(token)
    assert pieces == expected and current == []


def test_preprocess_trains_tokenizer_and_no_eod(tmp_path):
    jsonl = write_jsonl(tmp_path / "docs.jsonl", [p.read_text() for p in SMALL_CORPUS])
    prefix = tmp_path / "trained"
    status = preprocess_data.main(["--input", str(jsonl), "--output-prefix", str(prefix),
                                   "--vocab-size", "400", "--no-append-eod", "--workers", "1"])
    assert status == 0
    tokenizer = load_tokenizer(f"{prefix}.model", 400)
    assert tokenizer.detokenize(read_sequences(prefix)[0]) == SMALL_CORPUS[0].read_text()


def test_preprocess_reports_bad_line_and_writes_nothing(tmp_path, tokenizer_model, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c"\n')
    prefix = tmp_path / "out"
    argv = ["--input", str(bad), "--output-prefix", str(prefix)]
    assert preprocess_data.main(argv + ["--tokenizer-model", str(tokenizer_model)]) == 1
    assert f"error: {bad}:3: invalid JSON" in capsys.readouterr().err
    assert preprocess_data.main(argv + ["--vocab-size", "300"]) == 1
    assert f"error: {bad}:3: invalid JSON" in capsys.readouterr().err
    assert preprocess_data.main(argv + ["--tokenizer-model", str(tmp_path / "x.model")]) == 1
    assert "tokenizer model not found" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]


# ------------------------------------------------------------------------------- GPT datasets


def sample_digest(dataset, count: int = 8) -> list[list[int]]:
    return [dataset[i]["tokens"][:16].tolist() for i in range(count)]


def test_gpt_datasets_samples_and_split(data_prefix, tokenizer, tmp_path):
    seq = 32
    train, valid, test = build_gpt_datasets(data_prefix, tokenizer, seq, "6,2,0", 200, 20, 0,
                                            seed=7, cache_dir=tmp_path)
    assert test is None
    assert len(train) >= 200 and len(valid) >= 20
    docs = len(SMALL_CORPUS)
    assert train.indices.tolist() == list(range(round(docs * 0.75)))
    assert valid.indices.tolist() == list(range(round(docs * 0.75), docs))
    sample = train[0]
    assert set(sample) == {"tokens", "labels", "loss_mask", "position_ids"}
    assert all(value.shape == (seq,) for value in sample.values())
    # tokens and labels are one window of seq + 1 tokens, shifted by one
    assert torch.equal(sample["tokens"][1:], sample["labels"][:-1])
    assert torch.equal(sample["position_ids"], torch.arange(seq))
    assert torch.all(sample["loss_mask"] == 1)
    # Same seed, fresh cache: same samples; another seed: another order.
    again, _, _ = build_gpt_datasets(data_prefix, tokenizer, seq, "6,2,0", 200, 20, 0,
                                     seed=7, cache_dir=tmp_path / "other")
    reseeded, _, _ = build_gpt_datasets(data_prefix, tokenizer, seq, "6,2,0", 200, 20, 0,
                                        seed=8, cache_dir=tmp_path)
    assert sample_digest(again) == sample_digest(train)
    assert sample_digest(reseeded) != sample_digest(train)


def test_gpt_datasets_attention_mask_on_cpu(data_prefix, tokenizer_model, tmp_path):
    train, valid, _ = build_gpt_datasets(data_prefix, tokenizer_model, 16, "969,30,1", 10, 0, 0,
                                         cache_dir=tmp_path, create_attention_mask=True)
    assert valid is None
    mask = train[3]["attention_mask"]
    assert mask.shape == (1, 16, 16) and mask.dtype == torch.bool and mask.device.type == "cpu"
    assert torch.equal(mask[0], torch.ones(16, 16).triu(1).bool())  # True = masked out


def test_gpt_datasets_errors(data_prefix, tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing .*nope\.bin.*preprocess_data --input"):
        build_gpt_datasets(tmp_path / "nope", tokenizer, 32, "1,0,0", 1, 0, 0)
    with pytest.raises(ValueError, match=r"valid set .* has 0 tokens, but 5 samples of 32 tokens "
                                         r"need 161"):
        build_gpt_datasets(data_prefix, tokenizer, 32, "1000,1,0", 5, 5, 0, cache_dir=tmp_path)
    total = sum(map(len, read_sequences(data_prefix)))
    with pytest.raises(ValueError, match=rf"train set .* has {total:,} tokens.*at most 2 epochs"):
        build_gpt_datasets(data_prefix, tokenizer, 100, "1,0,0", total // 40, 0, 0,
                           cache_dir=tmp_path, max_epochs=2)
    small = train_tokenizer([SMALL_CORPUS[0]], tmp_path / "small", 400)
    with pytest.raises(ValueError, match="outside the tokenizer's 400-token vocabulary"):
        build_gpt_datasets(data_prefix, small, 32, "1,0,0", 1, 0, 0, cache_dir=tmp_path)


def test_mock_datasets():
    vocab, train, valid = build_mock_datasets(100, 16, [20, 0, 0], seed=3)
    assert vocab == 101 and valid is None and len(train) >= 20
    sample = train[5]
    assert set(sample) == {"tokens", "labels", "loss_mask", "position_ids"}
    assert sample["tokens"].shape == (16,) and int(sample["tokens"].max()) <= 100
    assert torch.equal(sample["tokens"][1:], sample["labels"][:-1])


def test_gpt_index_cache_recovers_from_killed_build(data_prefix, tokenizer, tmp_path, capsys):
    args = (data_prefix, tokenizer, 32, "1,0,0", 50, 0, 0)
    reference = sample_digest(build_gpt_datasets(*args, cache_dir=tmp_path)[0])
    (cache,) = tmp_path.iterdir()
    # A build killed while writing: its files are not in the manifest, one is truncated.
    (cache / "COMPLETE").unlink()
    shuffle = next(cache.glob("*shuffle_index.npy"))
    shuffle.write_bytes(shuffle.read_bytes()[:20])
    capsys.readouterr()
    assert sample_digest(build_gpt_datasets(*args, cache_dir=tmp_path)[0]) == reference
    assert "left by an interrupted index build" in capsys.readouterr().out


def test_cache_locations(data_prefix, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("SWIFTMOE_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    assert default_data_dir(vocab_size=VOCAB).parent.parent == tmp_path
    monkeypatch.delenv("SWIFTMOE_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "megatron_swiftmoe"
    # Without a cache_dir the sample indices go next to the data.
    build_gpt_datasets(data_prefix, tokenizer, 32, "1,0,0", 1, 0, 0)
    (cache,) = (data_prefix.parent / "index_cache").iterdir()
    assert cache.name.startswith(data_prefix.name) and (cache / "COMPLETE").is_file()


def sampled_tokenizer_vocab(directory: Path) -> str:
    """Vocabulary trained on a sample of the lines, which must not depend on the process."""
    model = train_tokenizer(SMALL_CORPUS, directory / "sampled", 400, input_sentence_size=1000)
    return model.with_suffix(".vocab").read_text()


def _distributed_build(rank: int, world_size: int, prefix: str, model: str, cache: str):
    train, valid, _ = build_gpt_datasets(prefix, model, 32, "3,1,0", 40, 8, 0, cache_dir=cache)
    vocab = sampled_tokenizer_vocab(Path(cache) / f"rank{rank}")
    results = [None] * world_size
    dist.all_gather_object(results, (sample_digest(train), sample_digest(valid, 4), vocab))
    return results


def test_distributed_ranks_agree_with_each_other_and_this_process(
    data_prefix, tokenizer_model, tmp_path
):
    results = run_distributed(_distributed_build, 2, str(data_prefix), str(tokenizer_model),
                              str(tmp_path / "cache"), tmp_path=tmp_path)
    local_train, local_valid, _ = build_gpt_datasets(data_prefix, tokenizer_model, 32, "3,1,0",
                                                     40, 8, 0, cache_dir=tmp_path / "local")
    expected = (sample_digest(local_train), sample_digest(local_valid, 4),
                sampled_tokenizer_vocab(tmp_path))
    assert results == [expected, expected]


# -------------------------------------------------------------------------------- default data


def test_prepare_default_data_with_injected_corpus(tmp_path, capsys):
    prefix, model = prepare_default_data(tmp_path, VOCAB, corpus_files=SMALL_CORPUS)
    out = capsys.readouterr().out
    assert "building corpus" in out and "training a 512-token" in out
    assert model.is_file() and IndexedDataset.exists(str(prefix))
    first_document = read_sequences(prefix)[0][:-1]
    assert load_tokenizer(model, VOCAB).detokenize(first_document) == SMALL_CORPUS[0].read_text()
    summary = json.loads((prefix.parent / "DONE").read_text())
    assert summary["preprocess"]["documents"] == len(SMALL_CORPUS)
    # Built once: the second call only finds it.
    assert prepare_default_data(tmp_path, VOCAB, corpus_files=SMALL_CORPUS) == (prefix, model)
    assert capsys.readouterr().out == ""
    # A build killed before its DONE marker: finished steps are kept, temporaries removed.
    done, leftover = prefix.parent / "DONE", prefix.parent / "tokenizer.tmp99999.model"
    done.unlink()
    leftover.write_text("half a model")
    model_bytes = model.read_bytes()
    assert prepare_default_data(tmp_path, VOCAB, corpus_files=SMALL_CORPUS) == (prefix, model)
    out = capsys.readouterr().out
    assert "preparing default data" in out and "training" not in out and "tokenizing" not in out
    assert done.is_file() and not leftover.exists() and model.read_bytes() == model_bytes
    # Another file list or vocabulary gets its own folder.
    other, _ = prepare_default_data(tmp_path, 400, corpus_files=SMALL_CORPUS[:4])
    assert other.parent.parent != prefix.parent.parent


_CONCURRENT_CHILD = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from megatron_swiftmoe.training.data import prepare_default_data
    cache, files, go = sys.argv[1], json.loads(sys.argv[2]), Path(sys.argv[3])
    while not go.exists():
        time.sleep(0.01)
    prefix, model = prepare_default_data(cache, 512, corpus_files=[Path(f) for f in files])
    print("RESULT", json.dumps([str(prefix), str(model)]))
""")


def test_prepare_default_data_concurrent_processes_build_once(tmp_path, capsys):
    cache, go = tmp_path / "cache", tmp_path / "go"
    files = json.dumps([str(p) for p in SMALL_CORPUS])
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _CONCURRENT_CHILD, str(cache), files, str(go)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for _ in range(2)
    ]
    directory = default_data_dir(cache, VOCAB, SMALL_CORPUS)
    directory.mkdir(parents=True)
    # Hold the build lock until both children are blocked on it, so that they really race.
    with open(directory / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        go.touch()
        for child in children:
            first_lines = iter(child.stdout.readline, "")
            assert any("waiting for another process" in line for line in first_lines)
    outputs = [child.communicate(timeout=300) for child in children]
    assert [child.returncode for child in children] == [0, 0], [err for _, err in outputs]
    stdout = [out for out, _ in outputs]
    assert sum(out.count("preparing default data") for out in stdout) == 1
    assert sum(out.count("building corpus") for out in stdout) == 1
    results = {tuple(map(Path, json.loads(out.split("RESULT ")[1]))) for out in stdout}
    # This process finds the finished build, and so does everyone after it.
    assert results == {prepare_default_data(cache, VOCAB, corpus_files=SMALL_CORPUS)}
    assert capsys.readouterr().out == ""
    prefix, model = results.pop()
    assert model.is_file() and IndexedDataset.exists(str(prefix))
    assert not [p for p in cache.rglob("*") if ".tmp" in p.name]


def test_stdlib_source_files_selection():
    files = stdlib_source_files()
    names = {str(p.relative_to(STDLIB)) for p in files}
    assert files == sorted(files) and len(files) > 500
    assert {"os.py", "json/__init__.py", "email/mime/text.py"} <= names
    assert not any("site-packages" in n or "__pycache__" in n for n in names)
    assert not any(part in ("tokenizedata", "data") for n in names for part in Path(n).parts)


def test_default_corpus_is_the_stdlib(tmp_path):
    corpus = default_corpus(tmp_path)
    lines = corpus.read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(stdlib_source_files()) > 500
    assert corpus.stat().st_size > 10e6
    assert json.loads(lines[0]).keys() == {"text"}
    assert default_corpus(tmp_path) == corpus  # cached
