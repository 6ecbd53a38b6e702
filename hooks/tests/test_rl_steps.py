"""K, the RL steps that train the actor (hooks/openrlhf_hooks/steps.py), against the host's own loop.

For each flag combination, OpenRLHF 0.11.2's real trainer is built in this process (PPOTrainer's
plain class: its own prepare_datasets, SamplesGenerator and fit loop, train_step and ppo_train), and
run to the end. Replaced are only what needs GPUs: the vLLM dispatch (each prompt's n responses
are put into Ray's object store, as the engines' results are), the experience maker (returns the
rollout samples unchanged) and the actor group, which counts the calls of its `fit`. K derived
from the flags and the dataset must equal that count.
"""

import json
import threading
from pathlib import Path

import pytest
import ray

from host_args import host_args, tiny_host_flags  # installs the flash_attn/vllm stand-ins
from openrlhf_hooks.steps import RLSteps, RLStepsError, count_prompts, derive_rl_steps, rl_steps

SUPPORT = str(Path(__file__).resolve().parents[2] / "tests" / "support")  # the shared helpers (hooks/tests/conftest.py)


@pytest.fixture(scope="module")
def local_ray():
    import os

    # the async trainer's queues and lock are Ray actors: their workers import the host's module
    runtime_env = {
        "worker_process_setup_hook": "stand_ins.install",
        "env_vars": {"PYTHONPATH": os.pathsep.join([SUPPORT, os.environ.get("PYTHONPATH", "")])},
    }
    ray.init(num_cpus=2, include_dashboard=False, runtime_env=runtime_env)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from openrlhf_hooks.testing.tiny_model import build_tokenizer

    path = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(path)  # the tiny model's tokenizer, saved with its chat template (--data.apply_chat_template)
    return path


def prompts_file(directory, count, name="prompts.jsonl"):
    path = Path(directory) / name
    path.write_text("".join(json.dumps({"prompt": f"p{i}", "label": str(i)}) + "\n" for i in range(count)))
    return str(path)


class CountingActorGroup:
    """The actor group as the trainer drives it (RayActorGroup's two dispatch methods); records each call."""

    def __init__(self):
        self.calls = []

    def async_run_method(self, method_name, **kwargs):
        self.calls.append(method_name)
        return [ray.put({} if method_name == "fit" else None)]

    def async_run_method_batch(self, method_name, **kwargs):
        self.calls.append(method_name)
        return [ray.put(None)]


def fake_vllm(args, passes=lambda index: True):
    """SamplesGenerator._dispatch_prompts_to_vllm without engines: one ref per prompt holding its
    n responses, shaped as the engines return them. passes(i): prompt i's score is inside
    --algo.dynamic_filtering_range (0.5) or not (1.0)."""

    def dispatch(prompts, labels, images=None, **generate_kwargs):
        n = generate_kwargs.get("n_samples_per_prompt", args.rollout.n_samples_per_prompt)
        refs = []
        for prompt, label in zip(prompts, labels):
            score = 0.5 if passes(int(label)) else 1.0
            response = {"prompt": prompt, "label": label, "observation_tokens": [3, 4, 5, 6], "action_ranges": [(2, 4)],
                        "reward": score, "scores": score, "rollout_log_probs": None, "truncated": False}  # fmt: skip
            refs.append(ray.put([dict(response) for _ in range(n)]))
        return refs

    return dispatch


GENERATE_KWARGS = dict(do_sample=True, max_len=64, max_new_tokens=8, temperature=1.0, top_p=1.0)


def sync_fit_calls(args, tokenizer_dir, passes=lambda index: True):
    """Run the host's PPOTrainer.fit to the end; the number of times it called the actor's fit."""
    from openrlhf.trainer.ppo_trainer import PPOTrainer
    from openrlhf.utils import get_strategy

    group = CountingActorGroup()
    trainer = PPOTrainer.__ray_actor_class__(
        str(tokenizer_dir), get_strategy(args), group, None, None, None, None, **GENERATE_KWARGS
    )
    trainer.samples_generator._dispatch_prompts_to_vllm = fake_vllm(args, passes)
    trainer.experience_maker.make_experience_batch = lambda samples: samples
    trainer.fit()
    assert group.calls.count("append") >= group.calls.count("fit")  # it really trained on batches
    return group.calls.count("fit")


