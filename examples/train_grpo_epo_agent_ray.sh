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
: "${AGENT_FUNC_PATH:?set AGENT_FUNC_PATH to an OpenRLHF agent file}"
: "${PROMPT_DATA:?set PROMPT_DATA to a prompt dataset}"
MODEL=${MODEL:-Qwen/Qwen2.5-7B-Instruct}
SAVE=${SAVE:-./ckpt/grpo-epo}
PRESET=${PRESET:-paper-alfworld}
ACTOR_GPUS=${ACTOR_GPUS:-8}
VLLM_ENGINES=${VLLM_ENGINES:-4}
VLLM_TP=${VLLM_TP:-2}
N_SAMPLES=${N_SAMPLES:-8}
ROLLOUT_BATCH=${ROLLOUT_BATCH:-16}
ROLLOUT_MICRO_BATCH=${ROLLOUT_MICRO_BATCH:-4}
TRAIN_BATCH=${TRAIN_BATCH:-128}
MICRO_BATCH=${MICRO_BATCH:-2}
MAX_LEN=${MAX_LEN:-8192}
EPISODES=${EPISODES:-20}
SAVE_STEPS=${SAVE_STEPS:-10}
ZERO_STAGE=${ZERO_STAGE:-3}
ATTN=${ATTN:-flash_attention_2}

ARGS=(
   --loss_plugin epo
   --epo.preset "$PRESET"
   --rollout_processors turn_stats
   --actor.model_name_or_path "$MODEL"
   --actor.num_nodes 1 --actor.num_gpus_per_node "$ACTOR_GPUS"
   --ref.num_nodes 1 --ref.num_gpus_per_node "$ACTOR_GPUS"
   --vllm.num_engines "$VLLM_ENGINES" --vllm.tensor_parallel_size "$VLLM_TP"
   --train.colocate_all --vllm.gpu_memory_utilization 0.6
   --train.agent_func_path "$AGENT_FUNC_PATH"
   --data.prompt_dataset "$PROMPT_DATA" --data.input_key prompt --data.label_key label --data.apply_chat_template
   --data.max_len "$MAX_LEN"
   --algo.advantage.estimator group_norm
   --rollout.n_samples_per_prompt "$N_SAMPLES"
   --rollout.batch_size "$ROLLOUT_BATCH" --rollout.micro_batch_size "$ROLLOUT_MICRO_BATCH"
   --train.batch_size "$TRAIN_BATCH" --train.micro_batch_size "$MICRO_BATCH"
   --algo.kl.init_coef 0.001 --algo.kl.use_loss --algo.kl.estimator k3
   --train.max_epochs 1 --train.num_episodes "$EPISODES"
   --ds.zero_stage "$ZERO_STAGE" --ds.param_dtype bf16 --ds.attn_implementation "$ATTN"
   --ckpt.path "$SAVE" --ckpt.save_steps "$SAVE_STEPS" --ckpt.load_enable
   --ckpt.output_dir "$SAVE/final"
)

if [[ " $* " == *" --cpu "* ]]; then
   exec "${PYTHON:-python3}" -m openrlhf_hooks.train_ppo_ray "${ARGS[@]}" "$@"
fi
ray start --head --num-gpus 8 2>/dev/null || true
ray job submit --address="http://127.0.0.1:8265" -- python3 -m openrlhf_hooks.train_ppo_ray "${ARGS[@]}" "$@"
