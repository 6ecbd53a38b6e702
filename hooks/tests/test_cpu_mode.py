"""CPU mode (hooks/openrlhf_hooks/cpu_mode.py, cpu_worker.py) piece by piece; tests/test_e2e_cpu.py runs it whole."""

import json
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from gloo import free_port
from host_args import tiny_host_flags
from openrlhf_hooks import cpu_mode
from openrlhf_hooks.cpu_worker import CPUWorkerWrap, GlooBroadcastGroup


@pytest.fixture
def activated():
    cpu_mode.activate()
    yield
    cpu_mode.deactivate()


def test_every_replacement_names_the_host_location_and_exists_in_the_host(activated):
    import importlib

    for replacement in cpu_mode.REPLACEMENTS:
        assert replacement.why and ".py:" in replacement.host
        module = importlib.import_module(replacement.module)
        assert hasattr(module, replacement.name), replacement


def test_activate_rebinds_the_host_globals_and_deactivate_restores_them(activated):
    from openrlhf.trainer.ppo_utils import replay_buffer
    from openrlhf.trainer.ray import ppo_actor
    from openrlhf.utils.deepspeed import deepspeed as host_deepspeed

    assert ppo_actor.torch.cuda.current_device() == torch.device("cpu")
    assert ppo_actor.stateless_init_process_group is cpu_mode.gloo_init_process_group
    assert ppo_actor.torch.tensor([1.0]).device.type == "cpu"  # the rest of torch is the real one
    # the host's NaiveReplayBuffer builds a "cuda:N" target device (replay_buffer.py:40)
    buffer = replay_buffer.NaiveReplayBuffer(sample_batch_size=1, limit=0)
    assert buffer.target_device == torch.device("cpu")
    config = host_deepspeed.get_train_ds_config(offload=False, stage=3)
    assert config["zero_optimization"]["stage3_allgather_sequential"] is True
    assert "stage3_allgather_sequential" not in host_deepspeed.get_train_ds_config(offload=False, stage=2)["zero_optimization"]
    cpu_mode.deactivate()
    assert ppo_actor.torch is torch and not cpu_mode.active()
    with pytest.raises(Exception):
        replay_buffer.NaiveReplayBuffer(sample_batch_size=1, limit=0)  # no CUDA here


def test_the_torch_stand_in_survives_rays_pickling(activated):
    # Ray ships the host's actor classes by value, their module globals included
    from ray import cloudpickle
    from openrlhf.trainer.ray import ppo_critic

    copy = cloudpickle.loads(cloudpickle.dumps(ppo_critic.torch))
    assert copy is not torch and copy.cuda.current_device() == torch.device("cpu")


def test_the_vllm_actor_gets_the_cpu_worker_extension(activated):
    from openrlhf.trainer.ray import vllm_engine

    seen = {}

    class FakeActorClass:
        def options(self, **options):
            seen["options"] = options
            return self

        def remote(self, **kwargs):
            seen["kwargs"] = kwargs

    wrapped = cpu_mode._RolloutActorOnCPU(FakeActorClass())
    wrapped.options(num_cpus=1).remote(worker_extension_cls="openrlhf.trainer.ray.vllm_worker_wrap.WorkerWrap", model="m")
    assert seen == {"options": {"num_cpus": 1}, "kwargs": {"worker_extension_cls": cpu_mode.WORKER_EXTENSION, "model": "m"}}
    assert isinstance(vllm_engine.RolloutRayActor, cpu_mode._RolloutActorOnCPU)


def _broadcast_rank(rank, world, store_port, sync_port, results):
    # every rank already belongs to a default group, as DeepSpeed's and vLLM's processes do
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{store_port}", rank=rank, world_size=world)
    group = GlooBroadcastGroup("127.0.0.1", sync_port, rank, world)
    tensor = torch.arange(6, dtype=torch.bfloat16).reshape(2, 3) if rank == 0 else torch.zeros(2, 3, dtype=torch.bfloat16)
    group.broadcast(tensor, src=0, stream=None)
    results[rank] = tensor.tolist()
    torch.distributed.destroy_process_group()


def test_gloo_broadcast_group_beside_a_default_group():
    results = mp.Manager().dict()
    mp.spawn(_broadcast_rank, args=(3, free_port(), free_port(), results), nprocs=3)
    assert results[1] == results[2] == results[0] == [[0, 1, 2], [3, 4, 5]]


def test_worker_extension_reloads_once_with_every_tensor_of_a_sync():
    class Group:
        def broadcast(self, tensor, src, stream=None):
            tensor.fill_(7)

    class Runner:
        calls = []

        def reload_weights(self, weights_iterator):
            self.calls.append([(name, tensor.clone()) for name, tensor in weights_iterator])

    worker = CPUWorkerWrap()
    worker.model_config = type("Config", (), {"dtype": torch.bfloat16})()
    worker.model_runner = Runner()
    worker._model_update_group, worker._received_weights = Group(), []
    worker.update_weight("a", torch.bfloat16, (2,))
    assert Runner.calls == []  # nothing loaded before the last tensor
    worker.update_weight("b", torch.bfloat16, (1, 2), empty_cache=True)
    assert [[name for name, _ in call] for call in Runner.calls] == [["a", "b"]]
    assert all(tensor.eq(7).all() for _, tensor in Runner.calls[0])
    with pytest.raises(RuntimeError, match="arrives as torch.float32, vLLM serves torch.bfloat16"):
        worker.update_weight("c", torch.float32, (1,))


