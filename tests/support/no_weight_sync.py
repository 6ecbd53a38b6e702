"""The launcher with vLLM's side of the weight sync loading nothing: the negative control of the
end-to-end test's check that trained weights reach vLLM (tests/test_e2e_cpu.py).

Run as a script with tests/support on PYTHONPATH: vLLM's engine-core process imports the worker
extension below by name."""

import sys

import torch

from openrlhf_hooks import cpu_mode, train_ppo_ray
from openrlhf_hooks.cpu_worker import CPUWorkerWrap


class ReceiveOnlyWorkerWrap(CPUWorkerWrap):
    def update_weight(self, name, dtype, shape, empty_cache=False):
        # takes part in the broadcast (rank 0 waits for it) and drops what arrives
        self._model_update_group.broadcast(torch.empty(shape, dtype=dtype), src=0)


if __name__ == "__main__":
    cpu_mode.WORKER_EXTENSION = "no_weight_sync.ReceiveOnlyWorkerWrap"
    sys.exit(train_ppo_ray.main())