def async_fit_calls(args, tokenizer_dir):
    """The same with the async trainer's two loops (generator and trainer) over real Ray queues."""
    from ray.util.queue import Queue

    from openrlhf.trainer.ppo_trainer_async import GenerateSamplesActor, TrainingActor, VLLMLock
    from openrlhf.utils import get_strategy

    strategy = get_strategy(args)
    args.eval.steps = args.ckpt.save_steps = float("inf")  # as PPOTrainerAsync.__init__ does for -1
    size = args.train.async_queue_size
    rollout_queue, rollout_slots = Queue(maxsize=size), Queue(maxsize=size)
    for _ in range(size):
        rollout_slots.put(0)
    lock = VLLMLock.remote()
    queues = dict(vllm_lock=lock, rollout_queue=rollout_queue, rollout_slots=rollout_slots)
    generator = GenerateSamplesActor.__ray_actor_class__(str(tokenizer_dir), strategy, None, **queues, **GENERATE_KWARGS)
    generator.samples_generator._dispatch_prompts_to_vllm = fake_vllm(args)
    group = CountingActorGroup()
    trainer = TrainingActor.__ray_actor_class__(str(tokenizer_dir), strategy, group, None, None, None, None, **queues)
    trainer.experience_maker.make_experience_batch = lambda samples: samples
    errors = []

    def generate():
        try:
            generator.fit(episode=0, total_consumed_prompts=0)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
            rollout_queue.put("done")

    thread = threading.Thread(target=generate)
    thread.start()
    trainer.fit(global_step=0)
    thread.join(timeout=120)
    assert not errors, errors
    return group.calls.count("fit")


def flags(prompts_path, *extra, batch=4, n=2):
    return [*tiny_host_flags("model", 1), "--data.prompt_dataset", prompts_path, "--data.input_key", "prompt",
            "--data.label_key", "label", "--rollout.batch_size", str(batch), "--rollout.n_samples_per_prompt", str(n),
            "--train.batch_size", str(batch * n), "--train.micro_batch_size", "1", *extra]  # fmt: skip


# (id, prompts in the file, extra flags, rollout batch, K)
TABLE = [
    ("issue-100-prompts-batch-64", 100, [], 64, 2),
    ("exact-multiple", 12, [], 4, 3),
    ("episodes", 10, ["--train.num_episodes", "3"], 4, 9),
    ("freezing-steps", 10, ["--critic.freezing_steps", "2", "--train.num_episodes", "2"], 4, 3),
    ("freezing-steps-zero-freezes-one", 10, ["--critic.freezing_steps", "0"], 4, 2),
    ("max-samples", 10, ["--data.max_samples", "7"], 4, 2),
    ("generate-batch-smaller", 10, ["--rollout.vllm_generate_batch_size", "3"], 4, 4),
    ("inner-epochs-do-not-count", 10, ["--train.max_epochs", "3"], 4, 3),
    ("sleep-mode", 10, ["--ds.enable_sleep"], 4, 3),
]  # fmt: skip


@pytest.mark.parametrize("prompts,extra,batch,expected", [t[1:] for t in TABLE], ids=[t[0] for t in TABLE])
def test_k_equals_the_actor_fit_calls_of_the_host_loop(local_ray, tokenizer_dir, tmp_path, prompts, extra, batch, expected):
    args = host_args(flags(prompts_file(tmp_path, prompts), *extra, batch=batch))
    derived = derive_rl_steps(args)
    assert (derived.steps, derived.exact) == (expected, True), derived
    assert sync_fit_calls(args, tokenizer_dir) == expected


