"""Command line of ``python -m megatron_swiftmoe.pretrain_gpt``: Megatron-LM's flags plus SwiftMoE's.

Flag names, types, defaults and meanings follow Megatron-LM's ``megatron/training/arguments.py``
(a subset of it: pipeline parallelism, TP = CP = 1, the data-parallel group of a pipeline
stage is world size / pipeline-model-parallel-size ranks), with the SwiftMoE flags on top.
The few deliberate differences from Megatron-LM are listed in
:data:`DIFFERENCES_FROM_MEGATRON` (and printed by ``--help``).

Public API:

* :func:`build_parser` -- the ``argparse`` parser (argument groups as in Megatron-LM).
* :func:`parse_args` -- parse (``--config FILE.yaml`` first, command line on top), fill the
  derived defaults (:func:`fill_derived_args`) and validate (:func:`validate_args`). Any error
  is reported the argparse way: ``usage`` + ``error: <message naming the flag>`` on stderr and
  ``SystemExit(2)``, before any process group exists.
* :func:`validate_args` -- raises :class:`ArgumentsError` (a ``ValueError``) naming the flag(s)
  and the fix; :func:`parse_args` turns it into ``parser.error``.
* :func:`transformer_config_from_args`, :func:`swiftmoe_config_from_args`,
  :func:`gpt_model_kwargs`, :func:`padded_vocab_size`, :func:`print_args`.

Attribute names are the flag names with ``-`` replaced by ``_`` (``--num-layers`` ->
``args.num_layers``), except ``--disable-bias-linear``/``--add-bias-linear`` (both set
``args.add_bias_linear``). Every on/off flag that Megatron-LM spells positively
(``--swiftmoe``, ``--bf16``, ``--swiglu``, ``--mock-data``, ...) also has a ``--no-`` form, so
that the command line can turn off what a ``--config`` file turns on.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import math
import os
import re
import sys
import time
from typing import Any, Optional

from megatron_swiftmoe.core.config import add_swiftmoe_arguments, swiftmoe_config_from_args

#: Vocabulary size of the SentencePiece tokenizer trained on the built-in default corpus, and
#: the default vocabulary of ``--mock-data`` (NullTokenizer).
DEFAULT_VOCAB_SIZE = 8192

DIFFERENCES_FROM_MEGATRON = """\
Defaults that differ from Megatron-LM:
  * linear layers are bias-free by default (Megatron-LM: bias on; --disable-bias-linear turns
    it off). SwiftMoE's expert slots have no bias, and neither do Megatron's grouped-GEMM
    experts; the static baseline uses the same bias-free model so that both train the same
    network. --disable-bias-linear is accepted (no-op); --add-bias-linear restores Megatron's
    default (static baseline only).
  * --moe-token-dispatcher-type defaults to alltoall on CUDA and allgather on CPU (Megatron-LM:
    allgather). Megatron's alltoall dispatcher needs CUDA streams.
  * --tokenizer-type defaults to SentencePieceTokenizer (NullTokenizer with --mock-data);
    Megatron-LM has no default. Without --data-path/--mock-data a built-in corpus is used.
  * --split defaults to 969,30,1 (Megatron-LM's legacy default, which it still applies when
    --data-path is given without --split).
  * --num-experts is required: this program trains MoE models only.
  * on/off flags (--swiftmoe, --bf16, --swiglu, --mock-data, ...) also have a --no- form, to
    turn off on the command line what a --config file turns on.
  * --moe-token-drop-policy has no default of its own: it is probs when
    --moe-expert-capacity-factor is set and an error without it.
