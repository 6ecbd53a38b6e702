# Sourced by train_grpo_epo_agent_ray.sh and train_ppo_epo_agent_ray.sh: what both example commands
# share. The sourcing script sets SAVE, PRESET, ACTOR_GPUS, ROLLOUT_BATCH and TRAIN_BATCH defaults first,
# then calls `launch ALGORITHM_FLAGS... -- USER_FLAGS...`.
: "${AGENT_FUNC_PATH:?set AGENT_FUNC_PATH to an OpenRLHF agent file}"
: "${PROMPT_DATA:?set PROMPT_DATA to a prompt dataset}"
MODEL=${MODEL:-Qwen/Qwen2.5-7B-Instruct}
ROLLOUT_MICRO_BATCH=${ROLLOUT_MICRO_BATCH:-4}
MICRO_BATCH=${MICRO_BATCH:-2}
MAX_LEN=${MAX_LEN:-8192}
EPISODES=${EPISODES:-20}
SAVE_STEPS=${SAVE_STEPS:-10}
ZERO_STAGE=${ZERO_STAGE:-3}
ATTN=${ATTN:-flash_attention_2}

# launch [the algorithm's own flags] -- [the flags given to the example script]
launch() {
   local own=() user=()
   while (($#)) && [[ "$1" != "--" ]]; do own+=("$1"); shift; done
   (($#)) && shift
   user=("$@")
   local args=(
      --loss_plugin epo
      --epo.preset "$PRESET"
      "${own[@]}"
      --train.agent_func_path "$AGENT_FUNC_PATH"
      --data.prompt_dataset "$PROMPT_DATA" --data.input_key prompt --data.label_key label --data.apply_chat_template
      --data.max_len "$MAX_LEN"
      --rollout.batch_size "$ROLLOUT_BATCH" --rollout.micro_batch_size "$ROLLOUT_MICRO_BATCH"
      --train.batch_size "$TRAIN_BATCH" --train.micro_batch_size "$MICRO_BATCH"
      --train.max_epochs 1 --train.num_episodes "$EPISODES"
      --ds.zero_stage "$ZERO_STAGE" --ds.param_dtype bf16 --ds.attn_implementation "$ATTN"
      --ckpt.path "$SAVE" --ckpt.save_steps "$SAVE_STEPS" --ckpt.load_enable
      --ckpt.output_dir "$SAVE/final"
   )
   if [[ " ${user[*]-} " == *" --cpu "* ]]; then
      exec "${PYTHON:-python3}" -m openrlhf_hooks.train_ppo_ray "${args[@]}" "${user[@]}"
   fi
   ray start --head --num-gpus 8 2>/dev/null || true
   ray job submit --address="http://127.0.0.1:8265" -- python3 -m openrlhf_hooks.train_ppo_ray "${args[@]}" "${user[@]}"
}
