"""Rank agreement over gloo: two processes, each with its own EPORankLoss, the hook layer's check
(openrlhf_hooks.agreement.RankAgreement, as HookedTrainer runs it) and the host adapter's all-reduce
(openrlhf_hooks.trainer.dp_all_reduce_sum), compare a checksum of the plugin's state at the start of
a step: every `--epo.check_every` steps and always on the first step after a resume.

Agreeing ranks train on; a rank whose history was changed, or that resumed from another state,
stops both ranks with RankStateMismatchError naming the ranks.
"""

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from openrlhf_epo import EPOConfig
from openrlhf_epo.rank import EPORankLoss
from openrlhf_hooks import RankContext, RankStateMismatchError
from openrlhf_hooks import agreement as agreement_module
from openrlhf_hooks.agreement import RankAgreement
from openrlhf_hooks.trainer import dp_all_reduce_sum

from gloo import run_ranks  # tests/support
from float64_reference import ref_token_entropy

MASK = torch.tensor([[0, 1, 1, 0, 1, 1, 1, 0], [1, 1, 0, 0, 0, 1, 1, 1]])
INFO = {"global_batch_size": 4, "batch_num_tokens": 2 * int(MASK.sum()), "dp_size": 2}


def _entropy(rank: int, step: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(100 * rank + step)
    return ref_token_entropy(torch.randn(*MASK.shape, 5, generator=generator, dtype=torch.float64) * 2)


def _steps(loss: EPORankLoss, agreement: RankAgreement, rank: int, count: int, tamper_after: int = -1) -> None:
    for _ in range(count):
        agreement.check()
        loss.begin_step()
        host = (torch.tensor(0.0, dtype=torch.float64),)
        entropy = _entropy(rank, loss.step)
        loss.begin_optimizer_step([(entropy, MASK)] if loss.needs_optimizer_step_entropy() else None)
        loss.policy_loss(host, action_mask=MASK, entropy=entropy, loss_batch_info=INFO)
        loss.end_step()
        if rank == 1 and loss.step - 1 == tamper_after:
            loss.history.push(0.123)  # this rank's history no longer matches the other's


def _scenario(name: str, rank: int, saved: dict):
    """Run one scenario on this rank; returns (history values, checksums computed, error message)."""
    calls = []
    original = agreement_module.state_checksum

    def counting(state):
        calls.append(1)
        return original(state)

    agreement_module.state_checksum = counting
    context = RankContext(rank=rank, dp_size=2, total_steps=10, all_reduce_sum=dp_all_reduce_sum(SimpleNamespace()))
    # seed preset: the squared penalty also all-reduces once per micro-batch
    every = 0 if name.startswith("resume") else 1
    loss = EPORankLoss(EPOConfig.from_preset("seed", warmup=1, check_every=every), context)
    agreement = RankAgreement(loss, context, "epo")
    error = None
    try:
        if name == "agree":
            _steps(loss, agreement, rank, 3)
            saved["state"] = loss.state_dict()
        elif name == "tampered":
            _steps(loss, agreement, rank, 3, tamper_after=0)
        elif name == "resume-agree":
            loss.load_state_dict(saved["state"])
            agreement.restored(3)
            _steps(loss, agreement, rank, 1)
        elif name == "resume-tampered":
            state = saved["state"]
            if rank == 1:
                values = [v + 1e-9 for v in state["history"]["values"]]
                state = {**state, "history": {**state["history"], "values": values}}
            loss.load_state_dict(state)
            agreement.restored(3)
            _steps(loss, agreement, rank, 1)
    except RankStateMismatchError as exc:
        error = str(exc)
    finally:
        agreement_module.state_checksum = original
    return loss.history.values(), len(calls), error


SCENARIOS = ("agree", "tampered", "resume-agree", "resume-tampered")


def _worker(rank: int, world: int, port: int, queue):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        saved: dict = {}
        queue.put((rank, {name: _scenario(name, rank, saved) for name in SCENARIOS}))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks():
    return run_ranks(_worker, world=2)


def test_agreeing_ranks_check_every_step_and_train_on(two_ranks):
    for rank in (0, 1):
        values, checks, error = two_ranks[rank]["agree"]
        assert error is None and checks == 3 and len(values) == 3
    assert two_ranks[0]["agree"][0] == two_ranks[1]["agree"][0]


def test_a_changed_history_stops_both_ranks_naming_them(two_ranks):
    for rank in (0, 1):
        _, _, error = two_ranks[rank]["tampered"]
        assert error is not None and "loss plugin 'epo': the data-parallel ranks disagree about its state at step 1:" in error
        assert "rank 0: " in error and "rank 1: " in error


def test_the_check_after_a_resume_runs_even_with_periodic_checks_off(two_ranks):
    for rank in (0, 1):
        values, checks, error = two_ranks[rank]["resume-agree"]
        assert error is None and checks == 1 and len(values) == 4
        _, _, error = two_ranks[rank]["resume-tampered"]
        assert error is not None and "at step 3 (after a resume)" in error and "rank 1: " in error


def test_tensors_in_a_state_count_by_value_and_other_objects_name_the_plugin():
    from openrlhf_hooks import PluginError, RankLoss
    from openrlhf_hooks.agreement import state_checksum

    assert state_checksum({"a": torch.tensor([1.0, 2.0])}) == state_checksum({"a": [1.0, 2.0]})
    assert state_checksum({"a": [1.0, 2.0]}) != state_checksum({"a": [1.0, 2.5]})

    class Opaque(RankLoss):
        def state_dict(self):
            return {"handle": object()}

    one_rank = RankContext(rank=0, dp_size=1, total_steps=None, all_reduce_sum=lambda tensor: tensor)
    with pytest.raises(PluginError, match=r"loss plugin 'opaque': state_dict\(\) must return plain data"):
        RankAgreement(Opaque(), one_rank, "opaque").check()
