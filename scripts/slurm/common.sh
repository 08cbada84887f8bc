# Sourced by the sbatch scripts in this folder (not run by itself): where the job's processes
# start and how srun reaches the nodes.
#
# Sets MASTER_ADDR (first node of the allocation), MASTER_PORT (29500 unless set), GPUS_PER_NODE
# (processes per node: GPUS_PER_NODE, else SLURM_GPUS_ON_NODE from --gpus-per-node, else the
# node's GPU count) and SRUN: srun with one task per node, every task killed when one fails, and
# with CONTAINER (an image for pyxis/enroot) the container flags: the submit directory and the
# directories that the training flags name (swiftmoe_mount_flags) mounted at the same paths, so
# that --data-path, --save, --load, ... exist inside. CONTAINER_MOUNTS adds mounts (SRC:DST,...).
# SWIFTMOE_VENV (a virtualenv to activate on every node) goes into ACTIVATE, a command prefix.

GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-$(nvidia-smi -L | wc -l)}}
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-29500}
ACTIVATE="${SWIFTMOE_VENV:+source $SWIFTMOE_VENV/bin/activate && }"
MOUNTS=("$PWD:$PWD")

# Flags whose value is a path (Megatron-LM's names, which ours share): read, directories written
# into, files written (a mount's source must exist: the last two are created here if missing).
_READ_FLAGS=" --data-path --train-data-path --valid-data-path --test-data-path --data-args-path
 --per-split-data-args-path --tokenizer-model --vocab-file --merge-file --config "
_DIR_FLAGS=" --save --load --tensorboard-dir --wandb-save-dir --data-cache-path "
_FILE_FLAGS=" --metrics-path "

_mount_dir() {  # one directory (absolute), unless the submit directory already holds it
    local dir mount
    dir=$(realpath -m "$1")
    case "$dir/" in "$PWD"/*) return ;; esac
    for mount in "${MOUNTS[@]}"; do [ "$mount" = "$dir:$dir" ] && return; done
    MOUNTS+=("$dir:$dir")
}

# swiftmoe_mount_flags FLAG...: add the directories the path flags name to MOUNTS.
swiftmoe_mount_flags() {
    local flag="" value
    for arg in "$@"; do
        case "$arg" in
            --*=*) flag=${arg%%=*}; value=${arg#*=} ;;
            --*) flag=$arg; continue ;;
            *) value=$arg ;;
        esac
        [[ "$value" =~ ^[0-9.eE+-]+$ ]] && continue  # a blend weight of --data-path
        if [[ "$_DIR_FLAGS" == *" $flag "* ]]; then
            mkdir -p "$value" && _mount_dir "$value"
        elif [[ "$_FILE_FLAGS" == *" $flag "* ]]; then
            mkdir -p "$(dirname "$value")" && _mount_dir "$(dirname "$value")"
        elif [[ "$_READ_FLAGS" == *" $flag "* ]] && [[ "$value" != *://* ]]; then
            if [ -d "$value" ]; then _mount_dir "$value"; else _mount_dir "$(dirname "$value")"; fi
        fi
    done
}

# swiftmoe_srun: the srun command line in SRUN (call after the mounts are known).
swiftmoe_srun() {
    SRUN=(srun --ntasks-per-node=1 --kill-on-bad-exit=1)
    if [ -n "${CONTAINER:-}" ]; then
        local mounts
        mounts=$(IFS=,; echo "${MOUNTS[*]}")
        SRUN+=(--container-image="$CONTAINER" --container-mounts="$mounts${CONTAINER_MOUNTS:+,$CONTAINER_MOUNTS}"
               --container-workdir="$PWD")
    fi
}
