"""Training data: a SentencePiece tokenizer, tokenized indexed datasets, and GPT samples.

The pipeline is Megatron's own, end to end:

1. text documents (``.jsonl`` with a ``text`` key, or plain text files) are tokenized into a
   Megatron ``IndexedDataset`` (``PREFIX.bin`` + ``PREFIX.idx``, one sequence per document,
   EOD appended) by :func:`tokenize_to_indexed_dataset` (CLI: ``python -m
   megatron_swiftmoe.preprocess_data``);
2. :func:`build_gpt_datasets` wraps that in megatron-core's ``GPTDataset`` train/valid/test
   splits (``--split`` semantics of Megatron-LM), whose items are ``seq_length``-token samples.

With no data of its own a run can use :func:`prepare_default_data`: the source files of this
Python's standard library (tens of MB of real text on every machine, nothing downloaded) with a
BPE tokenizer trained on them, built once per cache directory and shared by concurrent ranks.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import random
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import sentencepiece
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.datasets.indexed_dataset import DType, IndexedDataset, IndexedDatasetBuilder
from megatron.core.datasets.utils import Split
from megatron.core.tokenizers import MegatronTokenizer, MegatronTokenizerBase
from megatron.core.tokenizers.text.text_tokenizer import TOKENIZER_MAPPING_LIBRARIES, MegatronTokenizerText

__all__ = [
    "CACHE_ENV",
    "DEFAULT_SPLIT",
    "PREPROCESS_COMMAND",
    "PreprocessStats",
    "SentencePieceTokenizer",
    "build_gpt_datasets",
    "build_mock_datasets",
    "default_cache_dir",
    "default_data_dir",
    "default_corpus",
    "iter_documents",
    "load_tokenizer",
    "prepare_default_data",
    "stdlib_source_files",
    "tokenize_to_indexed_dataset",
    "train_tokenizer",
    "write_corpus_jsonl",
]

CACHE_ENV = "SWIFTMOE_CACHE"
DEFAULT_SPLIT = "969,30,1"
PREPROCESS_COMMAND = "python -m megatron_swiftmoe.preprocess_data"

# Special ids every tokenizer trained here defines; pad must differ from eos/eod, or GPTDataset
# stops masking padding.
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
# 4 special pieces + 256 byte-fallback pieces are in every vocabulary trained here.
_RESERVED_PIECES = 4 + 256
# Lines the tokenizer trainer samples: enough for a good 8k BPE vocabulary, small enough to train
# in seconds on 2 cores (the default corpus has ~730k non-empty lines).
TRAIN_SENTENCES = 300_000
# Bump when anything that shapes the default data changes, so old caches are not reused.
_DEFAULT_DATA_VERSION = 1
# Text handed to the tokenizer in one batch: bounds memory, keeps all threads busy.
_BATCH_CHARS = 4 << 20

_T = TypeVar("_T")


def _log(message: str) -> None:
    print(f"[megatron_swiftmoe.data] {message}", flush=True)


# --------------------------------------------------------------------------------------------
# Files built once, safely, by whichever process gets there first
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path`` (local file systems; not across hosts)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _log(f"waiting for another process to finish building {what} ...")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _atomic_outputs(prefix: Path, suffixes: Sequence[str]) -> Iterator[Path]:
    """Yield a temporary prefix to write ``tmp + suffix`` files under; publish them on success.

    Files are moved into place with ``os.replace`` in the order of ``suffixes``, so the last
    suffix is the one whose presence means "complete". On error the temporary files are removed,
    so a failed or killed build never leaves a file under the final name.
    """
    tmp = prefix.with_name(f"{prefix.name}.tmp{os.getpid()}")
    try:
        yield tmp
        for suffix in suffixes:
            os.replace(f"{tmp}{suffix}", f"{prefix}{suffix}")
    finally:
        for suffix in suffixes:
            Path(f"{tmp}{suffix}").unlink(missing_ok=True)


def _remove_temporaries(directory: Path) -> None:
    """Delete temporary files of builds that were killed; call while holding the lock."""
    for leftover in directory.glob("*.tmp[0-9]*"):
        leftover.unlink(missing_ok=True)


def _is_rank_zero() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def _write_json_atomic(path: Path, payload: object) -> None:
    with _atomic_outputs(path, [""]) as tmp:
        tmp.write_text(json.dumps(payload, indent=2) + "\n")


def _file_mb(*paths: Path) -> float:
    return sum(path.stat().st_size for path in paths) / 1e6


# --------------------------------------------------------------------------------------------
# Documents
# --------------------------------------------------------------------------------------------


def iter_documents(path: Path | str, json_keys: Sequence[str] = ("text",)) -> Iterator[str]:
    """Yield the text documents of one input file.

    ``.jsonl`` / ``.json``: one JSON object per line; every key in ``json_keys`` gives one
    document (blank lines are skipped). Any other file (``.txt``, source code, ...) is one
    document, the whole file, so that its text, blank lines included, round-trips exactly.
    Files are read as UTF-8; undecodable bytes become U+FFFD.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: a JSON line is malformed or lacks a key; the message names file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input file not found: {path}")
    if path.suffix not in (".jsonl", ".json"):
        # Decoded from bytes: read_text() would translate "\r\n", changing the text.
        yield path.read_bytes().decode("utf-8", errors="replace")
        return
    with open(path, encoding="utf-8", errors="replace") as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{path}:{line_number}: invalid JSON: {err.msg} (column {err.colno}); "
                    "expected one JSON object per line"
                ) from None
            for key in json_keys:
                if not isinstance(record, dict) or not isinstance(record.get(key), str):
                    raise ValueError(
                        f"{path}:{line_number}: expected a JSON object with a string {key!r} "
                        f"field, got {line.strip()[:80]!r}"
                    )
                yield record[key]