"""


class ArgumentsError(ValueError):
    """Invalid settings; the message names the flag(s) and how to fix them."""


# --------------------------------------------------------------------------------------------
# Argument types
# --------------------------------------------------------------------------------------------

_MAX_PATTERN_CHARS = 10_000
_MAX_PATTERN_LEN = 100_000


def _eval_layer_pattern(text: str) -> Any:
    """Evaluate a list expression made only of int literals, list literals, ``+``, ``*``, ``()``.

    Nothing is ever passed to ``eval``: the expression is parsed with :mod:`ast` and walked;
    any other syntax (names, calls, attributes, strings, ...) is rejected.
    """
    if len(text) > _MAX_PATTERN_CHARS:
        raise ValueError(f"pattern longer than {_MAX_PATTERN_CHARS} characters")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        raise ValueError(f"not a list expression ({type(exc).__name__})") from None

    def ev(node: ast.AST) -> Any:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.List):
            items = [ev(e) for e in node.elts]
            if any(type(i) is not int for i in items):
                raise ValueError("list elements must be integers")
            return items
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Add):
                if type(left) is not type(right):
                    raise ValueError("'+' needs two lists or two integers")
                if isinstance(left, list) and len(left) + len(right) > _MAX_PATTERN_LEN:
                    raise ValueError(f"pattern longer than {_MAX_PATTERN_LEN} layers")
                return left + right
            if isinstance(left, int) and isinstance(right, int):
                if abs(left) > _MAX_PATTERN_LEN or abs(right) > _MAX_PATTERN_LEN:
                    raise ValueError(f"integer larger than {_MAX_PATTERN_LEN}")
                return left * right
            seq, count = (left, right) if isinstance(left, list) else (right, left)
            if not isinstance(count, int):
                raise ValueError("'*' needs a list and an integer")
            if count < 0 or len(seq) * count > _MAX_PATTERN_LEN:
                raise ValueError(f"repeat count must be in [0, {_MAX_PATTERN_LEN} / list length]")
            return seq * count
        raise ValueError(
            f"{type(node).__name__} is not allowed (only integer and list literals, '+', '*' "
            "and parentheses)"
        )

    try:
        return ev(tree.body)
    except RecursionError:
        raise ValueError("expression nested too deeply") from None


def moe_layer_freq_type(value: Any) -> int | list[int]:
    """``--moe-layer-freq``: an int N >= 1 (every N-th layer, starting with the first, is MoE)
    or a list expression of 0/1 per layer such as ``"([0]+[1]*23)"`` (1 = MoE layer).

    Parsed safely (see :func:`_eval_layer_pattern`); the length is checked against
    ``--num-layers`` later, in :func:`validate_args`.
    """
    if isinstance(value, bool):
        raise argparse.ArgumentTypeError(f"expected an integer or a list expression, got {value!r}")
    if isinstance(value, int):
        result: Any = value
    elif isinstance(value, list):
        result = value
    else:
        text = str(value).strip()
        if re.fullmatch(r"[+-]?\d+", text):
            result = int(text)
        else:
            try:
                result = _eval_layer_pattern(text)
            except ValueError as exc:
                raise argparse.ArgumentTypeError(
                    f"invalid MoE layer pattern {text!r}: {exc}; give an integer N or a list "
                    "expression of 0/1 such as \"([0]+[1]*23)\""
                ) from None
    if isinstance(result, int):
        if result < 1:
            raise argparse.ArgumentTypeError(f"the MoE layer frequency must be >= 1, got {result}")
        return result
    if not isinstance(result, list) or any(type(v) is not int or v not in (0, 1) for v in result):
        raise argparse.ArgumentTypeError(
            f"the MoE layer pattern must be a list of 0 (dense) and 1 (MoE) per layer, got {result!r}"
        )
    return result


moe_layer_freq_type.description = (  # type: ignore[attr-defined]
    "an integer >= 1 or a list expression of 0/1 such as \"([0]+[1]*23)\""
)


def _type_description(action: argparse.Action) -> str:
    if _is_bool_action(action):
        return "true or false"
    if action.choices:
        return "one of " + ", ".join(map(str, action.choices))
    kind = getattr(action.type, "description", None) or {
        int: "an integer",
        float: "a number",
        str: "a string",
        None: "a string",
    }.get(action.type, getattr(action.type, "__name__", "a value"))
    if action.nargs in ("*", "+"):
        kind = f"{kind} or a list of them"
    return kind


def _is_bool_action(action: argparse.Action) -> bool:
    return isinstance(
        action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)
    )


# --------------------------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------------------------


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends ``(default: X)`` where a default is worth showing (not None/False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        if _is_bool_action(action) or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


#: Megatron-LM features this program does not re-implement: with --swiftmoe they run in
#: Megatron-LM's own pretrain_gpt.py (README, "Use with Megatron-LM").
MEGATRON_LM_ONLY = (
    "--context-parallel-size", "--expert-tensor-parallel-size", "--sequence-parallel",
    "--num-layers-per-virtual-pipeline-stage", "--num-virtual-stages-per-pipeline-rank",
    "--mtp-num-layers", "--moe-shared-expert-intermediate-size", "--moe-shared-expert-overlap",
    "--recompute-granularity", "--recompute-modules", "--recompute-method", "--recompute-num-layers",
    "--moe-layer-recompute",
)
MEGATRON_LM_POINTER = ("this program does not implement it; Megatron-LM's own pretrain_gpt.py runs it with "
                       "--swiftmoe (README, 'Use with Megatron-LM')")


class _Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` that suggests the closest flag for an unknown one, and points
    Megatron-LM features this program leaves to Megatron-LM there."""

    def error(self, message: str):
        if message.startswith("unrecognized arguments:"):
            known = [opt for action in self._actions for opt in action.option_strings]
            hints, elsewhere = [], []
            for word in message.split(":", 1)[1].split():
                flag = word.split("=", 1)[0]
                if flag in MEGATRON_LM_ONLY:
                    elsewhere.append(flag)
                elif flag.startswith("--"):
                    close = difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
                    if close:
                        hints.append(f"{flag} -> {close[0]}")
            if hints:
                message += " (did you mean: " + ", ".join(hints) + "?)"
            if elsewhere:
                message += f"; {', '.join(elsewhere)}: {MEGATRON_LM_POINTER}"
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    """The parser with every flag of the program (no validation, no derived defaults)."""
    parser = _Parser(
        prog="megatron_swiftmoe.pretrain_gpt",
        usage="torchrun [...] -m %(prog)s [--config FILE.yaml] [--FLAG VALUE ...]",
        description="Pretrain a Megatron-Core GPT-MoE model with SwiftMoE per-iteration expert "
        "replication (--swiftmoe) or Megatron's static expert parallelism (the baseline). "
        "Flags follow Megatron-LM's names and meanings.",
        epilog=DIFFERENCES_FROM_MEGATRON,
        formatter_class=_HelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument(
        "--config", metavar="FILE.yaml", default=None,
        help="YAML file with the same settings: keys are flag names without the leading dashes "
        "(num-layers or num_layers), booleans true/false, null = keep the default. Flags on the "
        "command line override the file. See configs/.",
    )

    g = parser.add_argument_group("network size")
    g.add_argument("--num-layers", type=int, default=None, help="Number of transformer layers. Required.")
    g.add_argument("--hidden-size", type=int, default=None, help="Transformer hidden size. Required.")
    g.add_argument(
        "--ffn-hidden-size", type=int, default=None,
        help="Transformer feed-forward hidden size. Default: 4 * hidden-size, or with --swiglu "
        "int(4 * hidden-size * 2/3 / 64) * 64 (Megatron-LM's rule).",
    )
    g.add_argument("--num-attention-heads", type=int, default=None, help="Number of attention heads. Required.")
    g.add_argument("--seq-length", type=int, default=None, help="Sequence length (tokens per sample). Required.")
    g.add_argument(
        "--max-position-embeddings", type=int, default=None,
        help="Maximum number of position embeddings (must be >= seq-length). Default: seq-length.",
    )
    g.add_argument(
        "--position-embedding-type", choices=["learned_absolute", "rope"], default="learned_absolute",
        help="Position embedding type.",
    )
    g.add_argument("--rotary-percent", type=float, default=1.0, help="Fraction of the head dimension rotated with rope.")
    g.add_argument("--rotary-base", type=int, default=10000, help="Base period of rope.")
    g.add_argument(
        "--normalization", choices=["LayerNorm", "RMSNorm"], default="LayerNorm",
        help="Which normalization to use.",
    )
    g.add_argument("--swiglu", action=argparse.BooleanOptionalAction, default=False,
                   help="Use the gated SwiGLU activation (silu) instead of gelu.")
    g.add_argument(
        "--untie-embeddings-and-output-weights", action=argparse.BooleanOptionalAction, default=False,
        help="Untie the input embedding and the output layer weights.",
    )
    g.add_argument(
        "--make-vocab-size-divisible-by", type=int, default=128,
        help="Pad the vocabulary to a multiple of this, for efficiency.",
    )
    g.add_argument(
        "--disable-bias-linear", action="store_false", dest="add_bias_linear", default=False,
        help="Disable the bias of linear layers. Accepted for Megatron-LM compatibility: this is "
        "already this program's default (SwiftMoE's experts are bias-free).",
    )
    g.add_argument(
        "--add-bias-linear", action="store_true", dest="add_bias_linear",
        help="Give linear layers a bias (Megatron-LM's default). Static baseline only: SwiftMoE "
        "supports bias-free experts only. Default: no bias.",
    )

    g = parser.add_argument_group("regularization and optimizer")
    g.add_argument("--init-method-std", type=float, default=0.02,
                   help="Standard deviation of the zero-mean normal weight initialization.")
    g.add_argument("--hidden-dropout", type=float, default=0.1, help="Dropout probability for the hidden state.")
    g.add_argument("--attention-dropout", type=float, default=0.1, help="Dropout probability of the attention weights.")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay coefficient.")
    g.add_argument("--clip-grad", type=float, default=1.0, help="Gradient clipping by global L2 norm (0 disables).")
    g.add_argument("--adam-beta1", type=float, default=0.9, help="First coefficient of AdamW's running averages.")
    g.add_argument("--adam-beta2", type=float, default=0.999, help="Second coefficient of AdamW's running averages.")
    g.add_argument("--adam-eps", type=float, default=1e-8, help="Term added to AdamW's denominator.")

    g = parser.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=None,
                   help="Samples per micro-batch per rank. Required.")
    g.add_argument(
        "--global-batch-size", type=int, default=None,
        help="Samples per iteration over all ranks; a multiple of micro-batch-size * "
        "data-parallel size (world size / pipeline-model-parallel-size), the quotient being the "
        "number of micro-batches accumulated per iteration. Default: micro-batch-size * "
        "data-parallel size.",
    )
    g.add_argument("--train-iters", type=int, default=None, help="Number of training iterations. Required.")
    g.add_argument("--seed", type=int, default=1234, help="Random seed (Python, numpy, torch).")
    g.add_argument("--eval-interval", type=int, default=1000, help="Iterations between evaluations on the validation set.")
    g.add_argument("--eval-iters", type=int, default=100,
                   help="Validation iterations per evaluation (0 disables evaluation).")
    g.add_argument("--log-interval", type=int, default=100, help="Iterations between log lines.")
    g.add_argument("--exit-interval", type=int, default=None,
                   help="Exit the program after the iteration that is divisible by this value.")

    g = parser.add_argument_group("learning rate")
    g.add_argument("--lr", type=float, default=None, help="Peak learning rate (after warmup). Required.")
    g.add_argument("--min-lr", type=float, default=0.0, help="Minimum learning rate the schedule decays to.")
    g.add_argument(
        "--lr-decay-style", choices=["constant", "linear", "cosine", "inverse-square-root", "WSD"],
        default="linear", help="Learning rate decay function.",
    )
    g.add_argument("--lr-decay-iters", type=int, default=None,
                   help="Iterations to decay the learning rate over. Default: train-iters.")
    g.add_argument("--lr-warmup-iters", type=int, default=0, help="Iterations of linear learning-rate warmup.")
    g.add_argument(
        "--lr-warmup-fraction", type=float, default=None,
        help="Warmup as a fraction of lr-decay-iters (instead of --lr-warmup-iters).",
    )
    g.add_argument(
        "--lr-wsd-decay-style", choices=["exponential", "linear", "cosine", "minus_sqrt"],
        default="exponential", help="Decay style of the annealing phase of the WSD schedule.",
    )
    g.add_argument("--lr-wsd-decay-iters", type=int, default=None,
                   help="Iterations of the annealing phase of the WSD schedule (required with WSD).")

    g = parser.add_argument_group("mixed precision")
    g.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=False,
                   help="Run the model in bfloat16 (fp32 master weights).")
    g.add_argument("--fp16", action=argparse.BooleanOptionalAction, default=False,
                   help="Run the model in float16 with dynamic loss scaling (fp32 master weights).")
    g.add_argument("--initial-loss-scale", type=float, default=2.0**32, help="Initial dynamic loss scale (fp16).")
    g.add_argument("--loss-scale-window", type=int, default=1000,
                   help="Clean iterations before the dynamic loss scale is doubled (fp16).")
    g.add_argument("--min-loss-scale", type=float, default=1.0, help="Minimum dynamic loss scale (fp16).")

    g = parser.add_argument_group("moe")
    g.add_argument("--num-experts", type=int, default=None, help="Number of experts per MoE layer. Required.")
    g.add_argument("--moe-ffn-hidden-size", type=int, default=None,
                   help="Feed-forward hidden size of each expert. Default: ffn-hidden-size.")
    g.add_argument("--moe-router-topk", type=int, default=2, help="Number of experts each token is routed to.")
    g.add_argument("--moe-router-score-function", choices=["softmax", "sigmoid"], default="softmax",
                   help="Score function of the top-k router.")
    g.add_argument(
        "--moe-router-pre-softmax", action=argparse.BooleanOptionalAction, default=False,
        help="Softmax before the top-k selection (default: after). Required with top-1 and softmax.",
    )
    g.add_argument("--moe-aux-loss-coeff", type=float, default=0.0,
                   help="Scaling coefficient of the load-balancing aux loss (1e-2 is a common start).")
    g.add_argument("--moe-z-loss-coeff", type=float, default=None,
                   help="Scaling coefficient of the router z-loss (1e-3 is a common start); none by default.")
    g.add_argument(
        "--moe-router-load-balancing-type",
        choices=["aux_loss", "seq_aux_loss", "global_aux_loss", "sinkhorn", "none"], default="aux_loss",
        help="Load-balancing strategy of the router: aux_loss (GShard/Switch), seq_aux_loss "
        "(per sample, DeepSeek-V2), global_aux_loss, sinkhorn (S-BASE) or none.",
    )
    g.add_argument(
        "--moe-expert-capacity-factor", type=float, default=None,
        help="Capacity factor of each expert; tokens over capacity are dropped. Default: dropless. "
        "With --swiftmoe each replica slot gets cf * topk * tokens / (ranks * slots), so an "
        "expert's capacity grows with its replicas.",
    )
    g.add_argument(
        "--moe-token-drop-policy", choices=["probs", "position"], default=None,
        help="Which tokens are dropped over capacity: the lowest-probability ones (probs) or the "
        "last ones in the batch (position). Needs --moe-expert-capacity-factor; default probs.",
    )
    g.add_argument(
        "--moe-pad-expert-input-to-capacity", action=argparse.BooleanOptionalAction, default=False,
        help="Pad each expert's input to its capacity. Needs --moe-expert-capacity-factor.",
    )
    g.add_argument(
        "--moe-router-enable-expert-bias", action=argparse.BooleanOptionalAction, default=False,
        help="Aux-loss-free load balancing: a per-expert bias added to the routing scores, updated "
        "from each expert's token count (arXiv 2408.15664). Needs --moe-router-score-function sigmoid.",
    )
    g.add_argument("--moe-router-bias-update-rate", type=float, default=1e-3,
                   help="Update rate of the expert bias (DeepSeek-V3's value by default).")
    g.add_argument(
        "--moe-layer-freq", type=moe_layer_freq_type, default=1,
        help="Which layers are MoE: an integer N makes every N-th layer (starting with the first) "
        "an MoE layer and the others dense; or a Python list expression of 0 (dense) and 1 (MoE) "
        "per layer, e.g. \"([0]+[1]*23)\" (only integer/list literals, + , * and parentheses). "
        "Its length must equal num-layers.",
    )
    g.add_argument(
        "--moe-token-dispatcher-type", choices=["allgather", "alltoall"], default=None,
        help="Megatron token dispatcher of the static baseline (ignored with --swiftmoe, which "
        "has its own). Default: alltoall on CUDA, allgather on CPU (Megatron's alltoall "
        "dispatcher needs CUDA streams).",
    )

    g = parser.add_argument_group("data")
    g.add_argument(
        "--data-path", nargs="*", default=None,
        help="Megatron indexed dataset prefix (PREFIX.bin/.idx from preprocess_data); blends of "
        "several prefixes are not supported yet. Default: the built-in text corpus.",
    )
    g.add_argument("--mock-data", action=argparse.BooleanOptionalAction, default=False,
                   help="Train on synthetic token ids instead of real data (NullTokenizer).")
    g.add_argument("--split", default="969,30,1",
                   help="Train,validation,test proportions of the data, comma-separated.")
    g.add_argument(
        "--tokenizer-type", choices=["SentencePieceTokenizer", "NullTokenizer"], default=None,
        help="Tokenizer. Default: NullTokenizer with --mock-data, else SentencePieceTokenizer.",
    )
    g.add_argument(
        "--tokenizer-model", default=None,
        help="SentencePiece model file. Required with --data-path and SentencePieceTokenizer; "
        "without --data-path a model trained on the built-in corpus is used.",
    )
    g.add_argument(
        "--vocab-size", type=int, default=None,
        help="Vocabulary size. NullTokenizer: required with --data-path (every token id must be "
        f"below it), {DEFAULT_VOCAB_SIZE} with --mock-data. Built-in corpus: the size of the "
        f"SentencePiece model trained on it, default {DEFAULT_VOCAB_SIZE}. Ignored with "
        "--tokenizer-model (read from the model).",
    )
    g.add_argument("--data-cache-path", default=None,
                   help="Directory for dataset index caches and the built-in corpus's tokenizer.")
    g.add_argument("--num-workers", type=int, default=2, help="Data loader worker processes.")

    g = parser.add_argument_group("checkpointing")
    g.add_argument("--save", default=None, help="Directory to save checkpoints to.")
    g.add_argument("--load", default=None, help="Directory containing a checkpoint to resume from.")
    g.add_argument("--save-interval", type=int, default=None,
                   help="Iterations between checkpoint saves (needs --save).")
    g.add_argument("--no-load-optim", action="store_true",
                   help="Do not load the optimizer state when loading a checkpoint.")
    g.add_argument("--no-load-rng", action="store_true",
                   help="Do not load the RNG state when loading a checkpoint.")
    g.add_argument(
        "--finetune", action=argparse.BooleanOptionalAction, default=False,
        help="Load the model weights from --load only: no optimizer or RNG state, and the "
        "iteration count restarts at 0.",
    )
    g.add_argument(
        "--load-fallback", action="store_true",
        help="When the newest checkpoint under --load fails verification (a missing, truncated or "
        "corrupt rank file), resume from the newest older complete checkpoint that verifies, the "
        "same iteration on every rank. Without it such a checkpoint stops the run with an error.",
    )

    g = parser.add_argument_group("distributed")
    g.add_argument(
        "--pipeline-model-parallel-size", type=int, default=1,
        help="Pipeline stages: the layers are split evenly over this many stages (it must divide "
        "the world size and --num-layers), Megatron's 1F1B schedule runs the micro-batches through "
        "them, and the world size / this many ranks of each stage are its data-parallel group "
        "(SwiftMoE replicates, and the baseline partitions, each stage's experts over it).",
    )
    g.add_argument(
        "--tensor-model-parallel-size", type=int, default=1,
        help="Tensor parallelism: only 1 is supported (accepted for Megatron-LM configs).",
    )
    g.add_argument(
        "--overlap-grad-reduce", action=argparse.BooleanOptionalAction, default=False,
        help="Overlap SwiftMoE's expert gradient reduction with backward: each MoE layer's slot "
        "gradients start towards their shard owners as soon as the step's last backward has "
        "produced them (Megatron-LM's flag; this program's dense ZeRO-1 traffic stays synchronous).",
    )
    g.add_argument(
        "--overlap-param-gather", action=argparse.BooleanOptionalAction, default=False,
        help="Overlap SwiftMoE's re-placement with the next forward: the updated expert shards "
        "travel to the next placement while the layers before each MoE layer compute (Megatron-LM's "
        "flag; this program's dense ZeRO-1 traffic stays synchronous).",
    )
    g.add_argument(
        "--distributed-timeout-minutes", type=float, default=10,
        help="Timeout of collective operations: a rank waiting this long for a rank that stopped "
        "answering exits with an error instead of waiting forever. Fractions are accepted.",
    )

    g = parser.add_argument_group("logging")
    g.add_argument("--tensorboard-dir", default=None, help="Write TensorBoard logs to this directory.")
    g.add_argument("--wandb-project", default=None, help="Log to this Weights & Biases project.")
    g.add_argument("--wandb-exp-name", default=None, help="Weights & Biases run name (needs --wandb-project).")
    g.add_argument("--wandb-save-dir", default=None,
                   help="Local directory of the Weights & Biases files (needs --wandb-project).")
    g.add_argument(
        "--metrics-path", default=None,
        help="JSON-lines file of metrics, one line per iteration (written and flushed every iteration, by "
        "rank 0; --log-interval only paces the log lines). Default: "
        "<save>/metrics.jsonl with --save, else runs/<YYYYmmdd-HHMMSS>/metrics.jsonl.",
    )
    g.add_argument("--no-progress", action="store_true", help="Disable the progress bar.")
    g.add_argument(
        "--log-load-interval", type=int, default=None,
        help="Iterations between the per-layer expert-load log lines. Default: log-interval.",
    )

    add_swiftmoe_arguments(parser)
    return parser


