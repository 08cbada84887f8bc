"""Cost model and cluster simulator: what each MoE training strategy costs per iteration.

Given a model shape (:func:`load_model`), a cluster (:func:`get_cluster`) and a routing trace
(:func:`load_trace`, a ``pretrain_gpt --metrics-path`` file), :func:`simulate` replays the
trace's expert popularity under each strategy and models the time of every iteration, its
parts and the bytes moved. Command line::

    python -m megatron_swiftmoe.sim --trace METRICS.jsonl --cluster paper-a100-16 \\
        --config configs/gpt_small_moe.yaml [--json]

Strategies (per MoE layer):

* ``static``: Megatron-Core static expert parallelism, dropless. EP = gcd(E, N) (the largest
  degree dividing both; EP = N when N divides E) and D = N / EP copies of each expert (expert
  data parallelism, Megatron's layout when N > E). Rank r hosts experts
  ``[(r % EP) E/EP, (r % EP + 1) E/EP)``; its tokens go to the hosts in its EP group (ranks
  ``r // EP * EP ...``). With D = 1 an expert's optimizer state lives on its one host (our
  optimizer: ``allreduce=False``), so expert grads and params never move.
* ``deepspeed``: the same layout with DeepSpeed-MoE's capacity factor and token dropping.
* ``flexmoe-K``: N*S replicas (S slots per rank, like SwiftMoE) re-planned every K iterations
  from the popularity summed since the last re-plan; every replica keeps full optimizer state
  (so moved replicas migrate it) and replicas' gradients are all-reduced.
* ``swiftmoe``: what ``SwiftMoELayer`` + ``SwiftMoEOptimizer`` do: the placement of iteration i
  is ``plan_placement`` (``replica_counts`` + ``place``, or ``place_contiguous``) of iteration
  i-1's popularity (uniform for the first), dropless, pairs split evenly over replicas;
  optimizer state statically sharded over all N ranks.

Notation: N GPUs, G per node, E experts, k top-k, S slots per rank, B global batch
(sequences), s sequence length, b micro-batch, M = B / (N b) micro-batches per rank, h hidden
size, P_e parameters per expert, P_d dense (non-expert) parameters, w bytes per model
parameter (2 for bf16/fp16, 4 for fp32), L MoE layers, R = peak FLOP/s x MFU, BW_intra /
BW_inter the per-GPU bandwidths inside / across nodes, alpha(.) latencies (below).

Trace scaling. A trace may come from another cluster size: iteration i, layer l keeps its
popularity shares, T_e = n_e / sum(n) x B s k pairs at the modelled batch; placements are
re-planned for the target N and S from the raw counts n (``replica_counts`` is
scale-invariant). A trace with fewer layers than the model is stretched (model MoE layer j
replays trace layer j * L_trace // L). Each rank is assumed to route like the whole batch:
rank r sends T_e / N pairs to expert e (the trace holds global counts only).

Per MoE layer and iteration:

1. Expert compute = 6 x max_r load_r x P_e / R: 2 FLOPs per multiply-add forward, twice that
   backward (Kaplan et al. 2020, "Scaling laws", Sec. 2.1; Narayanan et al. 2021). load_r =
   pairs rank r computes: static sum_{e on r} T_e / D; deepspeed E x C (padded buffers);
   flexmoe / swiftmoe sum over r's slots of kept_e / r_e (``placement.rank_loads``; r_e replicas).
2. Token all-to-all = 4 x [M alpha_a2a + max_r max(X_r^intra / BW_intra, X_r^inter / BW_inter)]
   + M alpha_meta: dispatch and combine, forward and backward, once per micro-batch. Rank r
   first serves its own pairs (``split_plan``'s local-first rule): it sends
   max(0, T_e/N - held_re) and receives max(0, held_re - T_e/N) pairs of e, the flows going
   from senders to receivers of e in proportion to the receivers' deficits (a fluid
   ``split_plan``); X^intra / X^inter = max(sent, received) x h x w bytes to / from the same /
   other nodes (full-duplex links; NVLink/PCIe and the NIC work in parallel). alpha_meta: the
   per-micro-batch count exchange, an LL-protocol ring all-gather over the EP group (static),
   all N ranks (flexmoe, swiftmoe: the dispatcher's ``all_gather_into_tensor`` of counts), none
   for deepspeed (fixed-size buffers).
3. Expert gradient + parameter sync:
   static / deepspeed with D > 1: ZeRO reduce-scatter of fp32 grads + all-gather of weights
   over the D ranks holding the same experts, each alpha_ring(D) + (D-1)/D x (E/EP) P_e bytes
   / BW_ring; D = 1: nothing.
   swiftmoe: two all-to-alls (``core.optimizer.ExpertShards``): every rank sends shard q
   (ceil(P_e/N) fp32) of each of its U_r distinct experts to rank q (same-rank replicas summed
   first); each owner sends its updated shard (ceil(P_e/N) x w) to every rank holding the expert
   next iteration (U'_q distinct experts). Time as in 2 with one alpha_a2a each.
   flexmoe: ring all-reduce of the fp32 grads among the m_e ranks holding e:
   tau_e = alpha_ring_allreduce(m_e) + 2 (m_e-1)/m_e x 4 P_e / BW_ring; time max_r sum_{e on r} tau_e.
4. Migration (flexmoe re-plan iterations): new counts = ``replica_counts`` of the window
   popularity, reached by the fewest moves (``replan_min_moves``: kept replicas stay). Every
   (rank, expert) newly held receives P_e x (w + 12) bytes = 14 bytes/param in bf16 (weights
   2 + fp32 master 4 + Adam m 4 + v 4; ZeRO, Rajbhandari et al. 2020, Sec. 3.1), from a holder
   in the same node if there is one. All layers move in one transfer that stalls the re-plan
   iteration: alpha_a2a + max_r max(intra / BW_intra, inter / BW_inter) (receive side). The
   moved state is an extra copy in memory while in flight (``migration_peak_gb``).

Per iteration (all strategies alike unless stated):

5. Dense compute = (B s / N) x (6 P_dm + 12 n_layers s h) / R, P_dm = 4h^2 per layer
   (attention) + dense MLPs + routers E h + logits V h (Narayanan et al. 2021, Appendix:
   72 B s l h^2 (1 + s/(6h) + V/(12 l h)) for a dense GPT).
6. Dense sync (ZeRO-1, ``optimizer._DenseShard``): reduce-scatter of fp32 grads + all-gather
   of weights over N ranks: alpha_ring(N) + (N-1)/N x ceil(P_d/N) N x (4 | w) / BW_ring.
7. Optimizer step: AdamW streams grad, master, m, v in and master, m, v, weights out:
   28 + w bytes per owned parameter (28 in fp32) / HBM bandwidth. Owned: P_d / N, plus per layer
   static (E/EP) P_e / D, swiftmoe E ceil(P_e / N), flexmoe S P_e (full state per replica).
8. Planning: swiftmoe L x (t_plan + M t_split), t_plan = ``replica_counts`` + ``place`` and
   t_split = ``rank_plan`` timed on this CPU (one thread, median of 5) for the cluster's N, E, S
   (the paper measured 0.7-1.1 % of an iteration for its planning and metadata); flexmoe
   L x t_plan on re-plan iterations. ``planning_s`` / ``--planning-ms`` replaces the measurement.

Iteration time = sum of all parts: no overlap is modelled (Megatron can overlap the dense
gradient reduce-scatter with backward and all-to-alls with compute; we have no measurement
of how much), so times are upper bounds for a tuned system.

Capacity and dropping: deepspeed keeps C = M x max(ceil(cf k b s / E), 4) pairs per (rank,
expert) per iteration (DeepSpeed-MoE ``top1gating``/``topkgating``: ceil(tokens / E x cf x k),
``min_capacity`` 4), kept = sum_e N min(T_e/N, C); its compute and all-to-all use the padded C
(DeepSpeed dispatches dense ``[E, C, h]`` buffers). flexmoe (and swiftmoe with a capacity
factor) keep min(T_e, cap_e), cap_e = r_e x cf x B s k / (N S): capacity per replica.

Latencies (NCCL's cost model, ``src/graph/tuning.cc``): alpha_ring(n over m nodes) =
base + (n - m) hop_intra + (m - 1) hop_inter (reduce-scatter / all-gather; all-reduce
2(n-1) steps of which 2m cross nodes), Simple protocol: base 8.4 us, hop 3.4 (NVLink) / 5.7
(PCIe) / 14.0 (network) us; LL protocol for the count exchange: 6.6 us, 0.6 / 1.0 / 2.7 us.
alpha_a2a = base + one hop (network if any bytes cross nodes), a lower bound.
BW_ring = BW_inter if the ring spans nodes, else BW_intra. BW_inter = min(NIC, PCIe).

Memory per rank (weights + fp32 grads + optimizer state, no activations): dense
P_d (w + 4) + ceil(P_d/N) 12; per layer static (E/EP) P_e (w + 4) + (E/EP) P_e / D x 12,
swiftmoe S P_e (w + 4) + E ceil(P_e/N) x 12, flexmoe S P_e (w + 4 + 12) + migration peak
(12 becomes 8 for fp32 models).

Bytes reported per iteration: grads = size of the buffers reduced (each rank's send buffer,
its own shard included: ``bytes_sent`` of our optimizer), params = size of the buffers
gathered (each rank's receive buffer, own shard included; the metrics file counts the dense
all-gather's input, 1/N of this). In these units static (D > 1) and swiftmoe move S N G
gradient and S N W parameter bytes when S = E / EP and no rank holds two replicas of one
expert: the paper's identity. ``wire_bytes`` are the bytes that leave a rank. Tokens and
migration are always off-rank bytes (tokens: all 4 all-to-alls; the metrics file counts the 2
forward ones).

Constants (``cluster.py`` for the hardware, with their spec-sheet sources): MFU default 0.4,
within the range reported for well-tuned training (44-52 % of peak for Megatron-LM GPT
1.7B-1T on A100, Narayanan et al. 2021, Table 1; 46.2 % PaLM, 30.2 % MT-NLG, Chowdhery et al.
2022, Table 3); smaller models and expert GEMMs with few tokens reach less. A measurement on
*this* CPU does not transfer to GPUs, so compute is calibrated from a trace recorded on the
target cluster (:func:`calibrate_mfu`, ``--calibrate``) or set with ``--mfu``.

Not modelled: CPU optimizer offload (the paper offloaded optimizer state to host memory,
which made its iterations far slower than GPU-resident ones), activation memory, tensor /
pipeline parallelism, overlap, congestion beyond per-GPU link rates.
"""

from megatron_swiftmoe.sim.cluster import CLUSTERS, Cluster, cluster_names, get_cluster, load_cluster
from megatron_swiftmoe.sim.cost import PARTS, STRATEGIES, calibrate_mfu, measure_planning, replan_min_moves, simulate
from megatron_swiftmoe.sim.model import ModelShape, load_model
from megatron_swiftmoe.sim.report import format_report
from megatron_swiftmoe.sim.trace import Trace, load_trace

__all__ = [
    "simulate", "calibrate_mfu", "measure_planning", "replan_min_moves", "STRATEGIES", "PARTS",
    "Cluster", "CLUSTERS", "cluster_names", "get_cluster", "load_cluster",
    "ModelShape", "load_model", "Trace", "load_trace", "format_report",
]

