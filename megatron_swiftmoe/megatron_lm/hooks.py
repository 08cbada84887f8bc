"""Where the plugin meets Megatron-LM: wrappers around the names ``pretrain()`` calls.

Megatron-LM imports most of these names by value (``from megatron.training.checkpointing
import save_checkpoint``), so each wrapper is bound in every module that holds the name. Every
wrapper calls the original unchanged unless ``--swiftmoe`` is set: without the flag the
patched ``pretrain_gpt.py`` trains exactly as the unpatched one.

| Megatron-LM name | what SwiftMoE adds |
| --- | --- |
| ``arguments.add_megatron_arguments`` | the ``--swiftmoe*`` flag group |
| ``initialize.validate_args`` | :mod:`.arguments` checks, before any process group |
| ``training.initialize_megatron`` | the ``--save`` directory's lock (:mod:`~megatron_swiftmoe.training.savelock`) |
| ``get_gpt_decoder_block_spec`` (``gpt_builders``, ``megatron.training.models.gpt``) | MoE layers become ``SwiftMoELayer`` |
| ``get_gpt_mtp_block_spec`` (``gpt_builders``, ``gpt_layer_specs``) | so do those of the multi-token-prediction layers |
| ``training.DDP``, ``dist_utils.DistributedDataParallel``, ``wrap_model_chunks_with_ddp``, ``dist_utils._ddp_wrap`` | the expert slots stay out of DDP's buckets |
| ``training.get_megatron_optimizer`` | Megatron's optimizer without the slots, chained with the expert optimizer (whose expert traffic each DDP chunk's sync methods drive); the load monitor |
| ``training.finalize_model_grads`` | per-token loss scaling of the expert gradients; their NaN check (:mod:`.gradcheck`) |
| ``training.train_step`` | per-layer load figures, every iteration; a stop on non-finite gradients |
| ``training.training_log`` | the SwiftMoE load line, TensorBoard / W&B scalars |
| ``training.save_checkpoint`` / ``load_checkpoint`` | no expert transfer in flight; per-rank state (torch format), slot refill; checks and errors named |
| ``checkpointing._build_sharded_state_dict_metadata`` | ``metadata["swiftmoe"]`` (torch_dist) |
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from megatron_swiftmoe.core.config import add_swiftmoe_arguments
from megatron_swiftmoe.core.layer import has_moe_layer, replica_group, swiftmoe_layers, swiftmoe_spec
from megatron_swiftmoe.core.optimizer import NonFiniteGradients, refresh_slots
from megatron_swiftmoe.megatron_lm import arguments as swiftmoe_arguments
from megatron_swiftmoe.megatron_lm import checkpointing as swiftmoe_checkpointing
from megatron_swiftmoe.megatron_lm import gradcheck, startup
from megatron_swiftmoe.megatron_lm.optimizer import chain_with_experts
from megatron_swiftmoe.training.agreement import AgreedError, agree
from megatron_swiftmoe.training.checkpointing import os_cause, write_failure


class _State:
    """What the hooks share during one run."""

    monitor = None  # MoELoadMonitor over the SwiftMoE layers of every pipeline stage
    figures: list = []  # the last iteration's per-layer load figures, all stages in order
    save_lock = None  # rank 0's SaveLock of --save


def _args():
    from megatron.training import get_args

    return get_args()


def _active() -> bool:
    from megatron.training.global_vars import _GLOBAL_ARGS

    return _GLOBAL_ARGS is not None and bool(getattr(_GLOBAL_ARGS, "swiftmoe", False))


def _rebind(modules: list, name: str, make: Callable[[Callable], Callable], required: bool = True) -> None:
    """Replace ``name`` by ``make(original)`` in every module of ``modules`` that holds it (the
    first holder's object is the original; Megatron-LM versions differ in who holds what)."""
    holders = [module for module in modules if module is not None and hasattr(module, name)]
    if not holders:
        if required:
            raise ImportError(f"megatron_swiftmoe: no {name} in {[m.__name__ for m in modules if m]}: unsupported Megatron-LM")
        return
    original = getattr(holders[0], name)
    wrapper = make(original)
    for module in holders:
        if getattr(module, name) is original:
            setattr(module, name, wrapper)


def _optional_module(name: str):
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        return None


@contextlib.contextmanager
def _slots_hidden(model_chunks):
    """Slots look frozen while Megatron collects the parameters it manages (DDP, optimizer)."""
    slots = [p for layer in swiftmoe_layers(model_chunks) for p in layer.experts.parameters()]
    for param in slots:
        param.requires_grad_(False)
    try:
        yield
    finally:
        for param in slots:
            param.requires_grad_(True)


def _exit_cleanly(error: Exception | str, status: int = 1):
    """Every rank got the same agreed error: print it once (rank 0) and stop every rank."""
    if torch.distributed.get_rank() == 0:
        print(f"error: {error}", file=sys.stderr, flush=True)
    raise SystemExit(status) from None


def _exit_alone(message: str, error: BaseException):
    """This rank failed alone (the others may wait in a collective): print and stop it; torchrun
    stops the others, or their collective fails or times out."""
    print(f"error: rank {torch.distributed.get_rank()}: {message}", file=sys.stderr, flush=True)
    raise SystemExit(1) from error


# ---------------------------------------------------------------- arguments


def _add_megatron_arguments(original):
    @functools.wraps(original)
    def add_megatron_arguments(parser):
        return add_swiftmoe_arguments(original(parser))

    return add_megatron_arguments


def _initialize_megatron(original):
    @functools.wraps(original)
    def initialize_megatron(*args, **kwargs):
        result = original(*args, **kwargs)
        if _active() and torch.distributed.is_initialized():
            from megatron.training.utils import print_rank_0

            from megatron_swiftmoe.training.savelock import take_save_lock

            try:  # before anything is written: a second run on this --save directory stops here
                _State.save_lock = take_save_lock(_args().save, torch.distributed.get_rank() == 0, print_rank_0)
            except AgreedError as error:
                _exit_cleanly(error)
        return result

    return initialize_megatron


def _validate_args(original):
    @functools.wraps(original)
    def validate_args(args, defaults={}):  # noqa: B006 - Megatron's signature
        swiftmoe_arguments.validate_before(args)
        result = original(args, defaults)
        swiftmoe_arguments.validate_after(args)
        return result

    return validate_args


# ---------------------------------------------------------------- model


def _block_spec(original):
    @functools.wraps(original)
    def get_gpt_decoder_block_spec(*args, **kwargs):
        spec = original(*args, **kwargs)
        if not (_active() and has_moe_layer(spec)):  # a stage or virtual stage may have no MoE layer
            return spec
        return swiftmoe_spec(spec, swiftmoe_arguments.swiftmoe_config(_args()))

    return get_gpt_decoder_block_spec


def _mtp_block_spec(original):
    """The multi-token-prediction layers' spec derives from a decoder layer spec that Megatron-LM
    builds apart from the decoder block's (``get_gpt_decoder_layer_specs`` or the layer spec
    helpers): its MoE layer is made a SwiftMoE layer here."""

    @functools.wraps(original)
    def get_gpt_mtp_block_spec(config, spec, *args, **kwargs):
        if _active() and has_moe_layer(spec):
            spec = swiftmoe_spec(spec, swiftmoe_arguments.swiftmoe_config(_args()))
        return original(config, spec, *args, **kwargs)

    return get_gpt_mtp_block_spec


@functools.cache
def _ddp_class(original):
    """One subclass per DDP class, wherever Megatron-LM names it (``training.DDP``, core_v0.19's
    ``dist_utils.DistributedDataParallel``): ``train()`` wires ``config.no_sync_func`` only for
    chunks that are instances of its ``DDP``."""

    class SwiftMoEDistributedDataParallel(original):
        """Megatron's DDP for everything but the expert slots (their gradients go to the shards)."""

        def __init__(self, config, ddp_config, module, *args, **kwargs):
            with _slots_hidden([module]):
                super().__init__(config, ddp_config, module, *args, **kwargs)

    SwiftMoEDistributedDataParallel.__name__ = original.__name__
    SwiftMoEDistributedDataParallel.__qualname__ = original.__qualname__
    return SwiftMoEDistributedDataParallel


def _with_slots_hidden(original):
    """A function whose first argument is the model chunks, run with the slots hidden."""

    @functools.wraps(original)
    def wrapper(model_chunks, *args, **kwargs):
        if not _active():
            return original(model_chunks, *args, **kwargs)
        with _slots_hidden(model_chunks):
            return original(model_chunks, *args, **kwargs)

    return wrapper


def _get_megatron_optimizer(original):
    @functools.wraps(original)
    def get_megatron_optimizer(config, model_chunks, *args, **kwargs):
        if not _active():
            return original(config, model_chunks, *args, **kwargs)
        with _slots_hidden(model_chunks):
            dense = original(config, model_chunks, *args, **kwargs)
        from megatron.core import parallel_state

        from megatron_swiftmoe.training.monitor import MoELoadMonitor

        _State.monitor = MoELoadMonitor(  # a stage may have no MoE layer: it still takes part
            swiftmoe_layers(model_chunks),
            group=replica_group(),
            pipeline_group=parallel_state.get_pipeline_model_parallel_group(),
        )
        startup.announce(model_chunks, _args())
        timeout = datetime.timedelta(minutes=_args().distributed_timeout_minutes)
        return chain_with_experts(dense, config, model_chunks, timeout=timeout,
                                  stop_on_nonfinite=_args().check_for_nan_in_loss_and_grad)

    return get_megatron_optimizer


def _traffics(model: list) -> list:
    """The expert traffic of each model chunk (attached by the expert optimizer)."""
    return [traffic for chunk in model if (traffic := getattr(chunk, "swiftmoe_traffic", None)) is not None]


def _finalize_model_grads(original):
    @functools.wraps(original)
    def finalize_model_grads(model, num_tokens=None, *args, **kwargs):
        result = original(model, num_tokens, *args, **kwargs)
        if _active() and num_tokens is not None and num_tokens > 0:
            # Megatron has just scaled every DDP gradient by 1 / (global token count): the same
            # for the expert gradients, whose reduction may have finished or not yet.
            for traffic in _traffics(model):
                traffic.scale_grads(1.0 / num_tokens)
        if _active() and _args().check_for_nan_in_loss_and_grad:
            # Inside the rerun state machine's loop, as DDP's bucket check.
            gradcheck.validate_expert_grads(
                [shards for traffic in _traffics(model) for shards in traffic.shards], _args().curr_iteration + 1)
        return result

    return finalize_model_grads


# ---------------------------------------------------------------- training loop and logging


def _train_step(original):
    @functools.wraps(original)
    def train_step(*args, **kwargs):
        try:
            result = original(*args, **kwargs)
        except NonFiniteGradients as error:  # raised on every rank at once, before any step
            _exit_cleanly(error.at_iteration(_args().curr_iteration + 1)
                          + " (--no-check-for-nan-in-loss-and-grad skips such steps instead)", gradcheck.EXIT_CODE)
        if _active() and _State.monitor is not None:
            _State.figures = _State.monitor.collect()  # collective: every rank, every iteration
        return result

    return train_step


def _training_log(original):
    @functools.wraps(original)
    def training_log(loss_dict, total_loss_dict, learning_rate, iteration, *args, **kwargs):
        result = original(loss_dict, total_loss_dict, learning_rate, iteration, *args, **kwargs)
        if _active() and _State.figures and iteration % _args().log_interval == 0:
            _log_load(iteration)
        return result

    return training_log


def _log_load(iteration: int) -> None:
    from megatron.training.global_vars import get_tensorboard_writer, get_wandb_writer
    from megatron.training.utils import print_rank_last

    from megatron_swiftmoe.training.monitor import load_line

    writer, wandb_writer = get_tensorboard_writer(), get_wandb_writer()
    scalars = {}
    for index, figures in enumerate(_State.figures):
        print_rank_last(load_line(index, figures))
        scalars[f"swiftmoe/layer{index}/rank_load_max_over_mean"] = figures["realised_max_mean"]
        scalars[f"swiftmoe/layer{index}/static_ep_rank_load_max_over_mean"] = figures["static_max_mean"]
        scalars[f"swiftmoe/layer{index}/dropped_tokens"] = figures["dropped_tokens"]
    if writer:
        for key, value in scalars.items():
            writer.add_scalar(key, value, iteration)
    if wandb_writer:
        wandb_writer.log(scalars, iteration)


# ---------------------------------------------------------------- checkpoints


def _parallel_ranks() -> tuple[int, int]:
    """(pipeline rank, position in the SwiftMoE replica group: the data-parallel rank without
    tensor and context parallelism), which name this rank's torch-format state file."""
    from megatron.core import parallel_state

    return parallel_state.get_pipeline_model_parallel_rank(), torch.distributed.get_rank(replica_group())


def _iteration_dir(root: str, iteration: int) -> str:
    from megatron.training.checkpointing import get_checkpoint_name

    return get_checkpoint_name(root, iteration, return_base_dir=True)


def _save_checkpoint(original):
    @functools.wraps(original)
    def save_checkpoint(iteration, model, optimizer, opt_param_scheduler, *args, **kwargs):
        if not _active():
            return original(iteration, model, optimizer, opt_param_scheduler, *args, **kwargs)
        megatron_args = _args()
        where = f"saving the checkpoint of iteration {iteration} to {megatron_args.save}"

        def prepare() -> None:
            optimizer.experts.finish_param_sync()  # no expert transfer in flight while saving
            if _State.save_lock is not None:
                _State.save_lock.verify()  # still this run's directory
            if megatron_args.ckpt_format == "torch" and not kwargs.get("non_persistent_ckpt"):
                # Before Megatron's own save, which replaces the tracker file last.
                pp_rank, dp_rank = _parallel_ranks()
                swiftmoe_checkpointing.save_rank_state(
                    _iteration_dir(megatron_args.save, iteration), pp_rank, dp_rank, megatron_args,
                    swiftmoe_layers(model), optimizer.experts,
                )

        try:
            agree(where, prepare)
        except AgreedError as error:
            _exit_cleanly(f"{error}\nThe previous checkpoint stays the latest")
        try:
            with swiftmoe_checkpointing.write_errors_named():
                return original(iteration, model, optimizer, opt_param_scheduler, *args, **kwargs)
        except Exception as error:  # noqa: BLE001 - OS errors (a full disk) and lost peers are explained
            from megatron_swiftmoe.training.pretrain_gpt import is_collective_failure

            if is_collective_failure(error):
                _exit_alone(f"{where}: a collective operation failed ({str(error).strip().splitlines()[0]}): "
                            "another rank has most likely failed first (see its error)", error)
            if os_cause(error) is None:
                raise
            _exit_alone(f"{where}: {write_failure(megatron_args.save, error)}\n"
                        "The previous checkpoint stays the latest (Megatron replaces the tracker file last)", error)

    return save_checkpoint


def _load_checkpoint(original):
    @functools.wraps(original)
    def load_checkpoint(ddp_model, optimizer, opt_param_scheduler, load_arg="load", *args, **kwargs):
        if not _active():
            return original(ddp_model, optimizer, opt_param_scheduler, load_arg, *args, **kwargs)
        megatron_args = _args()
        load_dir = getattr(megatron_args, load_arg)
        try:
            agree("checking the checkpoint to load", lambda: torch.distributed.get_rank() != 0
                  or swiftmoe_checkpointing.check_before_load(load_dir, megatron_args))
            try:
                with swiftmoe_checkpointing.unpickling_refusals_explained():
                    result = original(ddp_model, optimizer, opt_param_scheduler, load_arg, *args, **kwargs)
            except SystemExit as stop:
                if stop.code not in (None, 0):
                    raise
                _load_stopped(load_dir, stop)
            _after_load(ddp_model, optimizer, load_dir)
        except AgreedError as error:
            _exit_cleanly(error)
        return result

    return load_checkpoint


def _load_stopped(load_dir: Optional[str], stop: SystemExit) -> None:
    """Megatron gave up loading with ``sys.exit()``: status 0, as if the job had succeeded."""
    found = swiftmoe_checkpointing.iteration_to_load(load_dir)
    if found is None and _args().exit_on_missing_checkpoint:
        raise stop  # --exit-on-missing-checkpoint: Megatron's own choice to stop there
    what = f"the checkpoint of iteration {found[0]} ({found[1]})" if found else "its checkpoint"
    from megatron.core import parallel_state

    message = (f"--load {load_dir}: Megatron-LM could not load {what}; its message is above. The checkpoint is "
               "damaged or incomplete: resume from an older one (write its iteration into "
               "latest_checkpointed_iteration.txt) or start without --load")
    if parallel_state.get_data_parallel_rank() == 0:  # the other data-parallel ranks failed alike
        _exit_alone(message, stop)
    raise SystemExit(1) from stop


def _after_load(model, optimizer, load_dir: Optional[str]) -> None:
    """Per-rank state of a torch-format checkpoint; then the slots, from the shards."""
    from megatron.training.checkpointing import get_checkpoint_tracker_filename, read_metadata

    args = _args()
    layers = swiftmoe_layers(model)
    experts = optimizer.experts
    tracker = get_checkpoint_tracker_filename(load_dir) if load_dir else None
    if tracker and Path(tracker).is_file():
        iteration, release = read_metadata(tracker)
        iteration_dir = _iteration_dir(load_dir, iteration) if not release else str(Path(load_dir) / "release")
        if not (Path(iteration_dir) / ".metadata").exists():  # not a distributed checkpoint: torch format
            pp_rank, dp_rank = _parallel_ranks()
            load_optim = not (args.no_load_optim or args.finetune or release)
            swiftmoe_checkpointing.load_rank_state(iteration_dir, pp_rank, dp_rank, args, layers, experts, load_optim)
    refresh_slots(experts.shards)


def _sharded_metadata(original):
    @functools.wraps(original)
    def build_sharded_state_dict_metadata(args, *rest, **kwargs):
        metadata = original(args, *rest, **kwargs)
        if getattr(args, "swiftmoe", False):
            metadata["swiftmoe"] = swiftmoe_checkpointing.layout(args)
        return metadata

    return build_sharded_state_dict_metadata


# ---------------------------------------------------------------- installation


def install() -> None:
    """Bind every wrapper (idempotent). Names that only some Megatron-LM versions have are
    bound where they exist: e.g. core_v0.16 builds the spec in ``gpt_builders`` and wraps DDP in
    ``training.get_model``; core_v0.19 builds it in ``megatron.training.models.gpt`` and
    computes the distributed optimizer's parameter layout before DDP (``dist_utils._ddp_wrap``)."""
    from megatron.training import arguments, checkpointing, initialize, training

    if getattr(training, "_swiftmoe_installed", False):
        return
    gpt_builders = _optional_module("gpt_builders")  # the checkout's own, next to pretrain_gpt.py
    model_builders = _optional_module("megatron.training.models.gpt")
    dist_utils = _optional_module("megatron.training.models.dist_utils")
    from megatron.core.models.gpt import gpt_layer_specs  # core_v0.19's model builder imports it late
    _rebind([arguments], "add_megatron_arguments", _add_megatron_arguments)
    _rebind([arguments, initialize], "validate_args", _validate_args)
    _rebind([training], "initialize_megatron", _initialize_megatron)
    _rebind([gpt_builders, model_builders], "get_gpt_decoder_block_spec", _block_spec)
    _rebind([gpt_builders, gpt_layer_specs], "get_gpt_mtp_block_spec", _mtp_block_spec)
    _rebind([training], "DDP", _ddp_class)
    _rebind([dist_utils], "DistributedDataParallel", _ddp_class, required=False)
    _rebind([training], "wrap_model_chunks_with_ddp", _with_slots_hidden, required=False)
    _rebind([dist_utils], "_ddp_wrap", _with_slots_hidden, required=False)
    _rebind([training], "get_megatron_optimizer", _get_megatron_optimizer)
    _rebind([training], "finalize_model_grads", _finalize_model_grads)
    _rebind([training], "train_step", _train_step)
    _rebind([training], "training_log", _training_log)
    _rebind([checkpointing, training], "save_checkpoint", _save_checkpoint)
    _rebind([checkpointing, training], "load_checkpoint", _load_checkpoint)
    _rebind([checkpointing], "_build_sharded_state_dict_metadata", _sharded_metadata)
    startup.hide_unknown_mlp_notice(_active)
    training._swiftmoe_installed = True


__all__ = ["install"]