# --------------------------------------------------------------------------------------------
# YAML config
# --------------------------------------------------------------------------------------------


def _yaml_options(parser: argparse.ArgumentParser) -> dict[str, tuple[argparse.Action, bool]]:
    """``key -> (action, inverted)`` for every long flag (``inverted``: the ``--no-X`` form)."""
    options = {}
    for action in parser._actions:
        if action.dest in ("help", "config"):
            continue
        for opt in action.option_strings:
            if not opt.startswith("--"):
                continue
            inverted = isinstance(action, argparse.BooleanOptionalAction) and opt.startswith("--no-")
            options[opt[2:]] = (action, inverted)
    return options


def _convert_value(action: argparse.Action, inverted: bool, key: str, value: Any, where: str) -> Any:
    """A YAML value converted by the action's own type and choices (as argparse would)."""

    def bad(got: Any) -> ArgumentsError:
        return ArgumentsError(
            f"{where}: key '{key}' expects {_type_description(action)} "
            f"(like --{key} on the command line), got {got!r}"
        )

    if _is_bool_action(action):
        if not isinstance(value, bool):
            raise bad(value)
        if isinstance(action, argparse._StoreFalseAction) or inverted:
            return not value
        return value

    def one(item: Any) -> Any:
        if isinstance(item, bool) or isinstance(item, dict):
            raise bad(item)
        if isinstance(item, list) and action.type is not moe_layer_freq_type:
            raise bad(item)
        if action.type is moe_layer_freq_type:
            text = item if isinstance(item, (int, list)) else str(item)
        else:
            text = str(item)
        try:
            result = action.type(text) if action.type is not None else text
        except (ValueError, TypeError, argparse.ArgumentTypeError):
            raise bad(item) from None
        if action.choices is not None and result not in action.choices:
            raise bad(item)
        return result

    if action.nargs in ("*", "+"):
        items = value if isinstance(value, list) else [value]
        if action.nargs == "+" and not items:
            raise bad(value)
        return [one(item) for item in items]
    return one(value)


