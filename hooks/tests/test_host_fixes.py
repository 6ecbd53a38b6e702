"""--host_fixes group_norm: OpenRLHF 0.11.2's own compute_advantages_and_returns on all-equal reward
groups, unpatched (the bug) and with the fix (hooks/openrlhf_hooks/host_fixes.py)."""

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from host_args import host_args, tiny_host_flags  # installs the flash_attn/vllm stand-ins
from openrlhf.trainer.ppo_utils.experience import Experience
from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker
from openrlhf_hooks import host_fixes

GROUP = 8
ACTIONS = 3
# all-equal groups whose value is not an exact binary fraction, then the controls: exact binary
# fractions (0.25, 1.0, 0.0), a binary group and two with partial credit
RESIDUE = [0.3, 0.1, 0.7]
CONTROLS = [0.25, 1.0, 0.0]
MIXED = [[0, 1, 1, 0, 0, 0, 1, 0], [0.3, 0.3, 0.1, 0.3, 0.3, 0.3, 0.3, 0.3], [0.2, 0.4, 0.6, 0.8, 0.1, 0.3, 0.5, 0.7]]


@pytest.fixture(scope="module")
def args():
    flags = tiny_host_flags("/nonexistent/model", 1, "--rollout.n_samples_per_prompt", str(GROUP), "--rollout.batch_size", "9",
                            "--train.batch_size", str(9 * GROUP), "--reward.clip_range", "-10", "10")  # fmt: skip
    return host_args(flags)


def experiences(groups, per_experience=4):
    """The host's experiences for these reward groups (prompt order), split into micro-batches as
    split_rollout_samples does; each reward a float32 tensor, as samples_generator builds it."""
    rewards = [float(r) for group in groups for r in group]
    made = []
    for start in range(0, len(rewards), per_experience):
        chunk = rewards[start : start + per_experience]
        made.append(
            Experience(
                action_mask=torch.ones(len(chunk), ACTIONS, dtype=torch.bool),
                kl=torch.zeros(len(chunk), ACTIONS),
                rewards=torch.cat([torch.tensor([r]) for r in chunk]),
                index=list(range(start, start + len(chunk))),
                info={"reward": torch.tensor(chunk)},
            )
        )
    return made


def advantages(args, groups):
    """Per group, the advantages the host computes (first action token of each sample)."""
    maker = object.__new__(RemoteExperienceMaker)
    maker.strategy, maker.args, maker.advantage_estimator = SimpleNamespace(args=args), args, "group_norm"
    maker.kl_ctl = SimpleNamespace(value=0.0)
    done = maker.compute_advantages_and_returns(experiences(groups))
    return torch.cat([e.advantages[:, 0] for e in done]).reshape(len(groups), GROUP), done


@pytest.fixture
def fixed():
    host_fixes.activate(["group_norm"])
    yield
    host_fixes.deactivate()


def test_unpatched_group_norm_gives_equal_groups_spurious_advantages(args):
    found, _ = advantages(args, [[r] * GROUP for r in RESIDUE + CONTROLS])
    residue, controls = found[: len(RESIDUE)], found[len(RESIDUE) :]
    # the bug: every all-equal group of a value that float32 cannot hold exactly gets a non-zero
    # advantage for something that carried no signal; eight 0.3s get +0.9 or more each
    assert (residue.abs().amax(dim=-1) > 0.5).all(), residue
    assert (controls == 0).all()  # exact binary fractions leave no residue


def test_the_fix_zeroes_equal_groups_and_keeps_every_other_advantage_exactly(args, fixed):
    groups = [[r] * GROUP for r in RESIDUE + CONTROLS] + MIXED
    found, done = advantages(args, groups)
    assert (found[: len(RESIDUE) + len(CONTROLS)] == 0).all()
    host_fixes.deactivate()
    host, host_done = advantages(args, groups)
    assert torch.equal(found[len(RESIDUE) + len(CONTROLS) :], host[len(RESIDUE) + len(CONTROLS) :])
    # the logged reward is the host's, not the shifted one
    assert all(torch.equal(a.info["reward"], b.info["reward"]) for a, b in zip(done, host_done))


def test_the_fix_acts_on_group_norm_only(args, fixed):
    args.algo.advantage.estimator = "rloo"
    try:
        batch = experiences([[0.3] * GROUP])  # the fix is on, yet rloo's rewards are left alone
        from openrlhf.trainer.ppo_utils import experience_maker

        experience_maker.apply_length_penalties(batch, args)
        assert torch.equal(torch.cat([e.rewards for e in batch]), torch.full((GROUP,), 0.3))
    finally:
        args.algo.advantage.estimator = "group_norm"


def test_zero_constant_groups_follows_the_host_layout():
    # samples arrive out of prompt order (index) and a group spans two micro-batches
    batch = [
        Experience(rewards=torch.tensor([0.5, 0.3, 0.5]), index=[2, 0, 3]),
        Experience(rewards=torch.tensor([0.3, 0.4]), index=[1, 4]),
    ]
    batch.append(Experience(rewards=torch.tensor([0.4]), index=[5]))
    assert host_fixes.zero_constant_groups(batch, 2) == 3  # groups (0.3, 0.3), (0.5, 0.5), (0.4, 0.4)
    assert [e.rewards.tolist() for e in batch] == [[0.0, 0.0, 0.0], [0.0, 0.0], [0.0]]
    uneven = [Experience(rewards=torch.tensor([0.5, 0.3]), index=[0, 1])]
    assert host_fixes.zero_constant_groups(uneven, 2) == 0 and uneven[0].rewards.tolist() == pytest.approx([0.5, 0.3])


def test_unknown_fix_is_one_line_before_anything_runs(tmp_path):
    launch = [sys.executable, "-m", "openrlhf_hooks.train_ppo_ray", "--host_fixes", "group_norm,nope", "--plugins_dry_run"]
    done = subprocess.run(launch, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "python -m openrlhf_hooks.train_ppo_ray: error: --host_fixes: unknown fix 'nope'; known fixes: group_norm"
    )


def test_dry_run_names_the_fixes(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "a"}) + "\n")
    flags = [*tiny_host_flags("/nonexistent/model", 1), "--data.prompt_dataset", str(prompts), "--data.input_key", "prompt"]
    launch = [sys.executable, "-m", "openrlhf_hooks.train_ppo_ray", *flags, "--host_fixes", "group_norm", "--plugins_dry_run"]
    done = subprocess.run(launch, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["host_fixes"] == ["group_norm"]