def _documents(
    inputs: Sequence[Path | str] | Iterable[str], json_keys: Sequence[str]
) -> Iterator[str]:
    """Documents of ``inputs``: a list/tuple names files, any other iterable yields texts."""
    if isinstance(inputs, (list, tuple)):
        for path in inputs:
            yield from iter_documents(path, json_keys)
    else:
        yield from inputs


def stdlib_source_files(stdlib_dir: Path | str | None = None) -> list[Path]:
    """The ``*.py`` files of Python's standard library, sorted (the default corpus).

    Skips installed packages (``site-packages``/``dist-packages``), ``__pycache__`` and the
    data-fixture folders of the test suites (``test/tokenizedata``, ``lib2to3/tests/data``,
    ...), which hold deliberately malformed or oddly encoded files rather than real text.
    """
    root = Path(stdlib_dir or sysconfig.get_paths()["stdlib"])
    files: list[Path] = []
    for directory, subdirs, names in os.walk(root):
        parts = Path(directory).relative_to(root).parts
        in_test_suite = any(part in ("test", "tests") or part.endswith("_test") for part in parts)
        # Pruning in place keeps os.walk out of site-packages (hundreds of MB) entirely.
        subdirs[:] = sorted(
            name
            for name in subdirs
            if name not in ("site-packages", "dist-packages", "__pycache__")
            and not (in_test_suite and _is_fixture_dir(name))
        )
        files.extend(Path(directory, name) for name in sorted(names) if name.endswith(".py"))
    return sorted(files)


def _is_fixture_dir(name: str) -> bool:
    """``data``, ``tokenizedata``, ``zipdata01``, ...; not ``test_dataclasses``."""
    return name.rstrip("0123456789").endswith("data")


def write_corpus_jsonl(files: Sequence[Path], output: Path) -> tuple[int, int]:
    """Write ``{"text": <contents>}`` per file to ``output`` (atomically).

    Returns:
        (number of documents, size of the JSONL file in bytes).
    """
    with _atomic_outputs(output, [""]) as tmp:
        with open(tmp, "w", encoding="utf-8") as sink:
            for path in files:
                text = Path(path).read_bytes().decode("utf-8", errors="replace")
                sink.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return len(files), output.stat().st_size


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


