#!/usr/bin/env bash
# PPO (GAE critic) + EPO on a multi-turn agent, OpenRLHF 0.11.2 on one 8-GPU node. GPU run.
# Needs: pip install "openrlhf-epo[gpu]" on every node (torch with CUDA, flash-attn, vLLM).
# Set AGENT_FUNC_PATH to your AgentExecutor file (OpenRLHF's --train.agent_func_path), and
# PROMPT_DATA to a dataset of task prompts (examples/agents/ has ScienceWorld and TextWorld-Express
# agent files and their row format). Everything except --loss_plugin/--epo.* is OpenRLHF's.
set -euo pipefail
: "${AGENT_FUNC_PATH:?set AGENT_FUNC_PATH to an OpenRLHF agent file}"
: "${PROMPT_DATA:?set PROMPT_DATA to a prompt dataset}"
MODEL=${MODEL:-Qwen/Qwen2.5-7B-Instruct}
SAVE=${SAVE:-./ckpt/ppo-epo}

ray start --head --num-gpus 8 2>/dev/null || true

ray job submit --address="http://127.0.0.1:8265" \
   -- python3 -m openrlhf_hooks.train_ppo_ray \
   --loss_plugin epo \
   --epo.preset paper-sciworld \
   --actor.model_name_or_path "$MODEL" \
   --critic.model_name_or_path "$MODEL" \
   --actor.num_nodes 1 --actor.num_gpus_per_node 4 \
   --critic.num_nodes 1 --critic.num_gpus_per_node 2 \
   --ref.num_nodes 1 --ref.num_gpus_per_node 2 \
   --vllm.num_engines 2 --vllm.tensor_parallel_size 1 \
   --train.agent_func_path "$AGENT_FUNC_PATH" \
   --data.prompt_dataset "$PROMPT_DATA" --data.input_key prompt --data.label_key label --data.apply_chat_template \
   --data.max_len 8192 \
   --algo.advantage.estimator gae \
   --rollout.batch_size 64 --rollout.micro_batch_size 4 \
   --train.batch_size 64 --train.micro_batch_size 2 \
   --train.max_epochs 1 --train.num_episodes 20 \
   --ds.zero_stage 3 --ds.param_dtype bf16 --ds.attn_implementation flash_attention_2 \
   --ckpt.path "$SAVE" --ckpt.save_steps 10 --ckpt.load_enable \
   --ckpt.output_dir "$SAVE/final"
