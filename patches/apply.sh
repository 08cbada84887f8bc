#!/usr/bin/env bash
# Adds (or, with --revert, removes) the one-line SwiftMoE plugin import in a Megatron-LM
# checkout's pretrain_gpt.py. Idempotent; refuses a checkout whose version it does not know.
#   patches/apply.sh [--revert] MEGATRON_LM_DIR      (--revert before or after the folder)
set -euo pipefail
PATCH="$(cd "$(dirname "$0")" && pwd)/pretrain_gpt.patch"
SUPPORTED="0.16 0.19"  # megatron-core MAJOR.MINOR of the Megatron-LM trees this is tested on
MARKER="import megatron_swiftmoe.megatron_lm"

usage() { echo "usage: $0 [--revert] MEGATRON_LM_DIR" >&2; exit 2; }
MODE=apply
DIR=
for arg in "$@"; do
    case "$arg" in
        --revert) MODE=--revert ;;
        -h|--help) usage ;;
        -*) echo "error: unknown option $arg" >&2; usage ;;
        *) [ -z "$DIR" ] || { echo "error: one Megatron-LM folder, got $DIR and $arg" >&2; usage; }
           DIR=$arg ;;
    esac
done
[ -n "$DIR" ] || usage

INFO="$DIR/megatron/core/package_info.py"
if [ ! -f "$DIR/pretrain_gpt.py" ] || [ ! -f "$INFO" ]; then
    echo "error: $DIR is not a Megatron-LM checkout (no pretrain_gpt.py or megatron/core/package_info.py)" >&2
    exit 1
fi
VERSION=$(python3 - "$INFO" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
print(".".join(re.search(rf"^{k} = (\d+)", text, re.M).group(1) for k in ("MAJOR", "MINOR", "PATCH")))
PY
)
case " $SUPPORTED " in
    *" ${VERSION%.*} "*) ;;
    *) echo "error: $DIR is Megatron-LM $VERSION; this patch supports megatron-core ${SUPPORTED// /.x, }.x (tags core_v0.16.1, core_v0.19.0)" >&2
       exit 1 ;;
esac

if [ "$MODE" = apply ]; then
    if grep -q "^$MARKER" "$DIR/pretrain_gpt.py"; then
        echo "$DIR/pretrain_gpt.py is already patched (Megatron-LM $VERSION)"
        exit 0
    fi
    patch --quiet --forward --no-backup-if-mismatch -p1 -d "$DIR" < "$PATCH"
    echo "patched $DIR/pretrain_gpt.py (Megatron-LM $VERSION): add --swiftmoe to its arguments to use SwiftMoE"
else
    if ! grep -q "^$MARKER" "$DIR/pretrain_gpt.py"; then
        echo "$DIR/pretrain_gpt.py is not patched (Megatron-LM $VERSION)"
        exit 0
    fi
    patch --quiet --reverse --no-backup-if-mismatch -p1 -d "$DIR" < "$PATCH"
    echo "reverted $DIR/pretrain_gpt.py (Megatron-LM $VERSION)"
fi
