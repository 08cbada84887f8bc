"""Pretrain a GPT-MoE model with Megatron-Core, with SwiftMoE (``--swiftmoe``) or the static baseline.

Launch with torchrun (or srun), Megatron-LM flag names::

    torchrun --nproc-per-node 2 -m megatron_swiftmoe.pretrain_gpt --config configs/tiny_cpu.yaml

GPU + NCCL when CUDA is present, CPU + gloo otherwise. ``--pipeline-model-parallel-size P``
stages (Megatron's 1F1B schedule), each a data-parallel group of N = world / P ranks (TP = 1);
each stage's experts are replicated per iteration over its N ranks (SwiftMoE) or partitioned E/N
per rank (baseline).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import logging
import math
import os
import random
import sys
import time
import warnings
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist

from megatron_swiftmoe.core import compat


# --------------------------------------------------------------------------- setup


def initialize_distributed(args: argparse.Namespace) -> None:
    """Process group from torchrun's environment (a single process works without torchrun)."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(
        backend=compat.default_backend(),
        rank=args.rank,
        world_size=args.world_size,
        timeout=datetime.timedelta(minutes=args.distributed_timeout_minutes),
    )
    compat.apply()
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        expert_model_parallel_size=1 if args.swiftmoe else args.data_parallel_size,
        distributed_timeout_minutes=args.distributed_timeout_minutes,
    )


def set_random_seed(seed: int) -> None:
    """Megatron-LM's ``_set_random_seed`` (TP = 1): Python, numpy, torch and Megatron's
    model-parallel RNG tracker, the same seed on every data-parallel rank, ``seed + 100 *
    pipeline rank`` on each pipeline stage."""
    from megatron.core import parallel_state

    seed += 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    compat.manual_seed(seed)


def log0(*values: Any) -> None:
    if dist.get_rank() == 0:
        print(*values, flush=True)


def build_data(args: argparse.Namespace):
    """Tokenizer and train/valid datasets: --data-path, --mock-data, or the built-in corpus."""
    from megatron_swiftmoe.training import data

    eval_runs = args.train_iters // args.eval_interval + 1 if args.eval_iters else 0
    samples = [args.train_iters * args.global_batch_size, eval_runs * args.eval_iters * args.global_batch_size, 0]
    if args.mock_data:
        return data.build_mock_datasets(args.vocab_size, args.seq_length, samples, args.seed)
    if args.data_path:
        prefix, tokenizer_model = args.data_path[0], args.tokenizer_model
    else:
        log0("> no --data-path: using the built-in corpus (Python standard library sources)")
        prefix, tokenizer_model = data.prepare_default_data(args.data_cache_path, args.vocab_size)
    tokenizer = data.load_tokenizer(tokenizer_model)
    train, valid, _ = data.build_gpt_datasets(
        prefix, tokenizer, args.seq_length, args.split, *samples, seed=args.seed, cache_dir=args.data_cache_path
    )
    return tokenizer.vocab_size, train, valid


def stage_batch_keys() -> tuple[str, ...]:
    """What this pipeline stage reads of a sample: the first stage the input, the last the
    targets (one stage: both; a middle stage: nothing, its input comes from the previous stage)."""
    from megatron.core import parallel_state

    return (("tokens", "position_ids") if parallel_state.is_pipeline_first_stage() else ()) + (
        ("labels", "loss_mask") if parallel_state.is_pipeline_last_stage() else ())