def test_blended_datasets_are_counted_by_the_host_functions(local_ray, tokenizer_dir, tmp_path):
    # interleaving with probabilities ("all_exhausted") oversamples: only the host's own loader knows the length
    paths = f"{prompts_file(tmp_path, 3, 'a.jsonl')},{prompts_file(tmp_path, 9, 'b.jsonl')}"
    args = host_args(flags(paths, "--data.prompt_probs", "0.5,0.5"))
    prompts = count_prompts(args)
    assert prompts > 12
    assert derive_rl_steps(args).steps == sync_fit_calls(args, tokenizer_dir) == -(-prompts // 4)


def test_grpo_example_shape(local_ray, tokenizer_dir, tmp_path):
    """The shape of examples/train_grpo_epo_agent_ray.sh (rollout batch 16 x 8 samples, train batch
    128) on 1000 prompts: 63 steps per episode x 20 = 1260 (the host's max_steps / steps-per-update
    gave 1240). The host flags alone: the example's own command line, which needs the EPO plugin, is
    counted by the dry run in tests/test_launcher.py."""
    prompts = prompts_file(tmp_path, 1000)
    example = ["--data.apply_chat_template", "--train.max_epochs", "1"]  # as the example passes them
    assert derive_rl_steps(host_args(flags(prompts, *example, "--train.num_episodes", "20", batch=16, n=8))).steps == 1260
    # the host's loop over the same flags with 2 of the 20 episodes (each episode is the same loop;
    # the whole 1260 steps take a minute here): 2 x 63
    args = host_args(flags(prompts, *example, "--train.num_episodes", "2", batch=16, n=8))
    assert (args.rollout.batch_size, args.rollout.n_samples_per_prompt, args.train.batch_size) == (16, 8, 128)
    assert derive_rl_steps(args).steps == sync_fit_calls(args, tokenizer_dir) == 126


def test_async_trainer_with_oversampling(local_ray, tokenizer_dir, tmp_path):
    # a generate batch above the rollout batch is allowed only in async mode: still one step per rollout batch
    extra = ["--train.async_enable", "--rollout.vllm_generate_batch_size", "6", "--train.num_episodes", "2"]
    args = host_args(flags(prompts_file(tmp_path, 10), *extra))
    assert derive_rl_steps(args).steps == 6  # ceil(10 / 4) x 2
    assert async_fit_calls(args, tokenizer_dir) == 6


def test_dynamic_filtering_gives_an_upper_bound(local_ray, tokenizer_dir, tmp_path):
    args = host_args(flags(prompts_file(tmp_path, 12), "--algo.dynamic_filtering_enable", "--train.num_episodes", "2"))
    derived = derive_rl_steps(args)
    assert (derived.steps, derived.exact) == (6, False)
    assert "depends on how many prompts pass the filter" in derived.note
    assert sync_fit_calls(args, tokenizer_dir) == 6  # every prompt passes: the bound is reached
    fewer = sync_fit_calls(args, tokenizer_dir, passes=lambda index: index % 3 == 0)
    assert 0 < fewer < 6


def test_freezing_every_step_is_an_error(local_ray, tokenizer_dir, tmp_path):
    args = host_args(flags(prompts_file(tmp_path, 10), "--critic.freezing_steps", "2"))  # 3 steps, all frozen
    assert sync_fit_calls(args, tokenizer_dir) == 0
    with pytest.raises(RLStepsError, match=r"--critic.freezing_steps=2 freezes the actor for all 3 RL steps"):
        derive_rl_steps(args)


def test_prompts_that_cannot_be_counted_give_none_with_the_reason(tmp_path):
    args = host_args(flags(str(tmp_path / "missing.jsonl")))
    derived = derive_rl_steps(args)
    assert derived.steps is None and "cannot count the prompts of --data.prompt_dataset=" in derived.note
    args = host_args(tiny_host_flags("model", 1))
    assert derive_rl_steps(args) == RLSteps(None, False, "no --data.prompt_dataset to count prompts in")


def test_empty_dataset_is_an_error(tmp_path):
    args = host_args(flags(prompts_file(tmp_path, 10), "--data.max_samples", "0"))
    with pytest.raises(RLStepsError, match="holds no prompts"):
        rl_steps(args, count_prompts(args))