def load_config(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Read a YAML config into ``{dest: value}`` (for ``parser.set_defaults``).

    Raises :class:`ArgumentsError` for an unreadable file, an unknown key (with the closest
    flag name), a key given twice, or a value of the wrong type.
    """
    import yaml

    where = f"--config {path}"
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as exc:
        raise ArgumentsError(f"{where}: cannot read the file ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        raise ArgumentsError(f"{where}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ArgumentsError(
            f"{where}: expected a mapping of flag names to values, got {type(data).__name__}"
        )
    options = _yaml_options(parser)
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for raw_key, value in data.items():
        key = str(raw_key).strip().lstrip("-").replace("_", "-")
        if key == "config":
            raise ArgumentsError(f"{where}: key 'config' is not allowed (config files do not nest)")
        if key not in options:
            close = difflib.get_close_matches(key, list(options), n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else "; run with --help for the flags"
            raise ArgumentsError(f"{where}: unknown key '{raw_key}'{hint}")
        action, inverted = options[key]
        if action.dest in origin:
            raise ArgumentsError(
                f"{where}: keys '{origin[action.dest]}' and '{raw_key}' both set {action.dest}; keep one"
            )
        origin[action.dest] = str(raw_key)
        if value is None:  # null: keep the built-in default
            continue
        values[action.dest] = _convert_value(action, inverted, str(raw_key), value, where)
    return values


#: Pairs of settings that exclude each other: when the command line sets one and the --config
#: file the other, the command line wins and the file's one is dropped.
_EXCLUSIVE_PAIRS = [
    ("lr_warmup_iters", "lr_warmup_fraction"),
    ("bf16", "fp16"),
    ("data_path", "mock_data"),
]


def _given_on_command_line(argv: list[str]) -> dict[str, Any]:
    """``{dest: value}`` of the flags present in ``argv``."""
    if "-h" in argv or "--help" in argv:
        return {}  # the real parser prints the help, with the file's values as defaults
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return vars(parser.parse_args(argv))


def _config_path(argv: list[str]) -> Optional[str]:
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    return known.config


# --------------------------------------------------------------------------------------------
# Derived defaults and validation
# --------------------------------------------------------------------------------------------


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _world_size(world_size: Optional[int]) -> int:
    if world_size is not None:
        return int(world_size)
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(raw)
    except ValueError:
        raise ArgumentsError(f"environment variable WORLD_SIZE={raw!r} is not an integer") from None


def _data_parallel_size(args: argparse.Namespace) -> int:
    """Ranks per pipeline stage (rounded down; :func:`validate_args` rejects a remainder)."""
    return max(args.world_size // max(args.pipeline_model_parallel_size, 1), 1)


def fill_derived_args(args: argparse.Namespace, world_size: Optional[int] = None) -> argparse.Namespace:
    """Fill the defaults that depend on other settings (in place; returns ``args``).

    Sets ``world_size``, ``data_parallel_size`` (world size / pipeline-model-parallel-size),
    ``rank``, ``ffn_hidden_size``,
    ``max_position_embeddings``, ``global_batch_size``, ``lr_decay_iters``, ``lr_warmup_iters`` (from ``--lr-warmup-fraction``),
    ``moe_ffn_hidden_size``, ``moe_layer_freq`` (expanded to a 0/1 list per layer),
    ``moe_token_dispatcher_type``, ``moe_token_drop_policy`` (probs with a capacity factor,
    else None: nothing is dropped), ``tokenizer_type``,
    ``vocab_size``, ``metrics_path``, ``log_load_interval`` and ``params_dtype``. Settings a
    default depends on may still be missing; :func:`validate_args` reports them.
    """
    import torch

    args.world_size = _world_size(world_size)
    args.data_parallel_size = _data_parallel_size(args)
    try:
        args.rank = int(os.environ.get("RANK", "0") or 0)
    except ValueError:
        raise ArgumentsError(f"environment variable RANK={os.environ['RANK']!r} is not an integer") from None

    if args.ffn_hidden_size is None and args.hidden_size is not None:
        if args.swiglu:
            args.ffn_hidden_size = int((4 * args.hidden_size * 2 / 3) / 64) * 64
        else:
            args.ffn_hidden_size = 4 * args.hidden_size
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    if args.global_batch_size is None and args.micro_batch_size is not None:
        args.global_batch_size = args.micro_batch_size * args.data_parallel_size

    if args.lr_decay_iters is None:
        args.lr_decay_iters = args.train_iters
    if args.lr_warmup_fraction is not None:
        if args.lr_warmup_iters:
            raise ArgumentsError(
                "--lr-warmup-fraction and --lr-warmup-iters are mutually exclusive: give only one"
            )
        if args.lr_decay_iters is not None:
            args.lr_warmup_iters = int(args.lr_warmup_fraction * args.lr_decay_iters)

    if args.num_experts is not None and args.moe_ffn_hidden_size is None:
        args.moe_ffn_hidden_size = args.ffn_hidden_size
    if isinstance(args.moe_layer_freq, int) and args.num_layers is not None:
        args.moe_layer_freq = [1 if i % args.moe_layer_freq == 0 else 0 for i in range(args.num_layers)]
    if args.moe_token_dispatcher_type is None:
        args.moe_token_dispatcher_type = "alltoall" if _cuda_available() else "allgather"
    if args.moe_token_drop_policy is None and args.moe_expert_capacity_factor is not None:
        args.moe_token_drop_policy = "probs"

    if args.tokenizer_type is None:
        args.tokenizer_type = "NullTokenizer" if args.mock_data else "SentencePieceTokenizer"
    if args.vocab_size is None and not args.data_path and args.tokenizer_model is None:
        # --mock-data, or the built-in corpus with the SentencePiece model trained on it.
        args.vocab_size = DEFAULT_VOCAB_SIZE

    if args.metrics_path is None:
        base = args.save if args.save else os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
        args.metrics_path = os.path.join(base, "metrics.jsonl")
    if args.log_load_interval is None:
        args.log_load_interval = args.log_interval

    args.params_dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
    return args


_REQUIRED = [
    "num_layers", "hidden_size", "num_attention_heads", "seq_length",
    "micro_batch_size", "train_iters", "lr", "num_experts",
]


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def validate_args(args: argparse.Namespace, world_size: Optional[int] = None) -> argparse.Namespace:
    """Check the settings; raise :class:`ArgumentsError` naming the flag(s) and the fix.

    Expects :func:`fill_derived_args` to have run (it runs it if it has not); sets
    ``args.num_micro_batches`` (micro-batches per rank and iteration). Touches no
    process group; ends by building Megatron's :class:`TransformerConfig` (and, with
    ``--swiftmoe``, SwiftMoE's own layout checks) so that whatever those reject is reported
    here too.
    """
    if not hasattr(args, "world_size"):
        fill_derived_args(args, world_size)
    elif world_size is not None:
        args.world_size = int(world_size)
        args.data_parallel_size = _data_parallel_size(args)
    n = args.world_size
    pp = args.pipeline_model_parallel_size

    def fail(message: str) -> None:
        raise ArgumentsError(message)

    missing = [_flag(d) for d in _REQUIRED if getattr(args, d) is None]
    if missing:
        fail(
            f"the following arguments are required: {', '.join(missing)} (give them on the "
            "command line or in a --config file; configs/ has ready-made ones)"
        )
    if n < 1:
        fail(f"the world size must be >= 1, got {n} (WORLD_SIZE)")

    # Parallelism: pipeline stages, each a data-parallel group of n / pp ranks.
    if args.tensor_model_parallel_size != 1:
        fail(
            f"--tensor-model-parallel-size {args.tensor_model_parallel_size} is not supported: "
            f"{MEGATRON_LM_POINTER}; this program runs TP = 1 (--pipeline-model-parallel-size splits "
            "the model over ranks)"
        )
    if pp < 1:
        fail(f"--pipeline-model-parallel-size must be >= 1, got {pp}")
    if n % pp:
        fail(
            f"--pipeline-model-parallel-size ({pp}) must divide the world size ({n}): every pipeline "
            "stage gets world-size / pipeline-model-parallel-size data-parallel ranks"
        )
    if args.num_layers % pp:
        fail(
            f"--num-layers ({args.num_layers}) must be divisible by --pipeline-model-parallel-size "
            f"({pp}): every pipeline stage builds num-layers / pipeline-model-parallel-size layers"
        )
    d = args.data_parallel_size
    # How the data-parallel size is named in messages.
    dp_size = f"world size ({n})" if pp == 1 else (
        f"data-parallel size ({d} = world size {n} / --pipeline-model-parallel-size {pp})")

    at_least_1 = [
        "num_layers", "hidden_size", "num_attention_heads", "seq_length", "max_position_embeddings",
        "ffn_hidden_size", "micro_batch_size", "global_batch_size", "train_iters", "eval_interval",
        "log_interval", "log_load_interval", "lr_decay_iters", "num_experts", "moe_ffn_hidden_size",
        "loss_scale_window", "make_vocab_size_divisible_by", "swiftmoe_slots_per_rank",
    ]
    optional_at_least_1 = ["exit_interval", "save_interval", "vocab_size", "lr_wsd_decay_iters"]
    for dest in at_least_1 + optional_at_least_1:
        value = getattr(args, dest)
        if value is not None and value < 1:
            hint = ""
            if dest == "ffn_hidden_size" and args.swiglu:
                hint = " (with --swiglu the default is int(4*hidden*2/3/64)*64; set --ffn-hidden-size)"
            fail(f"{_flag(dest)} must be >= 1, got {value}{hint}")
    for dest in ["eval_iters", "num_workers", "lr_warmup_iters"]:
        if getattr(args, dest) < 0:
            fail(f"{_flag(dest)} must be >= 0, got {getattr(args, dest)}")

    # Network.
    if args.hidden_size % args.num_attention_heads:
        fail(
            f"--hidden-size ({args.hidden_size}) must be divisible by --num-attention-heads "
            f"({args.num_attention_heads})"
        )
    if args.max_position_embeddings < args.seq_length:
        fail(
            f"--max-position-embeddings ({args.max_position_embeddings}) must be >= --seq-length "
            f"({args.seq_length})"
        )
    if not 0.0 < args.rotary_percent <= 1.0:
        fail(f"--rotary-percent must be in (0, 1], got {args.rotary_percent}")

    # Regularization and optimizer.
    if args.init_method_std <= 0:
        fail(f"--init-method-std must be > 0, got {args.init_method_std}")
    for dest in ["hidden_dropout", "attention_dropout"]:
        if not 0.0 <= getattr(args, dest) < 1.0:
            fail(f"{_flag(dest)} must be in [0, 1), got {getattr(args, dest)}")
    for dest in ["weight_decay", "clip_grad"]:
        if getattr(args, dest) < 0:
            fail(f"{_flag(dest)} must be >= 0, got {getattr(args, dest)}")
    for dest in ["adam_beta1", "adam_beta2"]:
        if not 0.0 <= getattr(args, dest) < 1.0:
            fail(f"{_flag(dest)} must be in [0, 1), got {getattr(args, dest)}")
    if args.adam_eps <= 0:
        fail(f"--adam-eps must be > 0, got {args.adam_eps}")

    # Batch.
    per_iteration = args.micro_batch_size * args.data_parallel_size
    if args.global_batch_size % per_iteration:
        fail(
            f"--global-batch-size ({args.global_batch_size}) must be a multiple of "
            f"--micro-batch-size ({args.micro_batch_size}) * data-parallel size ({d}, the world "
            f"size{f' / --pipeline-model-parallel-size {pp}' if pp > 1 else ''}) = {per_iteration}: "
            "change --global-batch-size or --micro-batch-size"
        )
    args.num_micro_batches = args.global_batch_size // per_iteration

    # Learning rate.
    if args.lr <= 0:
        fail(f"--lr must be > 0, got {args.lr}")
    if args.min_lr < 0:
        fail(f"--min-lr must be >= 0, got {args.min_lr}")
    if args.min_lr > args.lr:
        fail(f"--min-lr ({args.min_lr}) must be <= --lr ({args.lr})")
    if args.lr_warmup_fraction is not None and not 0.0 <= args.lr_warmup_fraction < 1.0:
        fail(f"--lr-warmup-fraction must be in [0, 1), got {args.lr_warmup_fraction}")
    warmup_flag = "--lr-warmup-fraction" if args.lr_warmup_fraction is not None else "--lr-warmup-iters"
    if args.lr_warmup_iters > args.train_iters:
        fail(
            f"{warmup_flag} gives {args.lr_warmup_iters} warmup iterations, more than "
            f"--train-iters ({args.train_iters})"
        )
    if args.lr_warmup_iters >= args.lr_decay_iters:
        fail(
            f"{warmup_flag} gives {args.lr_warmup_iters} warmup iterations, which must be fewer "
            f"than --lr-decay-iters ({args.lr_decay_iters}, default train-iters)"
        )
    if args.lr_decay_style == "WSD":
        if args.lr_wsd_decay_iters is None:
            fail("--lr-decay-style WSD needs --lr-wsd-decay-iters (iterations of the annealing phase)")
        if args.lr_wsd_decay_iters > args.lr_decay_iters:
            fail(
                f"--lr-wsd-decay-iters ({args.lr_wsd_decay_iters}) must be <= --lr-decay-iters "
                f"({args.lr_decay_iters})"
            )

    # Mixed precision.
    if args.bf16 and args.fp16:
        fail("--bf16 and --fp16 are mutually exclusive (if a --config file sets one, pass "
             "--no-bf16 or --no-fp16 to turn it off)")
    if args.initial_loss_scale <= 0 or args.min_loss_scale <= 0:
        fail("--initial-loss-scale and --min-loss-scale must be > 0")
    if args.min_loss_scale > args.initial_loss_scale:
        fail(
            f"--min-loss-scale ({args.min_loss_scale}) must be <= --initial-loss-scale "
            f"({args.initial_loss_scale})"
        )

    # MoE.
    e = args.num_experts
    if not 1 <= args.moe_router_topk <= e:
        fail(f"--moe-router-topk ({args.moe_router_topk}) must be in [1, --num-experts ({e})]")
    if (
        args.moe_router_topk == 1
        and args.moe_router_score_function == "softmax"
        and not args.moe_router_pre_softmax
        and args.moe_router_load_balancing_type != "sinkhorn"
    ):
        fail(
            "--moe-router-topk 1 with --moe-router-score-function softmax needs "
            "--moe-router-pre-softmax (a softmax over the single selected score has zero gradient)"
        )
    if args.moe_router_enable_expert_bias and args.moe_router_score_function != "sigmoid":
        fail("--moe-router-enable-expert-bias needs --moe-router-score-function sigmoid")
    if args.moe_aux_loss_coeff < 0:
        fail(f"--moe-aux-loss-coeff must be >= 0, got {args.moe_aux_loss_coeff}")
    if args.moe_z_loss_coeff is not None and args.moe_z_loss_coeff < 0:
        fail(f"--moe-z-loss-coeff must be >= 0, got {args.moe_z_loss_coeff}")
    if args.moe_router_bias_update_rate < 0:
        fail(f"--moe-router-bias-update-rate must be >= 0, got {args.moe_router_bias_update_rate}")
    pattern = args.moe_layer_freq
    if len(pattern) != args.num_layers:
        fail(
            f"--moe-layer-freq gives a pattern of {len(pattern)} layers but --num-layers is "
            f"{args.num_layers}: give one 0/1 per layer"
        )
    if 1 not in pattern:
        fail("--moe-layer-freq makes no layer an MoE layer: put at least one 1 in the pattern")
    capacity = args.moe_expert_capacity_factor
    if capacity is not None:
        if capacity <= 0:
            fail(f"--moe-expert-capacity-factor must be > 0, got {capacity} (omit it for dropless)")
        if args.moe_router_load_balancing_type == "sinkhorn":
            fail("--moe-expert-capacity-factor does not work with --moe-router-load-balancing-type sinkhorn")
    else:
        if args.moe_token_drop_policy is not None:
            fail("--moe-token-drop-policy only applies with --moe-expert-capacity-factor (token dropping)")
        if args.moe_pad_expert_input_to_capacity:
            fail("--moe-pad-expert-input-to-capacity needs --moe-expert-capacity-factor")

    # SwiftMoE or the static baseline.
    if args.swiftmoe:
        s = args.swiftmoe_slots_per_rank
        if d * s < e:
            fail(
                f"--swiftmoe-slots-per-rank ({s}) * {dp_size} = {d * s} slots is fewer than "
                f"--num-experts ({e}): every expert needs a slot; use --swiftmoe-slots-per-rank "
                f">= {math.ceil(e / d)} or more ranks"
            )
        if args.moe_pad_expert_input_to_capacity:
            fail("--moe-pad-expert-input-to-capacity is not supported with --swiftmoe (it never pads)")
        if args.swiftmoe_replan_interval < 1:
            fail(f"--swiftmoe-replan-interval must be >= 1, got {args.swiftmoe_replan_interval}")
        if args.add_bias_linear:
            fail("--add-bias-linear is not supported with --swiftmoe: SwiftMoE's experts are bias-free")
    else:
        if e % d:
            fail(
                f"--num-experts ({e}) must be divisible by the {dp_size} without --swiftmoe: "
                f"static expert parallelism puts num-experts / {'world-size' if pp == 1 else 'data-parallel-size'} "
                "experts on each rank; change --num-experts or the number of ranks, or use --swiftmoe"
            )
        if args.moe_token_dispatcher_type == "alltoall" and not _cuda_available():
            fail(
                "--moe-token-dispatcher-type alltoall needs CUDA (Megatron's alltoall dispatcher "
                "uses CUDA streams): use allgather on CPU"
            )

    # Data.
    if args.data_path is not None and len(args.data_path) == 0:
        fail("--data-path needs at least one dataset prefix")
    if args.data_path and len(args.data_path) > 1:
        fail(
            f"--data-path: dataset blends ({' '.join(args.data_path)}) are not supported yet; give one "
            "prefix (merge the inputs with python -m megatron_swiftmoe.preprocess_data --input A B ...)"
        )
    if args.data_path and args.mock_data:
        fail("--data-path and --mock-data are mutually exclusive: give one")
    try:
        split = [float(x) for x in re.split(r"[,/]", str(args.split))]
    except ValueError:
        split = []
    if not 1 <= len(split) <= 3 or any(x < 0 for x in split) or sum(split) <= 0:
        fail(f"--split must be up to three non-negative numbers such as 969,30,1, got {args.split!r}")
    if args.tokenizer_type == "NullTokenizer":
        if args.data_path and args.vocab_size is None:
            fail("--tokenizer-type NullTokenizer needs --vocab-size (every token id in --data-path must be below it)")
        if not args.data_path and not args.mock_data:
            fail(
                "--tokenizer-type NullTokenizer cannot tokenize the built-in text corpus: use "
                "--mock-data, or --data-path with --vocab-size, or SentencePieceTokenizer"
            )
        if args.tokenizer_model is not None:
            fail("--tokenizer-model is for SentencePieceTokenizer, not --tokenizer-type NullTokenizer")
    else:
        if args.data_path and args.tokenizer_model is None:
            fail(
                "--data-path with --tokenizer-type SentencePieceTokenizer needs --tokenizer-model "
                "(the model the data was tokenized with)"
            )
    if args.tokenizer_model is not None and not os.path.isfile(args.tokenizer_model):
        fail(f"--tokenizer-model {args.tokenizer_model}: no such file")
    if args.data_path:
        missing = [args.data_path[0] + ext for ext in (".bin", ".idx") if not os.path.isfile(args.data_path[0] + ext)]
        if missing:
            fail(
                f"--data-path {args.data_path[0]}: no {' or '.join(missing)}. It takes the prefix of an indexed dataset "
                "(PREFIX.bin and PREFIX.idx, as python -m megatron_swiftmoe.preprocess_data --output-prefix PREFIX writes "
                "them); in a container, the directory must be mounted (scripts/slurm/ mounts those of --data-path, --save "
                "and --load)"
            )

    # Checkpointing.
    if args.load is not None and not os.path.isdir(args.load):
        fail(f"--load {args.load}: no such directory (omit --load to start from scratch)")
    if args.finetune and args.load is None:
        fail("--finetune needs --load (the checkpoint whose weights to start from)")
    if args.load_fallback and args.load is None:
        fail("--load-fallback needs --load (the directory whose checkpoints to fall back among)")
    if not args.distributed_timeout_minutes > 0:
        fail(f"--distributed-timeout-minutes must be > 0 (got {args.distributed_timeout_minutes})")
    if args.save_interval is not None and args.save is None:
        fail("--save-interval needs --save (the directory to save checkpoints to)")
    if args.save is not None and os.path.exists(args.save) and not os.path.isdir(args.save):
        fail(f"--save {args.save}: exists and is not a directory")

    # Logging.
    for dest in ["wandb_exp_name", "wandb_save_dir"]:
        if getattr(args, dest) is not None and args.wandb_project is None:
            fail(f"{_flag(dest)} needs --wandb-project")
    if os.path.isdir(args.metrics_path):
        fail(f"--metrics-path {args.metrics_path}: is a directory; give a file name")

    if args.swiftmoe:
        from megatron_swiftmoe.core.experts import grouped_gemm_problem

        if problem := grouped_gemm_problem(args.swiftmoe_grouped_gemm, args.params_dtype):
            fail(problem)

    # Whatever Megatron's TransformerConfig or SwiftMoE's layer would still reject.
    try:
        config = transformer_config_from_args(args)
    except (ValueError, AssertionError, TypeError) as exc:
        fail(f"Megatron's TransformerConfig rejects these settings: {exc}")
    if args.swiftmoe:
        from megatron_swiftmoe.core.layer import _check_supported

        try:
            _check_supported(config, d, swiftmoe_config_from_args(args))
        except ValueError as exc:
            fail(f"SwiftMoE rejects these settings: {exc}")
    return args


def parse_args(argv: Optional[list[str]] = None, world_size: Optional[int] = None) -> argparse.Namespace:
    """Parse ``argv`` (default ``sys.argv[1:]``): ``--config`` file, then flags on top of it.

    A flag on the command line overrides the file's value of the same setting, and also the
    file's value of a setting it excludes (``--fp16`` drops the file's ``bf16: true``,
    ``--lr-warmup-iters`` its ``lr-warmup-fraction``, ``--mock-data`` its ``data-path``).

    Fills the derived defaults and validates for ``world_size`` ranks (default: the
    ``WORLD_SIZE`` environment variable, else 1). On any error prints argparse's usage and
    ``error: <message>`` and raises ``SystemExit(2)``.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    try:
        config = _config_path(argv)
        values: dict[str, Any] = {}
        given: dict[str, Any] = {}
        if config is not None:
            values = load_config(config, parser)
            given = _given_on_command_line(argv)
            for pair in _EXCLUSIVE_PAIRS:
                for mine, other in (pair, pair[::-1]):
                    if given.get(mine) and other in values and other not in given:
                        del values[other]
            parser.set_defaults(**values)
        args = parser.parse_args(argv)
        fill_derived_args(args, world_size)
        _fit_config_warmup(args, values, given)
        validate_args(args)
    except ArgumentsError as exc:
        parser.error(str(exc))
    return args