class SentencePieceTokenizer(MegatronTokenizerText):
    """A SentencePiece model as a megatron-core tokenizer (what ``GPTDatasetConfig`` takes).

    Megatron's text tokenizer with its ``sentencepiece`` library backend does the encoding;
    this adds the ids a GPT pipeline needs: ``eod`` is the model's ``</s>`` (eos) piece and
    ``pad`` its ``<pad>`` piece.
    """

    def __init__(self, model_path: Path | str) -> None:
        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"tokenizer model not found: {path}. Train one with "
                f"`{PREPROCESS_COMMAND} --vocab-size V ...` or megatron_swiftmoe.training.data."
                "train_tokenizer(), or use prepare_default_data()."
            )
        super().__init__(str(path.resolve()), {"library": "sentencepiece", "chat_template": None})
        if self.processor.eos_id() < 0:
            raise ValueError(
                f"tokenizer model {path} defines no </s> (eos) piece, which the data pipeline "
                "appends as end-of-document; train it with eos_id set (train_tokenizer does)"
            )

    @property
    def processor(self) -> sentencepiece.SentencePieceProcessor:
        """The underlying ``SentencePieceProcessor``."""
        return self._tokenizer.tokenizer

    @property
    def eod(self) -> int:
        """End-of-document id: the model's ``</s>``."""
        return self.processor.eos_id()

    @property
    def pad(self) -> int:
        """Padding id: the model's ``<pad>`` (-1 if it defines none)."""
        return self.processor.pad_id()

    def tokenize_batch(self, texts: Sequence[str], num_threads: int = 2) -> list[list[int]]:
        """Encode many texts at once on ``num_threads`` native threads (no GIL)."""
        return self.processor.encode(list(texts), num_threads=num_threads)


def load_tokenizer(
    model_path: Path | str, vocab_size: int | None = None
) -> SentencePieceTokenizer:
    """Load a tokenizer model; if ``vocab_size`` is given, require the model to have exactly it."""
    tokenizer = SentencePieceTokenizer(model_path)
    if vocab_size is not None and tokenizer.vocab_size != vocab_size:
        raise ValueError(
            f"tokenizer {model_path} has a vocabulary of {tokenizer.vocab_size} tokens but "
            f"vocab_size={vocab_size} was requested; use vocab_size={tokenizer.vocab_size} or "
            f"train a matching tokenizer (`{PREPROCESS_COMMAND} --vocab-size {vocab_size} ...`)"
        )
    return tokenizer


def _reservoir_sample(items: Iterable[_T], size: int, rng: random.Random) -> list[_T]:
    """A uniform sample of ``size`` items (all if fewer) in one pass, holding only the sample."""
    sample: list[_T] = []
    for seen, item in enumerate(items):
        if seen < size:
            sample.append(item)
        else:
            slot = rng.randrange(seen + 1)
            if slot < size:
                sample[slot] = item
    return sample


