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
