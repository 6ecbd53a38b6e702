#!/usr/bin/env bash
# GRPO-style (group_norm advantages, no critic) + EPO on a multi-turn agent, OpenRLHF 0.11.2.
# GPU run on one 8-GPU node: pip install -e "hooks[gpu]" -e . (this repository) on every node, then
#   AGENT_FUNC_PATH=examples/agents/scienceworld_agent.py PROMPT_DATA=rows.jsonl bash examples/train_grpo_epo_agent_ray.sh
# (rows as in examples/agents/README.md). Everything except --loss_plugin/--epo.* is OpenRLHF's.
# EPO's presets: seed | paper-sciworld | paper-alfworld | released-code; any --epo.<field> overrides.
#
# Flags given to this script are appended (the last one wins). With --cpu it runs the same command in
# CPU mode, with a local Ray and no CUDA (hooks/openrlhf_hooks/cpu_mode.py); shrink the sizes below with
# environment variables, e.g. as CI runs it (tests/test_e2e_cpu.py):
#   MODEL=tiny ACTOR_GPUS=2 VLLM_ENGINES=1 VLLM_TP=1 ATTN=eager ROLLOUT_BATCH=2 N_SAMPLES=2 ... bash $0 --cpu
set -euo pipefail
SAVE=${SAVE:-./ckpt/grpo-epo}
PRESET=${PRESET:-paper-alfworld}
ACTOR_GPUS=${ACTOR_GPUS:-8}
VLLM_ENGINES=${VLLM_ENGINES:-4}
VLLM_TP=${VLLM_TP:-2}
N_SAMPLES=${N_SAMPLES:-8}
ROLLOUT_BATCH=${ROLLOUT_BATCH:-16}
TRAIN_BATCH=${TRAIN_BATCH:-128}
source "$(dirname "${BASH_SOURCE[0]}")/epo_agent_common.sh"

launch \
   --rollout_processors turn_stats \
   --actor.model_name_or_path "$MODEL" \
   --actor.num_nodes 1 --actor.num_gpus_per_node "$ACTOR_GPUS" \
   --ref.num_nodes 1 --ref.num_gpus_per_node "$ACTOR_GPUS" \
   --vllm.num_engines "$VLLM_ENGINES" --vllm.tensor_parallel_size "$VLLM_TP" \
   --train.colocate_all --vllm.gpu_memory_utilization 0.6 \
   --algo.advantage.estimator group_norm \
   --rollout.n_samples_per_prompt "$N_SAMPLES" \
   --algo.kl.init_coef 0.001 --algo.kl.use_loss --algo.kl.estimator k3 \
   -- "$@"