def train_tokenizer(
    inputs: Sequence[Path | str] | Iterable[str],
    model_prefix: Path | str,
    vocab_size: int,
    *,
    json_keys: Sequence[str] = ("text",),
    input_sentence_size: int = TRAIN_SENTENCES,
    num_threads: int = 2,
    seed: int = 1234,
) -> Path:
    """Train a byte-fallback BPE SentencePiece model; return the path of ``PREFIX.model``.

    Args:
        inputs: a list/tuple of input files (read by :func:`iter_documents`), or any other
            iterable (e.g. a generator) of document texts.
        model_prefix: writes ``PREFIX.model`` and ``PREFIX.vocab`` (atomically).
        vocab_size: exact size of the vocabulary, special and byte pieces included.
        input_sentence_size: lines sampled for training; caps training time.
        seed: seeds that sample (SentencePiece's own sampling differs from run to run).

    The model is lossless: no normalization, whitespace kept as is, and every character outside
    the vocabulary falls back to its UTF-8 bytes, so ``detokenize(tokenize(text)) == text`` for
    any text. Training sees one line per sentence (newlines end up as the byte piece
    ``<0x0A>``), and whitespace-only pieces are allowed so indentation compresses well.
    """
    if vocab_size <= _RESERVED_PIECES:
        raise ValueError(
            f"vocab_size must exceed {_RESERVED_PIECES} (4 special + 256 byte-fallback pieces) "
            f"plus the characters of the text; got {vocab_size}"
        )
    model_prefix = Path(model_prefix)
    model_prefix.parent.mkdir(parents=True, exist_ok=True)

    lines = (
        line
        for document in _documents(inputs, json_keys)
        for line in document.split("\n")
        if line.strip()
    )
    sentences = _reservoir_sample(lines, input_sentence_size, random.Random(seed))
    with _atomic_outputs(model_prefix, [".vocab", ".model"]) as tmp:
        try:
            sentencepiece.SentencePieceTrainer.train(
                sentence_iterator=iter(sentences),
                model_prefix=str(tmp),
                model_type="bpe",
                vocab_size=vocab_size,
                byte_fallback=True,
                normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                add_dummy_prefix=False,
                allow_whitespace_only_pieces=True,
                input_sentence_size=0,  # sampled above
                shuffle_input_sentence=False,
                num_threads=num_threads,
                unk_id=UNK_ID,
                bos_id=BOS_ID,
                eos_id=EOS_ID,
                pad_id=PAD_ID,
                minloglevel=2,
            )
        except RuntimeError as err:
            raise ValueError(
                f"training a {vocab_size}-token tokenizer for {model_prefix} failed: {err}"
            ) from err
    return Path(f"{model_prefix}.model")


# --------------------------------------------------------------------------------------------
# Indexed dataset (.bin/.idx)
# --------------------------------------------------------------------------------------------


@dataclass
class PreprocessStats:
    """What :func:`tokenize_to_indexed_dataset` wrote."""

    documents: int
    tokens: int
    skipped_empty: int
    text_chars: int
    bin_mb: float
    seconds: float

    def summary(self) -> str:
        rate = self.text_chars / 1e6 / max(self.seconds, 1e-9)
        return (
            f"{self.documents} documents ({self.skipped_empty} empty skipped), "
            f"{self.tokens:,} tokens, {self.text_chars / 1e6:.1f} M chars in "
            f"{self.seconds:.1f} s ({rate:.1f} M chars/s), {self.bin_mb:.1f} MB .bin"
        )


def _batches(texts: Iterable[str], max_chars: int) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    for text in texts:
        batch.append(text)
        size += len(text)
        if size >= max_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def tokenize_to_indexed_dataset(
    inputs: Sequence[Path | str],
    output_prefix: Path | str,
    tokenizer: SentencePieceTokenizer,
    *,
    json_keys: Sequence[str] = ("text",),
    workers: int = 2,
    append_eod: bool = True,
    log_every_s: float = 5.0,
) -> PreprocessStats:
    """Tokenize documents into ``PREFIX.bin``/``PREFIX.idx`` with megatron's builder.

    One sequence per document (empty documents are skipped), ``tokenizer.eod`` appended to each
    when ``append_eod``; token dtype chosen from the vocabulary size (``DType.optimal_dtype``).
    Files are written under temporary names and moved into place at the end (``.idx`` last).
    """
    output_prefix = Path(output_prefix)
    output_prefix.parent.mkdir(parents=True, exist_ok=True)
    stats = PreprocessStats(0, 0, 0, 0, 0.0, 0.0)
    start = last_log = time.perf_counter()

    with _atomic_outputs(output_prefix, [".bin", ".idx"]) as tmp:
        builder = IndexedDatasetBuilder(
            f"{tmp}.bin", dtype=DType.optimal_dtype(tokenizer.vocab_size)
        )
        try:
            for batch in _batches(_documents(list(inputs), json_keys), _BATCH_CHARS):
                for text, ids in zip(batch, tokenizer.tokenize_batch(batch, workers)):
                    if not text:
                        stats.skipped_empty += 1
                        continue
                    if append_eod:
                        ids.append(tokenizer.eod)
                    builder.add_document(ids, [len(ids)])
                    stats.documents += 1
                    stats.tokens += len(ids)
                    stats.text_chars += len(text)
                now = time.perf_counter()
                if now - last_log >= log_every_s:
                    last_log = now
                    stats.seconds = now - start
                    stats.bin_mb = builder.data_file.tell() / 1e6
                    _log(f"  {stats.summary()}")
        finally:
            builder.data_file.close()
        if stats.documents == 0:
            raise ValueError(f"no non-empty documents in {[str(p) for p in inputs]}")
        builder.finalize(f"{tmp}.idx")
    stats.seconds = time.perf_counter() - start
    stats.bin_mb = _file_mb(Path(f"{output_prefix}.bin"))
    return stats


