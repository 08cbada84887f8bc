"""Cost model and cluster simulator: what each MoE training strategy costs per iteration.

A model, with its assumptions stated below, not a measurement. Given a model shape
(:func:`load_model`: a training config or a built-in public shape), a cluster
(:func:`get_cluster`) and routing (a recorded trace, :func:`load_trace`, or a synthetic
workload, :func:`make_workload`), :func:`simulate` replays the expert popularity under each
strategy and models every iteration's time, its parts (exposed and hidden) and the bytes moved.
:func:`compare` runs the comparison tables. Command lines::

    python -m megatron_swiftmoe.sim --trace METRICS.jsonl --cluster paper-a100-16 \
        --config configs/gpt_small_moe.yaml [--json]
    python -m megatron_swiftmoe.sim --workload skew --config mixtral-8x7b --cluster h100-256
    python -m megatron_swiftmoe.sim --workloads all --models mixtral-8x7b,qwen3-30b-a3b,deepseek-v3 \
        --clusters h100-64,h100-256,h100-1024

Strategies (per MoE layer):

* ``static`` / ``static-ep<K>``: Megatron-Core static expert parallelism, dropless. EP = K, or
  ``--static-ep``, or gcd(E, N) (the largest degree dividing both; EP = N when N divides E), and
  D = N / EP copies of each expert (expert data parallelism, Megatron's MoE parallel folding).
  Rank r hosts experts ``[(r % EP) E/EP, (r % EP + 1) E/EP)``; its tokens go to the hosts in its
  EP group (ranks ``r // EP * EP ...``: consecutive ranks, inside one node when EP <= 8). With
  D = 1 an expert's optimizer state lives on its one host, so expert grads and params never move.
  What users run (:func:`megatron_swiftmoe.sim.compare.users_ep`): the Megatron-Core MoE guide
  tells them to keep EP x TP inside one NVLink node and to scale across nodes with PP, so EP =
  min(E, 8) on 8-GPU nodes; DeepSeek-V3's own recipe spans nodes (EP 64). The comparison shows
  both that and the experts spread (EP = gcd(E, N)).
* ``deepspeed`` / ``deepspeed-ep<K>``: the same layout with DeepSpeed-MoE's capacity factor.
* ``flexmoe-K``: N*S replicas (S slots per rank, like SwiftMoE) re-planned every K iterations
  from the popularity summed since the last re-plan; every replica keeps full optimizer state
  (so moved replicas migrate it) and replicas' gradients are all-reduced.
* ``swiftmoe``: what ``SwiftMoELayer`` + ``SwiftMoEOptimizer`` do: the placement of iteration i
  is ``plan_placement`` of iteration i-1's popularity (uniform for the first) with the model's
  rule (``load_counts``, the default, or the paper's ``replica_counts``; then ``place`` or
  ``place_contiguous``), dropless, optimizer state statically sharded over all N ranks, the
  replica group all N ranks (TP x CP x DP of the stage).

Notation: N GPUs, G per node, E experts, k top-k, S slots per rank, B global batch
(sequences), s sequence length, b micro-batch, M = B / (N b) micro-batches per rank, h hidden
size, P_e parameters per expert, P_d dense (non-expert) parameters, w bytes per model
parameter (2 for bf16/fp16, 4 for fp32), L MoE layers, R = peak FLOP/s x MFU, BW_intra /
BW_inter the per-GPU bandwidths inside / across nodes, alpha(.) latencies (below).

Routing input. A trace may come from another cluster size: iteration i, layer l keeps its
popularity shares, T_e = n_e / sum(n) x B s k pairs at the modelled batch; placements are
re-planned for the target N and S from the raw counts n. A trace (or workload) with fewer
layers than the model is stretched (model MoE layer j replays trace layer j * L_trace // L).
Each rank is assumed to route like the whole batch (rank r sends T_e / N pairs to expert e),
and every micro-batch like its iteration: per-source skew is not modelled. Synthetic workloads
(``workloads.py``, its docstring gives each family's public description): round robin, uniform,
a hot block of max(k, E/4) experts taking 3/4 of the pairs (consecutive or spread), every other
expert, half the experts, a hot block moving every 5 iterations, a hot burst every 10
iterations, and ``skew``: log-normal popularity calibrated to the static-EP rank max/mean load
reported for Mixtral-shaped training on 32 GPUs (1.65 median, 2.0-2.3 p90).

Per MoE layer and micro-batch (one rank's compute stream):

1. Expert compute: forward 2 x max_r load_r / M x P_e / R, backward twice that (Kaplan et al.
   2020, Sec. 2.1; Narayanan et al. 2021). load_r = pairs rank r computes in the iteration:
   static sum_{e on r} T_e / D; deepspeed E x C (padded buffers); flexmoe / swiftmoe sum over
   r's slots of kept_e / r_e (the equal-share split over an expert's replicas: an upper bound on
   what SwiftMoE's default ``rank`` split gives, which only lowers the busiest rank). Every layer
   waits for its busiest rank (the all-to-all is a barrier).
2. Token all-to-all: 4 per micro-batch (dispatch and combine, forward and backward), each
   alpha_a2a + max_r max(X_r^intra / BW_intra, X_r^inter / BW_inter), always on the critical
   path (Megatron overlaps it only with --overlap-moe-expert-parallel-comm under pipeline
   parallelism, not modelled). Rank r first serves its own pairs (the split's local-first rule):
   it sends max(0, T_e/N - held_re) and receives max(0, held_re - T_e/N) pairs of e, the flows
   going from senders to receivers of e in proportion to the receivers' deficits (a fluid split,
   not node-aware, like the code's); X = max(sent, received) x h x w bytes to / from the same /
   other nodes (full-duplex links; NVLink/PCIe and the NIC work in parallel).
3. Count exchange (forward only; int64 counts): static, Megatron's alltoall dispatcher, an
   all-gather of each rank's [E] counts over the EP group; swiftmoe / flexmoe, ``--metadata``:
   ``new`` (default: what ``core/dispatcher.py`` does) the [2, E] totals and their prefix over
   ranks (a butterfly of ceil(log2 N) point-to-point rounds, modelled as a tree all-reduce of
   that size) + an all-reduce of the zero-padded N S per-pool counts (tree latency) + an
   all-to-all of one send count per peer, all over the N ranks; ``new-allgather`` the per-pool
   counts as an all-gather of S per rank instead (ring latency, O(N)); ``current`` the
   all-gather of every rank's [2, E] counts that the dispatcher made before issue 17. Each collective: NCCL's latency of the faster protocol (below) + bytes
   over the link (LL protocol: a quarter of the rate).
4. Split: SwiftMoE plans each micro-batch's split on the host between the count exchange and
   the all-to-all: t_split per layer and micro-batch, on the critical path.

Per iteration:

5. Dense compute: per position (attention, dense MLP or router + shared experts, logits),
   forward 2 x (matmul parameters) + 4 s x attention width FLOPs per token, backward twice that
   (= (B s / N) x (6 P_dm + 12 L s h) / R for a dense GPT, Narayanan et al. 2021, Appendix).
6. Dense sync (Megatron's distributed optimizer, ZeRO-1): reduce-scatter of fp32 grads and
   all-gather of weights over N ranks, per DDP bucket: alpha_ring(N) + (N-1)/N x bucket x
   (4 | w) / BW_ring. Buckets: Megatron's default max(40M, 1M x N) parameters in reverse
   parameter order, one per run without overlap (``bucket_size`` None).
7. Expert sync: static with D > 1: the same, over the D ranks holding the same experts
   (Megatron's expert-data-parallel buckets of the same size); D = 1: nothing. swiftmoe: per
   layer, two all-to-alls (``core.optimizer.ExpertShards``): every rank sends shard q
   (ceil(P_e/N) fp32) of each of its U_r distinct experts to rank q (same-rank replicas summed
   first); each owner sends its updated shard (ceil(P_e/N) x w) to every rank holding the expert
   next iteration (U'_q distinct experts). flexmoe: ring all-reduce among each expert's holders.
8. Overlap windows (``overlap=True``, the default: Megatron users run --overlap-grad-reduce and
   --overlap-param-gather, and SwiftMoE's optimizer mirrors them). Modelled as one rank's
   timeline (``overlap.py``): gradients are reduced only on the last micro-batch (Megatron's
   ``no_sync``); a dense bucket's reduction is released when the backward has finished all its
   layers, a SwiftMoE layer's when its expert backward is done (static's expert buckets like
   dense ones), all waited for before the optimizer step, so the last layer's gradients have the
   whole remaining backward to hide behind and layer 0's almost none. After the step, Megatron's
   param all-gather is a chain (the forward pre-hook of a bucket waits for it and starts the
   next); SwiftMoE's re-placement of every layer is issued at once (``replacement='all'``, each
   layer's forward pre-hook waits for its own) or as a one-layer chain (``'chain'``); the first
   forward micro-batch waits where a transfer is late, so layer L's re-placement hides behind the
   forward of layers 0..L-1 and layer 0's has only the embedding in front of it. Assumptions:
   a rank's background transfers are served one at a time, earliest-needed first, without
   preemption (one link, one transfer; concurrent NCCL streams would share the bandwidth
   instead); a transfer pauses during a token all-to-all on the same link class (intra- or
   inter-node) and runs beside compute; compute and communication share nothing else (SMs, HBM):
   ``overlap_slowdown`` F charges F x hidden seconds as exposed. Exposed time = stalls of the
   compute stream (waiting before the step, or at a forward pre-hook); hidden = the rest. The
   re-placement after step i is charged to iteration i with iteration i's forward timings
   (steady state). ``overlap=False``: every transfer exposed, after backward.
9. Planning: SwiftMoE plans each layer's next placement (counts + placement) on the host;
   t_plan and t_split are ``measure_planning(N, E, S)`` of the default path on this run's own N,
   E, S (wall-clock medians on *this* CPU; a loaded machine inflates them; ``--planning-ms``
   replaces t_plan and zeroes t_split). With overlap the plans are made while the last
   micro-batch's backward runs (the popularity is final after its forward): exposed =
   max(0, L t_plan - that backward's time), assuming the host has idle time while the GPU runs
   the backward; without, L t_plan. The split, M L t_split, is always exposed. FlexMoE: L
   t_plan on re-plan iterations.
10. Optimizer step: AdamW streams grad, master, m, v in and master, m, v, weights out:
    28 + w bytes per owned parameter (28 in fp32) / HBM bandwidth. Owned: P_d / N, plus per
    layer static (E/EP) P_e / D, swiftmoe E ceil(P_e / N), flexmoe S P_e (full state per replica).
11. Migration (flexmoe re-plan iterations): new counts = ``replica_counts`` of the window
    popularity, reached by the fewest moves (``replan_min_moves``). Every (rank, expert) newly
    held receives P_e x (w + 12) bytes = 14 bytes/param in bf16 (weights 2 + fp32 master 4 +
    Adam m 4 + v 4; ZeRO, Rajbhandari et al. 2020, Sec. 3.1), from a holder in the same node if
    there is one; all layers in one exposed transfer (``migration_peak_gb``: the extra copy).

Iteration time = M x (forward + backward compute, token all-to-alls, count exchanges, splits)
+ exposed gradient sync + optimizer step + exposed parameter sync + exposed planning +
migration. ``parts_ms`` holds the exposed parts (they sum to the total), ``hidden_ms`` and
``comm_ms`` what overlap hid.

Capacity and dropping: deepspeed keeps C = M x max(ceil(cf k b s / E), 4) pairs per (rank,
expert) per iteration (DeepSpeed-MoE ``top1gating``/``topkgating``, ``min_capacity`` 4),
kept = sum_e N min(T_e/N, C); its compute and all-to-all use the padded C. flexmoe (and
swiftmoe with a capacity factor) keep min(T_e, cap_e), cap_e = r_e x cf x B s k / (N S).

Latencies (NCCL's cost model, ``src/graph/tuning.cc``; see ``cluster.py``): alpha_ring(n over m
nodes) = base + (n - m) hop_intra + (m - 1) hop_inter (Simple: base 8.4 us, hop 3.4 NVLink /
5.7 PCIe / 14.0 network; LL for tiny messages: 6.6 us, 0.6 / 1.0 / 2.7 us, the intra hop x 1.8
across nodes); tiny all-reduces take the faster of the LL ring and the LL tree (6.8 us +
2 ((n/m - 1) 0.6 + log2(m) 5.0) us); alpha_a2a = base + one hop (network if any bytes cross
nodes), a lower bound: per-peer costs of all-to-alls over hundreds of ranks are not modelled,
which flatters SwiftMoE's N-rank all-to-alls against static's EP-rank ones. BW_ring = BW_inter
if the ring spans nodes, else BW_intra. BW_inter = min(NIC, PCIe). Spec-sheet rates: real NCCL
bus bandwidth is 80-95 % of them.

Memory per rank (weights + fp32 grads + optimizer state, no activations): dense
P_d (w + 4) + ceil(P_d/N) 12; per layer static (E/EP) P_e (w + 4) + (E/EP) P_e / D x 12,
swiftmoe S P_e (w + 4) + E ceil(P_e/N) x 12, flexmoe S P_e (w + 4 + 12) + migration peak
(12 becomes 8 for fp32 models). Without tensor / pipeline parallelism every rank holds all
dense parameters, which DeepSeek-V3 could not fit: its rows compare times, not feasibility.

Bytes reported per iteration: grads = size of the buffers reduced (each rank's send buffer,
its own shard included: ``bytes_sent`` of our optimizer), params = size of the buffers
gathered (each rank's receive buffer, own shard included). In these units static (D > 1) and
swiftmoe move S N G gradient and S N W parameter bytes when S = E / EP and no rank holds two
replicas of one expert: the paper's identity. ``wire_bytes`` are the bytes that leave a rank.

Constants (``cluster.py`` for the hardware, with their spec-sheet sources): MFU default 0.4,
within the range reported for well-tuned training (44-52 % of peak for Megatron-LM GPT
1.7B-1T on A100, Narayanan et al. 2021, Table 1; 46.2 % PaLM, 30.2 % MT-NLG, Chowdhery et al.
2022, Table 3), the same for expert and dense GEMMs. A measurement on *this* CPU does not
transfer to GPUs, so compute is calibrated from a trace recorded on the target cluster
(:func:`calibrate_mfu`, ``--calibrate``) or set with ``--mfu``.

Not modelled: tensor / pipeline / context parallelism (and so pipeline bubbles and
--overlap-moe-expert-parallel-comm), activation memory and recomputation, CPU optimizer
offload (the paper's), GEMM efficiency falling with fewer tokens per expert, congestion beyond
per-GPU link rates, the host-device synchronisations both dispatchers make.
"""

from megatron_swiftmoe.sim.cluster import CLUSTERS, Cluster, cluster_names, get_cluster, load_cluster
from megatron_swiftmoe.sim.compare import CompareSettings, compare
from megatron_swiftmoe.sim.cost import PARTS, STRATEGIES, calibrate_mfu, measure_planning, replan_min_moves, simulate
from megatron_swiftmoe.sim.model import ModelShape, load_model
from megatron_swiftmoe.sim.report import format_report
from megatron_swiftmoe.sim.trace import Trace, load_trace
from megatron_swiftmoe.sim.workloads import WORKLOADS, make_workload

__all__ = [
    "simulate", "calibrate_mfu", "measure_planning", "replan_min_moves", "STRATEGIES", "PARTS",
    "Cluster", "CLUSTERS", "cluster_names", "get_cluster", "load_cluster",
    "ModelShape", "load_model", "Trace", "load_trace", "format_report",
    "WORKLOADS", "make_workload", "CompareSettings", "compare",
]

