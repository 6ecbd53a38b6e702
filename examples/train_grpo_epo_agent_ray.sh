#!/usr/bin/env bash
# GRPO-style (group_norm advantages, no critic) + EPO on a multi-turn agent. GPU run, one 8-GPU node.
# Needs: pip install "openrlhf-epo[gpu]" on every node. Set AGENT_FUNC_PATH and PROMPT_DATA
# (e.g. examples/agents/scienceworld_agent.py with rows as in examples/agents/README.md).
# EPO's own presets: seed | paper-sciworld | paper-alfworld | released-code; any --epo.<field> overrides.
set -euo pipefail
: "${AGENT_FUNC_PATH:?set AGENT_FUNC_PATH to an OpenRLHF agent file}"
: "${PROMPT_DATA:?set PROMPT_DATA to a prompt dataset}"
MODEL=${MODEL:-Qwen/Qwen2.5-7B-Instruct}
SAVE=${SAVE:-./ckpt/grpo-epo}
PRESET=${PRESET:-paper-alfworld}

ray start --head --num-gpus 8 2>/dev/null || true

ray job submit --address="http://127.0.0.1:8265" \
   -- python3 -m openrlhf_hooks.train_ppo_ray \
   --loss_plugin epo \
   --epo.preset "$PRESET" \
   --rollout_processors turn_stats \
   --actor.model_name_or_path "$MODEL" \
   --actor.num_nodes 1 --actor.num_gpus_per_node 8 \
   --vllm.num_engines 4 --vllm.tensor_parallel_size 2 \
   --train.colocate_all --vllm.gpu_memory_utilization 0.6 \
   --train.agent_func_path "$AGENT_FUNC_PATH" \
   --data.prompt_dataset "$PROMPT_DATA" --data.input_key prompt --data.label_key label --data.apply_chat_template \
   --data.max_len 8192 \
   --algo.advantage.estimator group_norm \
   --rollout.n_samples_per_prompt 8 \
   --rollout.batch_size 16 --rollout.micro_batch_size 4 \
   --train.batch_size 128 --train.micro_batch_size 2 \
   --algo.kl.init_coef 0.001 --algo.kl.use_loss --algo.kl.estimator k3 \
   --train.max_epochs 1 --train.num_episodes 20 \
   --ds.zero_stage 3 --ds.param_dtype bf16 --ds.attn_implementation flash_attention_2 \
   --ckpt.path "$SAVE" --ckpt.save_steps 10 --ckpt.load_enable \
   --ckpt.output_dir "$SAVE/final"