def _require_indexed_dataset(data_prefix: Path | str) -> str:
    """Check that ``PREFIX.bin``/``.idx`` exist; return the prefix as megatron wants it."""
    prefix = str(data_prefix)
    for suffix in (".bin", ".idx"):
        prefix = prefix.removesuffix(suffix)
    missing = [f"{prefix}{s}" for s in (".bin", ".idx") if not os.path.isfile(f"{prefix}{s}")]
    if missing:
        raise FileNotFoundError(
            f"no tokenized dataset at data prefix {prefix!r} (missing {', '.join(missing)}). "
            f"Create it with `{PREPROCESS_COMMAND} --input DOCS.jsonl --output-prefix {prefix} "
            "--tokenizer-model TOKENIZER.model` (or `--vocab-size V` to train a tokenizer on the "
            "input), or use megatron_swiftmoe.training.data.prepare_default_data() for the built-in corpus."
        )
    return prefix


# --------------------------------------------------------------------------------------------
# The default data: Python's standard library
# --------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$SWIFTMOE_CACHE`` if set, else ``~/.cache/megatron_swiftmoe``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "megatron_swiftmoe")


def _corpus_dir(cache_dir: Path | str | None, corpus_files: Sequence[Path] | None) -> Path:
    """Cache folder of one corpus: keyed by the Python version (stdlib) or the file list."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if corpus_files is None:
        name = "stdlib-py{}.{}.{}".format(*sys.version_info[:3])
    else:
        listing = "\n".join(str(Path(p).resolve()) for p in corpus_files)
        name = "custom-" + hashlib.sha256(listing.encode()).hexdigest()[:12]
    return root / f"{name}-v{_DEFAULT_DATA_VERSION}"


def default_corpus(
    cache_dir: Path | str | None = None, corpus_files: Sequence[Path] | None = None
) -> Path:
    """The corpus JSONL (``{"text": ...}`` per file), built once under ``cache_dir``.

    Args:
        cache_dir: cache root (default :func:`default_cache_dir`).
        corpus_files: the source files; default :func:`stdlib_source_files` (tests inject a
            small list here).
    """
    directory = _corpus_dir(cache_dir, corpus_files)
    corpus = directory / "corpus.jsonl"
    if corpus.is_file():
        return corpus
    with _exclusive_lock(directory / ".lock", str(corpus)):
        if not corpus.is_file():  # another process may have built it while we waited
            _remove_temporaries(directory)
            _build_corpus(corpus, corpus_files)
    return corpus


def _build_corpus(corpus: Path, corpus_files: Sequence[Path] | None) -> None:
    start = time.perf_counter()
    files = stdlib_source_files() if corpus_files is None else [Path(p) for p in corpus_files]
    _log(f"building corpus {corpus} from {len(files)} files ...")
    count, size = write_corpus_jsonl(files, corpus)
    seconds = time.perf_counter() - start
    _log(f"  corpus: {count} documents, {size / 1e6:.1f} MB in {seconds:.1f} s")


def default_data_dir(
    cache_dir: Path | str | None = None,
    vocab_size: int = 8192,
    corpus_files: Sequence[Path] | None = None,
) -> Path:
    """The folder :func:`prepare_default_data` builds in (and locks) for these settings."""
    return _corpus_dir(cache_dir, corpus_files) / f"vocab{vocab_size}"


def prepare_default_data(
    cache_dir: Path | str | None = None,
    vocab_size: int = 8192,
    *,
    corpus_files: Sequence[Path] | None = None,
    workers: int = 2,
) -> tuple[Path, Path]:
    """Build (once) the default corpus, a tokenizer for it and its tokenized dataset.

    Everything lives in ``<cache_dir>/<corpus key>/vocab<vocab_size>/``; the corpus key holds
    the Python version (or a hash of ``corpus_files``), so settings never share files. Safe to
    call from many processes at once: one builds under an exclusive file lock while the others
    wait, every file is written under a temporary name and renamed into place, and a ``DONE``
    marker written last tells a complete build from one that was killed half-way (whose finished
    steps are reused on the next call).

    Args:
        cache_dir: cache root (default ``$SWIFTMOE_CACHE`` or ``~/.cache/megatron_swiftmoe``).
        vocab_size: vocabulary size of the tokenizer trained on the corpus.
        corpus_files: corpus source files instead of Python's standard library.
        workers: tokenizer threads.

    Returns:
        (data prefix for :func:`build_gpt_datasets`, tokenizer ``.model`` path).
    """
    directory = default_data_dir(cache_dir, vocab_size, corpus_files)
    data_prefix = directory / "text_document"
    tokenizer_model = directory / "tokenizer.model"
    done = directory / "DONE"
    if not done.is_file():
        with _exclusive_lock(directory / ".lock", str(directory)):
            if not done.is_file():
                _build_default_data(directory, cache_dir, corpus_files, vocab_size, workers)
    return data_prefix, tokenizer_model


def _build_default_data(
    directory: Path,
    cache_dir: Path | str | None,
    corpus_files: Sequence[Path] | None,
    vocab_size: int,
    workers: int,
) -> None:
    """The steps of :func:`prepare_default_data`; the caller holds the lock of ``directory``.

    Each step is skipped if its output exists: outputs appear atomically, so they are complete.
    """
    data_prefix = directory / "text_document"
    tokenizer_prefix = directory / "tokenizer"
    start = time.perf_counter()
    _log(f"preparing default data in {directory}")
    _remove_temporaries(directory)
    corpus = default_corpus(cache_dir, corpus_files)

    model = Path(f"{tokenizer_prefix}.model")
    train_s = 0.0
    if not model.is_file():
        _log(f"training a {vocab_size}-token BPE tokenizer on {corpus.name} ...")
        t0 = time.perf_counter()
        train_tokenizer([corpus], tokenizer_prefix, vocab_size, num_threads=workers)
        train_s = time.perf_counter() - t0
        _log(f"  tokenizer: {model} in {train_s:.1f} s")
    tokenizer = load_tokenizer(model, vocab_size)

    stats = None
    if not IndexedDataset.exists(str(data_prefix)):
        _log(f"tokenizing {corpus.name} with {workers} threads ...")
        stats = tokenize_to_indexed_dataset([corpus], data_prefix, tokenizer, workers=workers)
        _log(f"  dataset: {stats.summary()}")
    summary = {
        "corpus": str(corpus),
        "corpus_mb": _file_mb(corpus),
        "tokenizer": str(model),
        "vocab_size": vocab_size,
        "tokenizer_train_s": train_s,
        "preprocess": asdict(stats) if stats else None,
        "total_s": time.perf_counter() - start,
    }
    _write_json_atomic(directory / "DONE", summary)
    _log(f"default data ready in {summary['total_s']:.1f} s: {data_prefix}")


# --------------------------------------------------------------------------------------------
# GPT datasets
# --------------------------------------------------------------------------------------------


def build_gpt_datasets(
    data_prefix: Path | str,
    tokenizer: MegatronTokenizerBase | Path | str,
    seq_length: int,
    split: str = DEFAULT_SPLIT,
    train_samples: int = 0,
    valid_samples: int = 0,
    test_samples: int = 0,
    seed: int = 1234,
    *,
    cache_dir: Path | str | None = None,
    max_epochs: int | None = None,
    create_attention_mask: bool = False,
) -> tuple[GPTDataset | None, GPTDataset | None, GPTDataset | None]:
    """Megatron-core ``GPTDataset`` train/valid/test splits of one tokenized dataset.

    Items are dicts of ``tokens``, ``labels`` (``tokens`` shifted by one; each sample reads
    ``seq_length + 1`` tokens), ``loss_mask`` and ``position_ids`` (plus a dense causal
    ``attention_mask`` if ``create_attention_mask``, which megatron's attention does not need:
    it masks causally by itself). Documents are split between the sets by ``split`` weights
    ("969,30,1" as in Megatron-LM); a set with 0 requested samples is not built (``None``).
    As in Megatron, a set holds at least the requested samples (whole passes over its
    documents, so usually more), in an order shuffled by ``seed``.

    The sample indices are cached in ``<cache_dir or PREFIX's folder/index_cache>/<name>-<hash
    of PREFIX.idx>/``, so re-preprocessed data never reuses stale indices. Call on every rank
    when ``torch.distributed`` is initialized (rank 0 builds, the others load); without it,
    concurrent processes build under a file lock, and files left by a killed build are removed.

    Args:
        tokenizer: a megatron tokenizer (``.eod``, ``.pad``) or a SentencePiece model path.
        max_epochs: if set, fail instead of repeating a set's data more than this many times.

    Raises:
        FileNotFoundError: ``PREFIX.bin``/``.idx`` missing (the message says how to make them).
        ValueError: a set has no tokens, needs more than ``max_epochs`` passes, or the data holds
            token ids outside the tokenizer's vocabulary.
    """
    prefix = _require_indexed_dataset(data_prefix)
    if not isinstance(tokenizer, MegatronTokenizerBase):
        tokenizer = load_tokenizer(tokenizer)
    sizes = [train_samples, valid_samples, test_samples]
    cache = _index_cache_dir(prefix, cache_dir)
    config = _gpt_config(
        tokenizer,
        seq_length,
        sizes,
        seed,
        blend=([prefix], None),
        split=split,
        path_to_cache=str(cache),
        create_attention_mask=create_attention_mask,
    )
    _check_dataset_fits(prefix, tokenizer, config, sizes, max_epochs)

    builder = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config)
    if not _is_rank_zero():
        # Rank 0 holds the lock while it builds; the builder's barriers keep us behind it.
        train, valid, test = builder.build()
    else:
        train, valid, test = _build_in_locked_cache(cache, builder.build)
    return train, valid, test


# The null tokenizer's library name: "null" up to megatron-core 0.17, "null-text" after.
_NULL_LIBRARY = next(name for name, cls in TOKENIZER_MAPPING_LIBRARIES.items() if cls == "NullTokenizer")


def build_mock_datasets(
    vocab_size: int, seq_length: int, samples: Sequence[int], seed: int = 1234
) -> tuple[int, GPTDataset | None, GPTDataset | None]:
    """Megatron's synthetic data (``--mock-data``): ``MockGPTDataset`` train/valid sets.

    Tokens come from megatron's ``NullTokenizer(vocab_size)``, whose EOD id is ``vocab_size``;
    nothing is read or written on disk.

    Args:
        samples: requested (train, valid, test) sample counts; test is not returned.

    Returns:
        (vocabulary size including EOD, i.e. ``vocab_size + 1``, train set, valid set).
    """
    tokenizer = MegatronTokenizer.from_pretrained(metadata_path={"library": _NULL_LIBRARY}, vocab_size=vocab_size)
    if tokenizer.eod != vocab_size:  # megatron-core >= 0.18 counts the EOD in vocab_size
        tokenizer = MegatronTokenizer.from_pretrained(metadata_path={"library": _NULL_LIBRARY}, vocab_size=vocab_size + 1)
    sizes = list(samples)
    config = _gpt_config(tokenizer, seq_length, sizes, seed, create_attention_mask=False)
    builder = BlendedMegatronDatasetBuilder(MockGPTDataset, sizes, lambda: True, config)
    train, valid, _ = builder.build()
    return tokenizer.vocab_size, train, valid


def _gpt_config(
    tokenizer: MegatronTokenizerBase, seq_length: int, sizes: list[int], seed: int, **fields
) -> GPTDatasetConfig:
    """A GPT dataset config without resets or EOD loss masking; sets of 0 samples left out."""
    if seq_length < 1:
        raise ValueError(f"seq_length must be >= 1, got {seq_length}")
    if len(sizes) != len(Split) or any(size < 0 for size in sizes):
        raise ValueError(f"expected (train, valid, test) sample counts >= 0, got {sizes}")
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        **fields,
    )
    # Megatron would still build (and loop forever on an empty) set asked for 0 samples; a None
    # bound makes the builder skip it, and every rank drops the same sets.
    for split in Split:
        if sizes[split.value] == 0:
            config.split_matrix[split.value] = None
    return config


def _index_cache_dir(prefix: str, cache_dir: Path | str | None) -> Path:
    idx_digest = hashlib.sha256(Path(f"{prefix}.idx").read_bytes()).hexdigest()[:16]
    root = Path(cache_dir) if cache_dir is not None else Path(prefix).parent / "index_cache"
    return root / f"{Path(prefix).name}-{idx_digest}"


def _check_dataset_fits(
    prefix: str,
    tokenizer: MegatronTokenizerBase,
    config: GPTDatasetConfig,
    sizes: list[int],
    max_epochs: int | None,
) -> None:
    """Fail early, identically on every rank, where megatron would hang or train on garbage."""
    dataset = IndexedDataset(prefix)
    lengths = dataset.sequence_lengths
    # Every id must index the embedding; a glance at the head of the data catches a dataset
    # tokenized with another (larger) vocabulary without reading all of a large file.
    head = dataset.bin_reader.read(dataset.index.dtype, min(int(lengths.sum()), 1 << 24), 0)
    if head.size and int(head.max()) >= tokenizer.vocab_size:
        raise ValueError(
            f"{prefix}.bin holds token id {int(head.max())}, outside the tokenizer's "
            f"{tokenizer.vocab_size}-token vocabulary: it was tokenized with another tokenizer"
        )
    for split_enum in Split:
        bounds = config.split_matrix[split_enum.value]
        if bounds is None:
            continue
        # The same document ranges BlendedMegatronDatasetBuilder gives each set.
        begin, end = (int(round(b * float(len(lengths)))) for b in bounds)
        available = int(lengths[begin:end].sum())
        needed = sizes[split_enum.value] * config.sequence_length + 1
        where = (
            f"the {split_enum.name} set of {prefix} (documents {begin}:{end} of {len(lengths)} "
            f"under split {config.split!r})"
        )
        if available == 0 or (max_epochs is not None and needed > available * max_epochs):
            raise ValueError(
                f"{where} has {available:,} tokens, but {sizes[split_enum.value]} samples of "
                f"{config.sequence_length} tokens need {needed:,}"
                + (f" (at most {max_epochs} epochs allowed)" if max_epochs is not None else "")
                + "; use more data, fewer samples or another split"
            )
        if needed > available and _is_rank_zero():
            _log(
                f"{where}: {needed:,} tokens needed, {available:,} there; its data is repeated "
                f"{-(-needed // available)} times"
            )


def _build_in_locked_cache(cache: Path, build: Callable[[], _T]) -> _T:
    """Run ``build`` (which reads/writes index files in ``cache``) under the cache's lock.

    Megatron writes its index files in place, so a killed build can leave truncated ones that
    look complete. The names present after each successful build are recorded in a manifest;
    anything else found under the lock is such a leftover and is deleted before building.
    """
    manifest = cache / "COMPLETE"
    own = {".lock", manifest.name}
    with _exclusive_lock(cache / ".lock", f"dataset indices in {cache}"):
        complete = set(manifest.read_text().split("\n")) if manifest.is_file() else set()
        for leftover in (p for p in cache.iterdir() if p.name not in complete | own):
            _log(f"removing {leftover}, left by an interrupted index build")
            leftover.unlink()
        result = build()
        names = sorted(p.name for p in cache.iterdir() if p.name not in own)
        if set(names) != complete:
            with _atomic_outputs(manifest, [""]) as tmp:
                tmp.write_text("\n".join(names))
    return result