def _fit_config_warmup(args: argparse.Namespace, config: dict[str, Any], given: dict[str, Any]) -> None:
    """A ``--config`` warm-up that a shorter ``--train-iters`` on the command line cannot hold
    (e.g. the quickstart's 30 warm-up iterations with ``--train-iters 20``) is scaled with it, to
    the config's fraction of its own train-iters, with a notice, instead of failing. A warm-up
    given on the command line is checked as given."""
    if "lr_warmup_iters" not in config or "lr_warmup_iters" in given or "train_iters" not in given:
        return
    warmup, train, decay = args.lr_warmup_iters, args.train_iters, args.lr_decay_iters
    if train is None or decay is None or (warmup <= train and warmup < decay):
        return
    config_train = config.get("train_iters")
    scaled = round(warmup * train / config_train) if config_train else train // 10
    args.lr_warmup_iters = max(0, min(scaled, train, decay - 1))
    if args.rank == 0:
        source = f"{warmup} of its {config_train} train-iters" if config_train else f"{warmup}"
        print(f"> --train-iters {train}: the config's lr-warmup-iters ({source}) scaled to {args.lr_warmup_iters}; "
              "give --lr-warmup-iters to choose", flush=True)


# --------------------------------------------------------------------------------------------
# Configs for Megatron-Core and SwiftMoE
# --------------------------------------------------------------------------------------------


