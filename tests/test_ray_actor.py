"""The training-rank actor with the plugin inside, created the way the host creates it, in real Ray.

Workers are separate processes: they get the flash_attn/vllm stand-ins through Ray's
worker_process_setup_hook (tests only), and resolve the plugin themselves from the host's args.
"""

import os
from pathlib import Path

import pytest
import ray
from ray.cluster_utils import Cluster

from host_args import host_args, tiny_host_flags  # installs the stand-ins in this process
from openrlhf.trainer.ray.launcher import RayActorGroup
from openrlhf_hooks import plugins
from openrlhf_hooks.ray_actor import PolicyModelActor

SUPPORT = str(Path(__file__).parent / "support")
RUNTIME_ENV = {
    "worker_process_setup_hook": "stand_ins.install",
    "env_vars": {"PYTHONPATH": os.pathsep.join([SUPPORT, os.environ.get("PYTHONPATH", "")])},
}


def epo_args(world):
    return host_args([*tiny_host_flags("/nonexistent/model", world), "--loss_plugin", "epo", "--epo.preset", "paper-sciworld"])


def reports(group, args):
    return ray.get([actor.hooks_report.remote(args) for actor in group._actor_handlers], timeout=300)


def test_rank_actor_reports_epo_active_in_its_worker_process():
    ray.init(num_cpus=4, num_gpus=1, include_dashboard=False, runtime_env=RUNTIME_ENV)
    try:
        group = RayActorGroup(1, 1, PolicyModelActor, pg=None, num_gpus_per_actor=1)
        (report,) = reports(group, epo_args(1))
        assert report["pid"] != os.getpid()
        assert report["loss_plugin"] == "epo" and report["rank_loss"] == "EPORankLoss"
    finally:
        ray.shutdown()


def test_two_node_cluster_workers_do_not_depend_on_driver_state(monkeypatch):
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 1})
    cluster.add_node(num_cpus=2, num_gpus=1)
    try:
        ray.init(address=cluster.address, runtime_env=RUNTIME_ENV)
        args = epo_args(2)
        # The driver's own plugin registry is emptied: workers must resolve EPO on their own.
        monkeypatch.setattr(plugins, "_cached", plugins.Registry(manager=None))
        group = RayActorGroup(2, 1, PolicyModelActor, pg=None, num_gpus_per_actor=1)
        got = reports(group, args)
        assert len({r["node_id"] for r in got}) == 2  # one rank per node
        assert all(r["loss_plugin"] == "epo" and r["rank_loss"] == "EPORankLoss" for r in got)
        with pytest.raises(plugins.PluginError):
            plugins.get_registry().loss_plugin("epo")
    finally:
        ray.shutdown()
        cluster.shutdown()


class _RayStarted(Exception):
    pass


def test_two_node_cluster_workers_load_the_driver_plugin_selection(tmp_path, monkeypatch):
    """OPENRLHF_HOOKS_PLUGINS set in the driver only (the nodes started without it) reaches the
    workers on both nodes through the launcher: the host's own ray.init gets it in its runtime_env.
    Every worker can see an installed plugin that fails to import, which the driver leaves out; a
    worker that loaded all plugins would fail on it."""
    from fake_plugins import install_fake_plugin
    from openrlhf_hooks.train_ppo_ray import run_host

    install_fake_plugin(tmp_path, "brokenplug", {"broken": "broken_module"}, {"broken_module": "raise RuntimeError('broken')\n"})
    monkeypatch.delenv(plugins.ENV_PLUGINS, raising=False)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 1})
    cluster.add_node(num_cpus=2, num_gpus=1)
    try:
        monkeypatch.setenv(plugins.ENV_PLUGINS, "epo,scaled")
        monkeypatch.syspath_prepend(str(tmp_path))
        monkeypatch.setattr(plugins, "_cached", None)
        registry = plugins.get_registry()
        args = epo_args(2)
        real_init = ray.init

        def init(*a, **kwargs):
            # what only this test adds: the cluster's address, the stand-ins, and the broken plugin on the path
            runtime_env = kwargs["runtime_env"]
            runtime_env["env_vars"]["PYTHONPATH"] = os.pathsep.join([str(tmp_path), RUNTIME_ENV["env_vars"]["PYTHONPATH"]])
            runtime_env["worker_process_setup_hook"] = RUNTIME_ENV["worker_process_setup_hook"]
            real_init(address=cluster.address, **kwargs)
            raise _RayStarted  # stop the host's train() right after it started Ray

        monkeypatch.setattr(ray, "init", init)
        with pytest.raises(_RayStarted):
            run_host(tiny_host_flags("/nonexistent/model", 2), lambda host_args: None, None, plugins.worker_env(registry))
        assert ray.is_initialized()
        group = RayActorGroup(2, 1, PolicyModelActor, pg=None, num_gpus_per_actor=1)
        got = reports(group, args)
        assert len({r["node_id"] for r in got}) == 2  # one rank per node
        assert all(r["loss_plugin"] == "epo" and r["rank_loss"] == "EPORankLoss" for r in got)
    finally:
        ray.shutdown()
        cluster.shutdown()