def test_flag_defaults_are_added_only_when_missing():
    argv, added = cpu_mode.with_flag_defaults(["--vllm.sync_backend", "gloo", "--x", "1"])
    assert added == ["--ds.attn_implementation eager", "--vllm.enforce_eager"]
    assert argv == ["--vllm.sync_backend", "gloo", "--x", "1", "--ds.attn_implementation", "eager", "--vllm.enforce_eager"]
    assert cpu_mode.with_flag_defaults(["--ds.attn_implementation=sdpa", "--vllm.enforce_eager"])[1] == ["--vllm.sync_backend gloo"]


REFUSED = [
    (["--vllm.sync_backend", "nccl"], "--cpu cannot run --vllm.sync_backend nccl"),
    (["--ds.packing_samples"], "--cpu cannot run --ds.packing_samples"),
    (["--train.dynamic_batch_enable"], "--cpu cannot run --ds.packing_samples (also turned on by --train.dynamic_batch_enable"),
    (["--ds.attn_implementation", "flash_attention_2"], "--cpu cannot run --ds.attn_implementation flash_attention_2"),
    (["--vllm.enable_sleep", "--train.colocate_all"], "--cpu cannot run --vllm.enable_sleep"),
    (["--train.enable_ema"], "--cpu cannot run --train.enable_ema"),
    (["--vllm.tensor_parallel_size", "2"], "--cpu cannot run --vllm.tensor_parallel_size 2"),
]


@pytest.mark.parametrize("flags,message", REFUSED, ids=[f[0] for f, _ in REFUSED])
def test_flags_cpu_mode_cannot_honour_are_refused_in_one_line_before_ray(flags, message, tmp_path):
    base = tiny_host_flags(tmp_path, 2, "--vllm.num_engines", "1")
    command = [sys.executable, "-m", "openrlhf_hooks.train_ppo_ray", "--cpu", "--plugins_dry_run", *base, *flags]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("python -m openrlhf_hooks.train_ppo_ray: error: " + message), last
    assert "ray.init" not in result.stderr and "Started a local Ray" not in result.stderr


def test_cpu_dry_run_accepts_a_cpu_command_and_says_what_it_added(tmp_path):
    flags = [f for f in tiny_host_flags(tmp_path, 2, "--vllm.num_engines", "1") if f != "--ds.attn_implementation"]
    flags.remove("eager")
    command = [sys.executable, "-m", "openrlhf_hooks.train_ppo_ray", "--cpu", "--plugins_dry_run", *flags]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)["loss_plugin"] is None
    assert "--cpu adds --vllm.sync_backend gloo, --ds.attn_implementation eager, --vllm.enforce_eager" in result.stderr


def test_ray_resources_cover_the_placement_groups():
    from types import SimpleNamespace as NS

    args = NS(actor=NS(num_nodes=1, num_gpus_per_node=2), ref=NS(num_nodes=1, num_gpus_per_node=2),
              critic=NS(num_nodes=1, num_gpus_per_node=1), reward=NS(num_nodes=1),
              vllm=NS(num_engines=2, tensor_parallel_size=1))  # fmt: skip
    local = cpu_mode.ray_init_kwargs(args, connecting=False)
    assert local["num_gpus"] == 7 and local["num_cpus"] >= 8
    assert cpu_mode.ray_init_kwargs(args, connecting=True) == {}  # a running cluster has its own resources


def test_every_ray_worker_activates_cpu_mode_through_the_launchers_setup_hook(monkeypatch):
    # one setup hook for CPU mode and the host fixes (Ray takes one), on a local node and on a cluster
    from types import SimpleNamespace as NS

    from openrlhf_hooks import train_ppo_ray, worker_setup

    args = NS(actor=NS(num_nodes=1, num_gpus_per_node=2), ref=NS(num_nodes=1, num_gpus_per_node=0),
              critic=NS(num_nodes=1, num_gpus_per_node=0), reward=NS(num_nodes=1),
              vllm=NS(num_engines=1, tensor_parallel_size=1))  # fmt: skip
    for connecting in (False, True):
        kwargs = train_ppo_ray._ray_init_with_worker_setup(True, args, connecting)
        assert kwargs["runtime_env"] == {"worker_process_setup_hook": worker_setup.HOOK}
    monkeypatch.setenv(worker_setup.ENV_CPU_MODE, "1")
    try:
        worker_setup.run()  # what each worker runs first
        assert cpu_mode.active()
    finally:
        cpu_mode.deactivate()


def test_tiny_model_stops_about_a_quarter_of_the_time(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from openrlhf_hooks.testing import tiny_model

    tiny_model.build(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Find the coin."}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n") and tokenizer.eos_token == "<|im_end|>"
    tokens = torch.randint(0, len(tokenizer), (4, 96), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        stop = model(tokens).logits.softmax(-1)[..., tokenizer.eos_token_id].mean().item()
    assert 0.1 < stop < 0.4, stop
