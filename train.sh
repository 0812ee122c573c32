#!/usr/bin/env bash
# nanor1 on GPUs: a larger model, pretrained and trained with GRPO on every visible GPU.
#
#   bash train.sh                        # the GPU preset below, torchrun on all visible GPUs
#   NPROC=4 bash train.sh                # on 4 of them
#   bash train.sh --grpo_steps 500       # any nanor1.py flag passes through and overrides the preset
#   bash train.sh cpu                    # the CPU default instead: python nanor1.py (~3 min, 1.3M params)
#
# Across machines: the same command on every node, NODE_RANK 0, 1, ... and MASTER_ADDR an address
# of node 0 that the others reach (MASTER_PORT a free port there, default 29500):
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash train.sh     # on node 0 (10.0.0.1)
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 bash train.sh     # on node 1
# Node 0 hosts torchrun's c10d rendezvous at MASTER_ADDR:MASTER_PORT; it waits for all NNODES, then
# numbers the ranks itself (torchrun ignores --node_rank for that, and warns so on the others):
# rank 0, which alone writes out-gpu/, is on the node that prints the `nanor1 | ... | world N` line.
# Every rank reads --init_from, and on --resume out-gpu/ckpt.pt: keep out-gpu/ on a filesystem all
# nodes share (or copy them there). Without NNODES: one machine, --standalone, as before.
#
# What it trains: a DeepSeek-V3-style model of 41M parameters, 12.4M active per token (width 384,
# 8 layers of which the first is dense, 6 heads, a 128-wide KV latent; 16 routed experts of width
# 256, top-2, plus 1 shared), pretrained for 4000 steps of 256 rows x 256 tokens (262M tokens),
# then 300 GRPO steps of 64 prompts x 16 completions of up to 160 tokens (1024 sequences in one
# update, whose activations should fit one 80 GB GPU by our estimate; 2048 might not). The global
# batches stay the same on any number of GPUs that divides 256 and 64 (1, 2, 4, 8, 16): the ranks
# split them.
# Outputs land in out-gpu/ (base.pt, final.pt, metrics.jsonl, summary.json, nanor1.png).
# Optimizer and schedule are the CPU default's (docs/speedrun.md): Muon for the hidden matrices
# and AdamW for the rest (the embedding and head at 3x the lr), warmup, constant,
# then a cosine over the last half; GRPO's head at 5x grpo_lr. The lr is half the CPU one, as it
# was under AdamW (3e-3 vs 6e-3), and the warmup longer (200 steps of 4000). Not yet measured on
# a GPU.
#
# How long: ESTIMATES from FLOP counts, not measurements. Training costs 86 MFLOP per token
# (forward + backward, Transformer.flops_per_token): 2.3e16 FLOP for pretraining and about 0.6e16 for
# the GRPO updates (with the reference model's forwards), 2.9e16 in all, i.e. 30 s at an H100's
# 989 TFLOP/s bf16 peak. A model this small reaches only a few percent of it (a Python loop
# runs each expert, and each MoE layer syncs with the host to count its tokens): at an assumed 5% MFU
# that is ~10 min of compute on one H100. Sampling adds ~160 sequential decoding steps per GRPO step,
# which are latency-bound and barely shrink with more GPUs (a few ms each: ~3 min in all). Expect
# roughly 15-25 min on one H100 and 5-10 min on 8; the log's mfu and eta columns give the real
# numbers from the first log line on.
set -euo pipefail
cd "$(dirname "$0")"

if [ "${1:-}" = "cpu" ]; then
    shift
    exec python nanor1.py "$@"
fi

PRESET=(
    --dim 384 --inter_dim 1536 --moe_inter_dim 256 --n_layers 8 --n_dense_layers 1 --n_heads 6
    --n_routed_experts 16 --n_shared_experts 1 --n_activated_experts 2
    --kv_lora_rank 128 --qk_nope_head_dim 64 --qk_rope_head_dim 32 --v_head_dim 64
    --pretrain_steps 4000 --batch_size 256 --block_size 256 --lr 3e-3 --warmup_steps 200
    --log_every 100 --eval_every 1000 --ckpt_every 500
    --grpo_steps 300 --prompts_per_step 64 --group_size 16 --max_new_tokens 160 --grpo_lr 5e-5
    --grpo_eval_every 50 --grpo_eval_n 100 --grpo_ckpt_every 50 --n_test 500 --eval_batch 1024
    --out_dir out-gpu
)

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_PORT=${MASTER_PORT:-29500}
if ! [[ $NNODES =~ ^[1-9][0-9]*$ && $NODE_RANK =~ ^[0-9]+$ && $NODE_RANK -lt $NNODES ]]; then
    echo "train.sh: NNODES=$NNODES NODE_RANK=$NODE_RANK: need 0 <= NODE_RANK < NNODES" >&2
    exit 2
fi
if [ "$NNODES" -gt 1 ] && [ -z "${MASTER_ADDR:-}" ]; then
    echo "train.sh: NNODES=$NNODES needs MASTER_ADDR, an address of node 0 every node reaches" >&2
    exit 2
fi

NPROC=${NPROC:-$(python -c "import torch; print(torch.cuda.device_count())")}
if [ "$NPROC" -lt 1 ]; then
    echo "train.sh: no GPU visible to torch (for the CPU run: bash train.sh cpu)" >&2
    exit 1
fi
if [ "$NNODES" -eq 1 ]; then    # one machine: torchrun's own rendezvous on a free local port
    LAUNCH=(--standalone)
    WHERE="$NPROC GPU(s)"
else                            # node 0 hosts the rendezvous store at MASTER_ADDR:MASTER_PORT
    LAUNCH=(--nnodes="$NNODES" --node_rank="$NODE_RANK" --rdzv-backend=c10d
            --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-conf="is_host=$((NODE_RANK == 0))")
    WHERE="$NNODES nodes x $NPROC GPU(s) (node $NODE_RANK, rendezvous $MASTER_ADDR:$MASTER_PORT)"
fi
echo "train.sh: torchrun on $WHERE: nanor1.py ${PRESET[*]} $*"
exec torchrun "${LAUNCH[@]}" --nproc_per_node="$NPROC" nanor1.py "${PRESET[@]}" "$@"
