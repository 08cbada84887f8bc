"""Tokenize text into a Megatron indexed dataset (``PREFIX.bin`` + ``PREFIX.idx``).

Like Megatron-LM's ``tools/preprocess_data.py``::

    python -m megatron_swiftmoe.preprocess_data --input docs.jsonl more.txt \\
        --output-prefix data/my_corpus --vocab-size 8192

Inputs: ``.jsonl``/``.json`` files hold one JSON object per line, each ``--json-keys`` field
of which is a document; any other file (``.txt``, source code) is one document, the whole
file. Every document becomes one sequence, with the tokenizer's end-of-document id appended
(``--no-append-eod`` to leave it out). ``--vocab-size V`` first trains a V-token BPE
tokenizer on the inputs and saves it as ``PREFIX.model``; ``--tokenizer-model`` uses an
existing one. Outputs are written under temporary names and renamed when complete.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Sequence

# megatron-core warns on import about GPU libraries that tokenizing does not use.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

from megatron_swiftmoe.training.data import (  # noqa: E402
    load_tokenizer,
    tokenize_to_indexed_dataset,
    train_tokenizer,
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--input", nargs="+", required=True, type=Path, metavar="FILE",
        help=".jsonl (one JSON object per line) or text files",
    )
    parser.add_argument(
        "--output-prefix", required=True, type=Path, metavar="PREFIX",
        help="writes PREFIX.bin and PREFIX.idx",
    )
    tokenizer = parser.add_mutually_exclusive_group(required=True)
    tokenizer.add_argument(
        "--tokenizer-model", type=Path, metavar="M.model", help="an existing SentencePiece model"
    )
    tokenizer.add_argument(
        "--vocab-size", type=int, metavar="V",
        help="train a V-token BPE tokenizer on the input (saved as PREFIX.model)",
    )
    parser.add_argument(
        "--json-keys", nargs="+", default=["text"], metavar="KEY",
        help="fields of each JSON line to tokenize, each one a document (default: text)",
    )
    parser.add_argument("--workers", type=int, default=2, help="tokenizer threads (default: 2)")
    parser.add_argument(
        "--append-eod", action=argparse.BooleanOptionalAction, default=True,
        help="append the end-of-document id to every document (default: yes)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit status (errors in the input are reported, status 1)."""
    args = parse_args(argv)
    try:
        if args.vocab_size is not None:
            start = time.perf_counter()
            print(f"training a {args.vocab_size}-token tokenizer on {len(args.input)} file(s) ...")
            model = train_tokenizer(
                list(args.input), args.output_prefix, args.vocab_size,
                json_keys=args.json_keys, num_threads=args.workers,
            )
            print(f"tokenizer: {model} ({time.perf_counter() - start:.1f} s)")
        else:
            model = args.tokenizer_model
        tokenizer = load_tokenizer(model)
        print(
            f"tokenizing {len(args.input)} file(s) into {args.output_prefix}.bin/.idx "
            f"with {args.workers} threads ..."
        )
        stats = tokenize_to_indexed_dataset(
            args.input,
            args.output_prefix,
            tokenizer,
            json_keys=args.json_keys,
            workers=args.workers,
            append_eod=args.append_eod,
        )
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"done: {stats.summary()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
