#!/usr/bin/env bash
# PPO (GAE critic, reference model) + EPO on a multi-turn agent, OpenRLHF 0.11.2.
# GPU run on one 8-GPU node: pip install -e "hooks[gpu]" -e . (this repository) on every node, then
#   AGENT_FUNC_PATH=examples/agents/scienceworld_agent.py PROMPT_DATA=rows.jsonl bash examples/train_ppo_epo_agent_ray.sh
# (examples/agents/ has ScienceWorld and TextWorld-Express agent files and their row format).
# Everything except --loss_plugin/--epo.* is OpenRLHF's.
#
# Flags given to this script are appended (the last one wins). With --cpu it runs the same command in
# CPU mode, with a local Ray and no CUDA (hooks/openrlhf_hooks/cpu_mode.py); shrink the sizes below with
# environment variables (tests/test_e2e_cpu.py runs it that way).
set -euo pipefail
SAVE=${SAVE:-./ckpt/ppo-epo}
PRESET=${PRESET:-paper-sciworld}
ACTOR_GPUS=${ACTOR_GPUS:-4}
CRITIC_GPUS=${CRITIC_GPUS:-2}
REF_GPUS=${REF_GPUS:-2}
VLLM_ENGINES=${VLLM_ENGINES:-2}
ROLLOUT_BATCH=${ROLLOUT_BATCH:-64}
TRAIN_BATCH=${TRAIN_BATCH:-64}
source "$(dirname "${BASH_SOURCE[0]}")/epo_agent_common.sh"

launch \
   --actor.model_name_or_path "$MODEL" \
   --critic.model_name_or_path "$MODEL" \
   --actor.num_nodes 1 --actor.num_gpus_per_node "$ACTOR_GPUS" \
   --critic.num_nodes 1 --critic.num_gpus_per_node "$CRITIC_GPUS" \
   --ref.num_nodes 1 --ref.num_gpus_per_node "$REF_GPUS" \
   --vllm.num_engines "$VLLM_ENGINES" --vllm.tensor_parallel_size 1 \
   --algo.advantage.estimator gae \
   -- "$@"