def transformer_config_from_args(args: argparse.Namespace):
    """Megatron's :class:`TransformerConfig` for ``args`` (after :func:`fill_derived_args`).

    TP = CP = 1, ``--pipeline-model-parallel-size`` stages. Expert parallelism: 1 with
    ``--swiftmoe`` (experts are replicated over the stage's data-parallel group instead), the
    data-parallel size for the static baseline.
    """
    import torch
    import torch.nn.functional as F
    from megatron.core.transformer import TransformerConfig

    swiglu = bool(args.swiglu)
    return TransformerConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout,
        init_method_std=args.init_method_std,
        add_bias_linear=args.add_bias_linear,
        gated_linear_unit=swiglu,
        activation_func=F.silu if swiglu else F.gelu,
        normalization=args.normalization,
        bf16=args.bf16,
        fp16=args.fp16,
        params_dtype=args.params_dtype,
        calculate_per_token_loss=False,
        use_cpu_initialization=not _cuda_available(),
        tensor_model_parallel_size=1,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        pipeline_dtype=args.params_dtype,  # the activations sent between stages
        context_parallel_size=1,
        expert_model_parallel_size=1 if args.swiftmoe else args.data_parallel_size,
        expert_tensor_parallel_size=1,
        num_moe_experts=args.num_experts,
        moe_ffn_hidden_size=args.moe_ffn_hidden_size,
        moe_router_topk=args.moe_router_topk,
        moe_router_score_function=args.moe_router_score_function,
        moe_router_pre_softmax=args.moe_router_pre_softmax,
        moe_aux_loss_coeff=args.moe_aux_loss_coeff,
        moe_z_loss_coeff=args.moe_z_loss_coeff,
        moe_router_load_balancing_type=args.moe_router_load_balancing_type,
        # SwiftMoE applies its own replica-proportional capacity (SwiftMoEConfig.capacity_factor).
        moe_expert_capacity_factor=None if args.swiftmoe else args.moe_expert_capacity_factor,
        moe_token_drop_policy=args.moe_token_drop_policy or "probs",  # unused when dropless
        moe_pad_expert_input_to_capacity=args.moe_pad_expert_input_to_capacity,
        moe_router_enable_expert_bias=args.moe_router_enable_expert_bias,
        moe_router_bias_update_rate=args.moe_router_bias_update_rate,
        moe_layer_freq=list(args.moe_layer_freq) if isinstance(args.moe_layer_freq, list) else args.moe_layer_freq,
        moe_token_dispatcher_type=args.moe_token_dispatcher_type,
    )


def padded_vocab_size(vocab_size: int, args: argparse.Namespace) -> int:
    """``vocab_size`` rounded up to a multiple of ``--make-vocab-size-divisible-by`` (TP = 1)."""
    multiple = args.make_vocab_size_divisible_by
    return -(-vocab_size // multiple) * multiple


def gpt_model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The ``GPTModel`` keyword arguments that come from flags (all but config, spec, vocab)."""
    return dict(
        max_sequence_length=args.max_position_embeddings,
        position_embedding_type=args.position_embedding_type,
        rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
    )


def print_args(args: argparse.Namespace, title: str = "arguments", file=None) -> None:
    """Megatron-style listing of every setting, sorted (call it on rank 0 only)."""
    file = sys.stdout if file is None else file
    print(f"------------------------ {title} ------------------------", file=file, flush=True)
    lines = []
    for name, value in vars(args).items():
        dots = "." * max(1, 48 - len(name))
        lines.append(f"  {name} {dots} {value}")
    for line in sorted(lines, key=str.lower):
        print(line, file=file)
    print(f"-------------------- end of {title} ---------------------", file=file, flush=True)
