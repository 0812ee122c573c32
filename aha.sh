#!/usr/bin/env bash
# The aha-moment runs (docs/aha.md): R1-Zero with the edge level (mul2) and a minority of
# reflective worked solutions (checks, retries) in pretraining; GRPO's reward is R1-Zero's, so
# nothing pays for reflection itself. data/reflect.py counts what the model does with it.
#
#   bash aha.sh                  # one run, the flags below, into out-aha/run/ (~6.5 min, 2 cores)
#   bash aha.sh --seed 3         # any nanor1.py flag passes through and overrides the set
#   bash aha.sh experiment       # both arms (reflective / plain corpus) x seeds 0 1 2 (~40 min),
#                                # then out-aha/aha.md and out-aha/aha.png (SEEDS="0 1": fewer)
#
# Why these flags: rows of 256 tokens hold the longest reflective documents (a check and a redo
# of a 3-operation solution: ~230 tokens), 16 of them keep a step at the default's 4096 tokens;
# completions may run to 256 tokens; 60 GRPO steps give RL time to move reflection. The last
# four keep the pretraining, lrs and model the experiment ran with (1c4344d), before the
# speedrun's default (docs/speedrun.md) shortened pretraining to 500 steps, sped up embedding and
# head, and halved the dense layer's width.
set -euo pipefail
cd "$(dirname "$0")"

AHA=(--edge_weight 0.1 --verify_frac 0.15 --retry_frac 0.15 --block_size 256 --batch_size 16
     --max_new_tokens 256 --grpo_steps 60 --pretrain_steps 800 --embed_lr_mult 1
     --grpo_head_lr_mult 1 --inter_dim 512)

if [ "${1:-}" = "experiment" ]; then
    shift
    for seed in ${SEEDS:-0 1 2}; do
        python nanor1.py "${AHA[@]}" --seed "$seed" --out_dir "out-aha/reflect-$seed" "$@"
        python nanor1.py "${AHA[@]}" --verify_frac 0 --retry_frac 0 --seed "$seed" \
            --out_dir "out-aha/plain-$seed" "$@"
    done
    exec python report.py compare out-aha
fi
exec python nanor1.py "${AHA[@]}" --out_dir out-aha/run "$@"