def micro_batches(dataset, args: argparse.Namespace, iteration: int, device, dp_rank: int,
                  keys: tuple[str, ...]) -> Iterator[dict[str, torch.Tensor]]:
    """This data-parallel rank's micro-batches of one iteration, ``keys`` of each sample:
    sample ``it*GB + (m*DP + dp_rank)*MB + j``.

    Position depends only on the iteration, so a resumed run reads exactly what the
    uninterrupted run would have read.
    """
    dp, mbs = args.data_parallel_size, args.micro_batch_size
    for micro in range(args.global_batch_size // (dp * mbs)):
        first = iteration * args.global_batch_size + (micro * dp + dp_rank) * mbs
        items = [dataset[first + j] for j in range(mbs)] if keys else []
        yield {key: torch.stack([torch.as_tensor(item[key]) for item in items]).to(device) for key in keys}


def forward_step(data_iterator, model):
    """Megatron schedule callback: model output and the loss function for one micro-batch
    (on a pipeline stage the batch holds what :func:`stage_batch_keys` names; the rest is None)."""
    batch = next(data_iterator)
    output = model(batch.get("tokens"), batch.get("position_ids"), None, labels=batch.get("labels"))
    return output, functools.partial(masked_mean_loss, batch.get("loss_mask"))


def masked_mean_loss(loss_mask: torch.Tensor, losses: torch.Tensor):
    mask = loss_mask.float().view(-1)
    loss = (losses.float().view(-1) * mask).sum() / mask.sum().clamp(min=1)
    # clone: the schedule divides the returned loss in place by the number of micro-batches.
    return loss, {"lm loss": loss.detach().clone()}


# --------------------------------------------------------------------------- state


def rng_state() -> dict[str, Any]:
    """Every generator's state, as tensors and plain containers (checkpoints load with weights_only)."""
    from megatron.core import tensor_parallel

    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [name, keys.tolist(), position, has_gauss, cached_gaussian],
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


# --------------------------------------------------------------------------- training


class Trainer:
    """Model, optimizer, schedule and reporting of one run."""

    def __init__(self, args: argparse.Namespace):
        from megatron.core import parallel_state
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from megatron_swiftmoe.training.agreement import agree
        from megatron_swiftmoe.training.arguments import padded_vocab_size, print_args, transformer_config_from_args
        from megatron_swiftmoe.training.model import build_model, moe_layers
        from megatron_swiftmoe.training.monitor import MetricsWriter, MoELoadMonitor
        from megatron_swiftmoe.training.savelock import take_save_lock
        from megatron_swiftmoe.core.optimizer import DynamicLossScaler, SwiftMoEOptimizer

        self.args = args
        if dist.get_rank() == 0:
            print_args(args)
        # Before anything is written: a second run on this --save directory stops here.
        self.save_lock = take_save_lock(args.save, dist.get_rank() == 0, log0)
        self.device = compat.default_device()
        vocab_size, self.train_data, self.valid_data = build_data(args)
        args.padded_vocab_size = padded_vocab_size(vocab_size, args)
        self.config = transformer_config_from_args(args)
        set_random_seed(args.seed)  # Megatron's initialisation draws from these generators (and the tracker)
        self.model = build_model(args, self.config, args.padded_vocab_size).to(self.device)
        scaler = (
            DynamicLossScaler(args.initial_loss_scale, args.loss_scale_window, args.min_loss_scale)
            if args.fp16 else None
        )
        self.optimizer = SwiftMoEOptimizer(
            self.model, lr=args.lr, weight_decay=args.weight_decay, betas=(args.adam_beta1, args.adam_beta2),
            eps=args.adam_eps, clip_grad=args.clip_grad, loss_scaler=scaler,
            overlap_grad_reduce=args.overlap_grad_reduce, overlap_param_gather=args.overlap_param_gather,
            timeout=datetime.timedelta(minutes=args.distributed_timeout_minutes),
        )
        if scaler:
            self.config.grad_scale_func = self.optimizer.scale_loss
        if args.overlap_grad_reduce:  # as Megatron-LM's train() wires its DDP
            self.config.no_sync_func = self.optimizer.no_sync
            self.config.grad_sync_func = self.optimizer.start_grad_sync
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0, max_lr=args.lr, min_lr=args.min_lr,
            lr_warmup_steps=args.lr_warmup_iters, lr_decay_steps=args.lr_decay_iters,
            lr_decay_style=args.lr_decay_style, start_wd=args.weight_decay, end_wd=args.weight_decay,
            wd_incr_steps=args.train_iters, wd_incr_style="constant",
            wsd_decay_steps=getattr(args, "lr_wsd_decay_iters", None),
            lr_wsd_decay_style=getattr(args, "lr_wsd_decay_style", None),
        )
        self.forward_backward = get_forward_backward_func()  # 1F1B with pipeline stages
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.batch_keys = stage_batch_keys()
        self.pipeline_group = parallel_state.get_pipeline_model_parallel_group()
        self.moe_layers = moe_layers(self.model)  # this stage's
        self.monitor = MoELoadMonitor(
            self.moe_layers, group=parallel_state.get_data_parallel_group(), pipeline_group=self.pipeline_group)
        self.iteration = 0
        # The weights come from name-keyed seeds (model.py), but building SwiftMoE and stock MoE
        # layers draws differently from the generators: seed them again, so that both strategies
        # draw the same dropout masks.
        set_random_seed(args.seed)
        if args.load:
            self.load()
        resume = self.iteration > 0
        self.metrics = agree("opening the metrics", lambda: MetricsWriter(args, dist.get_rank() == 0, resume))
        num_params = sum(p.numel() for p in self.model.parameters())
        stages = (f"{args.pipeline_model_parallel_size} pipeline stages x {args.data_parallel_size} data-parallel "
                  "ranks" if args.pipeline_model_parallel_size > 1 else f"{args.world_size} ranks")
        kernel = self.moe_layers[0].experts.kernel(self.device) if args.swiftmoe and self.moe_layers else None
        log0(f"> model: {num_params / 1e6:.2f}M parameters on this rank, "
             f"{'SwiftMoE' if args.swiftmoe else 'static expert parallelism'}, {stages}, {self.device}"
             + (f"; expert slots: {kernel.describe()}" if kernel else ""))

    # ---- checkpoints

    def state(self) -> dict[str, Any]:
        from megatron_swiftmoe.training.model import unwrap

        return {
            "iteration": self.iteration,
            "model": unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(),
        }

    def save(self) -> None:
        from megatron_swiftmoe.training.checkpointing import save_checkpoint

        self.optimizer.finish_param_sync()  # no transfer in flight while saving
        start = time.time()
        guard = self.save_lock.verify if self.save_lock else None
        path = save_checkpoint(self.args.save, self.iteration, self.args, self.state(), guard=guard)
        log0(f"> saved checkpoint {path} ({time.time() - start:.1f}s)")

    def load(self) -> None:
        from megatron_swiftmoe.training.agreement import agree
        from megatron_swiftmoe.training.checkpointing import load_checkpoint
        from megatron_swiftmoe.training.model import unwrap

        args = self.args
        loaded = load_checkpoint(args.load, args, fallback=args.load_fallback)
        if loaded is None:
            log0(f"> --load {args.load}: no checkpoint there yet, starting from scratch")
            return
        iteration, state = loaded

        def restore() -> None:
            unwrap(self.model).load_state_dict(state["model"])
            optimizer_state = state["optimizer"]
            if args.finetune or args.no_load_optim:
                # SwiftMoE's expert weights live in the master shards: keep them, reset AdamW.
                optimizer_state = {**optimizer_state, "adamw": self.optimizer.adamw.state_dict(), "loss_scaler": None}
            self.optimizer.load_state_dict(optimizer_state)
            if not args.finetune:
                self.scheduler.load_state_dict(state["scheduler"])
                if not args.no_load_rng:
                    set_rng_state(state["rng"])

        agree(f"--load {args.load}: restoring iteration {iteration}", restore)
        if not args.finetune:
            self.iteration = iteration
        log0(f"> loaded checkpoint {args.load} at iteration {iteration}"
             + (" (finetune: iteration reset to 0)" if args.finetune else ""))

    # ---- steps

    def run_microbatches(self, dataset, iteration: int, forward_only: bool) -> float:
        """Forward (and backward) over the iteration's micro-batches; the mean loss, on every rank."""
        args = self.args
        losses = self.forward_backward(
            forward_step_func=forward_step,
            data_iterator=micro_batches(dataset, args, iteration, self.device, self.dp_rank, self.batch_keys),
            model=self.model,
            num_microbatches=args.num_micro_batches,
            seq_length=args.seq_length,
            micro_batch_size=args.micro_batch_size,
            forward_only=forward_only,
        )
        # Only the last pipeline stage has losses: the others add zeros.
        loss = torch.zeros(1, dtype=torch.float64, device=self.device)
        if losses:
            loss += torch.stack([item["lm loss"] for item in losses]).double().sum()
        dist.all_reduce(loss)
        return loss.item() / (args.data_parallel_size * args.num_micro_batches)

    def train_step(self) -> dict[str, Any]:
        from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

        from megatron_swiftmoe.training.model import allreduce_tied_embedding_grads

        self.model.train()
        self.optimizer.zero_grad()
        start = time.time()
        lm_loss = self.run_microbatches(self.train_data, self.iteration, forward_only=False)
        allreduce_tied_embedding_grads(self.model)
        routing_losses = self.routing_losses()
        clear_aux_losses_tracker()
        layers = self.monitor.collect()
        middle = time.time()
        stats = self.step_optimizer()
        self.scheduler.step(1)
        end = time.time()
        self.iteration += 1
        sent = {key: torch.tensor(value, dtype=torch.float64) for key, value in stats.bytes_sent.items()}
        sent = dict(zip(sent, self.all_reduce_sum(list(sent.values()))))
        sent["tokens"] = sum(layer["tokens_sent"] for layer in layers) * self.args.hidden_size * 2 * (
            torch.finfo(self.args.params_dtype).bits // 8)
        # Largest over ranks: the migration buffer, and the device memory peak (CUDA's allocator
        # statistics; 0 on the CPU, which keeps none).
        device_peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else 0
        peak = torch.tensor([stats.migration_peak_bytes, device_peak], dtype=torch.float64, device=self.device)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        return dict(
            iteration=self.iteration,
            consumed_samples=self.iteration * self.args.global_batch_size,
            lm_loss=lm_loss,
            **routing_losses,
            lr=self.optimizer.param_groups[0]["lr"],
            grad_norm=stats.grad_norm,
            skipped=stats.skipped,
            loss_scale=self.optimizer.loss_scaler.scale if self.optimizer.loss_scaler else 1.0,
            iter_time_s=end - start,
            time_forward_backward_s=middle - start,
            time_optimizer_s=end - middle,
            tokens_per_s=self.args.global_batch_size * self.args.seq_length / (end - start),
            bytes_sent={key: int(value) for key, value in sent.items()},
            migration_peak_bytes=int(peak[0].item()),
            peak_memory_bytes=int(peak[1].item()),
            layers=layers,
        )

    def step_optimizer(self):
        """The optimizer step; non-finite gradients (the same on every rank) stop the run."""
        from megatron_swiftmoe.core.optimizer import NonFiniteGradients
        from megatron_swiftmoe.training.agreement import AgreedError

        try:
            return self.optimizer.step()
        except NonFiniteGradients as error:
            raise AgreedError(error.at_iteration(self.iteration + 1)) from None

    def all_reduce_sum(self, values: list[torch.Tensor]) -> list[float]:
        if not values:
            return []
        packed = torch.stack(values).to(self.device)
        dist.all_reduce(packed)
        return packed.tolist()

    def routing_losses(self) -> dict[str, float]:
        """Mean per MoE layer and micro-batch of each router loss Megatron tracked (aux, z)."""
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

        tracker = get_moe_layer_wise_logging_tracker()
        names = sorted(tracker)
        if dist.get_world_size(self.pipeline_group) > 1:  # a stage without MoE layers tracks none
            stages: list[Any] = [None] * dist.get_world_size(self.pipeline_group)
            dist.all_gather_object(stages, names, group=self.pipeline_group)
            names = sorted(set().union(*stages))
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        totals = self.all_reduce_sum([tracker[name]["values"].sum().double() if name in tracker else zero
                                      for name in names])
        scale = sum(self.args.moe_layer_freq) * self.args.num_micro_batches * self.args.data_parallel_size
        return {name.replace("load_balancing_loss", "aux_loss"): total / scale for name, total in zip(names, totals)}

    def evaluate(self) -> float:
        self.optimizer.finish_param_sync()
        self.model.eval()
        with torch.no_grad():
            losses = [
                self.run_microbatches(self.valid_data, self.iteration // self.args.eval_interval * self.args.eval_iters + i,
                                      forward_only=True)
                for i in range(self.args.eval_iters)
            ]
        self.model.train()
        return sum(losses) / len(losses)

    # ---- loop

    def log(self, record: dict[str, Any], window: list[dict[str, Any]]) -> None:
        from megatron_swiftmoe.training.monitor import load_line

        args = self.args
        if record["iteration"] % args.log_interval == 0:
            mean = lambda key: sum(r[key] for r in window) / len(window)  # noqa: E731
            routing = " | ".join(f"{k.replace('_', ' ')}: {mean(k):.4E}" for k in sorted(record)
                                 if k.endswith("_loss") and k not in ("lm_loss", "valid_lm_loss"))
            log0(
                f" iteration {record['iteration']:8d}/{args.train_iters:8d} |"
                f" consumed samples: {record['consumed_samples']:12d} |"
                f" elapsed time per iteration (ms): {1000 * mean('iter_time_s'):.1f} |"
                f" learning rate: {record['lr']:.6E} | global batch size: {args.global_batch_size:5d} |"
                f" lm loss: {mean('lm_loss'):.6E} | {routing + ' | ' if routing else ''}"
                f"grad norm: {mean('grad_norm'):.3f} | tokens per second: {mean('tokens_per_s'):.0f} |"
                f" number of skipped iterations: {sum(r['skipped'] for r in window):3d} |"
            )
            window.clear()
        if record["iteration"] % args.log_load_interval == 0:
            for index, layer in enumerate(record["layers"]):
                log0(load_line(index, layer))

    def train(self) -> None:
        from megatron_swiftmoe.training.agreement import AgreedError, agree
        from megatron_swiftmoe.training.monitor import Progress

        args = self.args
        progress = Progress(args.train_iters, self.iteration, enabled=dist.get_rank() == 0 and not args.no_progress)
        window: list[dict[str, Any]] = []
        log0(f"> training from iteration {self.iteration} to {args.train_iters}")
        while self.iteration < args.train_iters:
            record = self.train_step()
            if not math.isfinite(record["lm_loss"]):  # all-reduced: every rank stops here
                self.optimizer.finish_param_sync()
                raise AgreedError(f"lm loss is {record['lm_loss']} at iteration {record['iteration']}; "
                                  "lower --lr or use --clip-grad")
            window.append(record)
            progress.clear()
            if args.eval_iters and self.valid_data is not None and self.iteration % args.eval_interval == 0:
                record["valid_lm_loss"] = self.evaluate()
                log0(f" validation loss at iteration {self.iteration}: lm loss {record['valid_lm_loss']:.6E}")
            self.metrics.write(record)
            self.log(record, window)
            progress.update(self.iteration, record["lm_loss"])
            if args.save and args.save_interval and self.iteration % args.save_interval == 0:
                self.save()
            if args.exit_interval and self.iteration % args.exit_interval == 0:
                log0(f"> exiting at iteration {self.iteration} (--exit-interval)")
                break
        self.optimizer.finish_param_sync()  # every transfer done before the last save and exit
        progress.clear()
        if args.save and (not args.save_interval or self.iteration % args.save_interval):
            self.save()
        agree("closing the metrics", self.metrics.close)  # rank 0's file: the last step that can fail on one rank
        if self.save_lock:
            self.save_lock.release()
        log0(f"> done: {self.iteration} iterations; metrics in {args.metrics_path}")


def quiet_megatron_notices() -> None:
    """Drop notices that are expected here: optional GPU extras missing, our MoE layer's spec."""
    warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex|apex|TE) .*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=r"moe_ffn_hidden_size is not set|full scope is deprecated")
    # torch 2.13 renames *_into_tensor collectives; older torch (e.g. on GPU images) lacks the new names.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")

    class _NoUnknownMlp(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "Unknown MLP type" not in record.getMessage()  # SwiftMoELayer is a MoELayer

    logging.getLogger("megatron.core.transformer.transformer_layer").addFilter(_NoUnknownMlp())


def is_collective_failure(error: BaseException) -> bool:
    """A collective that timed out or lost a peer (NCCL: DistError; gloo: its transport's RuntimeError)."""
    return isinstance(error, dist.DistError) or (isinstance(error, RuntimeError) and "gloo" in str(error))


def main(argv: list[str] | None = None) -> None:
    quiet_megatron_notices()
    from megatron_swiftmoe.training.agreement import AgreedError
    from megatron_swiftmoe.training.arguments import parse_args

    args = parse_args(argv)  # every setting is checked before any process-group work
    initialize_distributed(args)
    try:
        Trainer(args).train()
    except AgreedError as error:  # raised on every rank at once: print it once, every rank exits non-zero
        if dist.get_rank() == 0:
            print(f"error: {error}", file=sys.stderr, flush=True)
        dist.destroy_process_group()
        sys.exit(1)
    except Exception as error:
        # This rank alone: no collective here (the others may be waiting in one, or gone). Exit now;
        # torchrun ends the other ranks, or their collective fails or times out.
        if not is_collective_failure(error):
            raise
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"error: rank {dist.get_rank()}: a collective operation failed: {message}\n"
              "  Another rank has most likely failed first (see its error) or stopped answering: a rank waits "
              f"for the others at most --distributed-timeout-minutes ({args.distributed_timeout_minutes:g}).",
              file=sys.stderr, flush=True)
        sys.exit(1)
    # Every rank has passed its last collective (the agreement at the end of training).
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
