"""When the corridor holds entropy down from above (docs/spec.md section 8): the one-step test, the dry
run's `corridor` field and start-up warning, and the rank's above_corridor / net_bonus_above metrics."""

import json
import math

import pytest
import torch

from float64_reference import ref_token_entropy
from openrlhf_epo import EPOConfig
from openrlhf_epo.core import aggregate, corridor_strength, epo_loss, net_bonus_above, phase_weight
from openrlhf_epo.plugin import EPOLossPlugin
from openrlhf_epo.rank import EPORankLoss
from openrlhf_hooks import RankContext

K = 20
MASK = torch.tensor([[0, 1, 1, 1, 0, 1, 1, 0], [0, 1, 1, 1, 1, 1, 0, 0]], dtype=torch.float64)


def high_entropy_logits():
    generator = torch.Generator().manual_seed(3)
    return torch.randn(*MASK.shape, 12, generator=generator, dtype=torch.float64) * 0.3  # near log 12


@pytest.mark.parametrize("preset, goes", [("two-sided", "down"), ("paper-sciworld", "up"), ("seed", "up")])
def test_one_step_above_the_corridor(preset, goes):
    # L_policy = 0 and the batch's entropy above the corridor's upper bound (the reference puts L_H
    # 0.3 nats above it): one gradient step moves L_H the way section 8 says
    config = EPOConfig.from_preset(preset)
    x = high_entropy_logits().requires_grad_(True)
    before = aggregate(ref_token_entropy(x), MASK, config.aggregation).item()
    reference = (before - 0.3) / config.kappa_right
    loss, metrics = epo_loss(torch.tensor(0.0, dtype=torch.float64), ref_token_entropy(x), MASK, reference, 0, K, config)
    assert metrics["entropy"] > metrics["upper"]
    (grad,) = torch.autograd.grad(loss, x)
    stepped = (x - 1.0 / config.lambda_entropy * grad).detach()  # a step of the same size for every lambda
    after = aggregate(ref_token_entropy(stepped), MASK, config.aggregation).item()
    assert (after < before) if goes == "down" else (after > before), (before, after)


def test_corridor_strength_per_preset():
    def strength(preset, total_steps=K):
        config = EPOConfig.from_preset(preset)
        return corridor_strength(config.penalty, config.alpha, config.gamma, config.mid_fraction, total_steps)

    betas = [phase_weight(k, K, 3.0, 0.5) for k in range(K)]
    two_sided = strength("two-sided")
    assert two_sided["holds_from_above"] is True
    assert two_sided["beta_alpha"] == pytest.approx([2.0 * min(betas), 2.0 * max(betas)])
    sciworld = strength("paper-sciworld")
    assert sciworld["holds_from_above"] is False and sciworld["beta_alpha"] == pytest.approx([0.05 * min(betas), 0.1])
    assert "holds_beyond" not in sciworld
    seed = strength("seed")
    seed_betas = [phase_weight(k, K, 1.0, 0.6) for k in range(K)]
    assert seed["holds_from_above"] is False  # the squared penalty's slope is 0 at the upper bound
    assert seed["holds_beyond"] == pytest.approx([1 / (2 * 0.1 * max(seed_betas)), 1 / (2 * 0.1 * min(seed_betas))])
    assert seed["holds_beyond"][0] == pytest.approx(2.5)  # spec section 8: 2.5 to 5 nats above
    assert strength("released-code")["holds_from_above"] is False  # the indicator never holds
    # K unknown: beta's whole range (1, 2]; alpha 1 then never holds at every step, alpha 2 does
    assert corridor_strength("hinge", 1.0, 3.0, 0.5, None) == {"holds_from_above": False, "beta_alpha": [1.0, 2.0]}
    assert corridor_strength("hinge", 2.0, 3.0, 0.5, None)["holds_from_above"] is True
    assert corridor_strength("squared", 0.0, 3.0, 0.5, K)["holds_beyond"] == [None, None]


def test_net_bonus_above_has_the_sign_of_the_gradient():
    # two-sided at step 0: beta 2, alpha 2 -> lambda * (1 - 4) < 0, the corridor pulls down
    assert net_bonus_above(0.001, 2.0, 2.0, "hinge", 0.0) == pytest.approx(-0.003)
    assert net_bonus_above(0.001, 0.05, 2.0, "hinge", 0.0) == pytest.approx(0.0009)
    assert net_bonus_above(0.1, 0.1, 2.0, "squared", 0.3) == pytest.approx(0.1 * (1 - 2 * 0.1 * 0.6))
    assert net_bonus_above(0.1, 0.1, 2.0, "squared", -0.3) == pytest.approx(0.1)  # inside: slope 0
    assert net_bonus_above(0.1, 0.1, 2.0, "squared", 3.0) < 0  # 2.5 nats beyond: it finally pulls down
    assert net_bonus_above(0.001, 0.05, 2.0, "indicator", 0.0) == pytest.approx(0.001)
    assert math.isnan(net_bonus_above(0.1, 0.1, 2.0, "squared", math.nan))


def test_the_plugin_reports_the_corridor_and_warns_when_it_does_not_hold():
    plugin = EPOLossPlugin()
    two_sided = EPOConfig.from_preset("two-sided").to_dict()
    assert plugin.report(two_sided, K)["corridor"]["holds_from_above"] is True
    assert plugin.start_up_warnings(two_sided, K) == []
    sciworld = EPOConfig.from_preset("paper-sciworld").to_dict()
    (line,) = plugin.start_up_warnings(sciworld, K)
    assert "does not hold entropy down from above" in line and "never above 1" in line
    (line,) = plugin.start_up_warnings(EPOConfig.from_preset("seed").to_dict(), K)
    assert "only once L_H is 2.5 to" in line
    # --epo.total_steps wins over the launcher's count
    pinned = EPOConfig.from_preset("two-sided", total_steps=2).to_dict()
    assert plugin.report(pinned, 1000)["corridor"]["beta_alpha"][0] == pytest.approx(2 * phase_weight(1, 2, 3.0, 0.5))


def run_step(loss, entropy):
    loss.begin_step()
    loss.begin_optimizer_step([(entropy.detach(), MASK)] if loss.needs_optimizer_step_entropy() else None)
    loss.policy_loss((torch.tensor(0.0, dtype=torch.float64),), action_mask=MASK, entropy=entropy, loss_batch_info={})
    return loss.end_step()


@pytest.mark.parametrize("preset", ["two-sided", "paper-sciworld", "seed"])
def test_rank_logs_above_corridor_and_net_bonus_above(preset):
    config = EPOConfig.from_preset(preset, warmup=1, window_size=None)
    loss = EPORankLoss(config, RankContext(0, 1, K, lambda tensor: tensor))
    low = torch.full(MASK.shape, 0.5, dtype=torch.float64)
    first = run_step(loss, low)  # warm-up: no corridor yet
    assert math.isnan(first["above_corridor"]) and math.isnan(first["net_bonus_above"])
    high = low.clone()
    high[0, 1:4] = 5.0  # three tokens far above kappa_r * 0.5
    second = run_step(loss, high)
    upper = second["upper"]
    if config.penalty == "squared":
        assert second["above_corridor"] == float(second["entropy"] > upper) == 1.0
        expected = net_bonus_above(config.lambda_entropy, config.alpha, second["beta"], "squared", second["entropy"] - upper)
    else:
        tokens = MASK.bool()
        assert second["above_corridor"] == pytest.approx(float((high[tokens] > upper).sum() / tokens.sum()))
        expected = net_bonus_above(config.lambda_entropy, config.alpha, second["beta"], config.penalty, 0.0)
    assert second["net_bonus_above"] == pytest.approx(expected)
    assert (second["net_bonus_above"] < 0) == (preset == "two-sided")


def test_dry_run_has_the_corridor_field_and_the_warning(tmp_path):
    from test_dry_run import host_flags, launch  # the dry run's own harness: no vLLM, no flash-attn

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"task {i}"}) + "\n" for i in range(100)))
    for preset, holds in (("two-sided", True), ("paper-sciworld", False), ("seed", False)):
        done = launch(*host_flags(prompts), "--loss_plugin", "epo", "--epo.preset", preset, "--plugins_dry_run")
        assert done.returncode == 0, done.stderr[-2000:]
        report = json.loads(done.stdout)
        assert report["corridor"]["holds_from_above"] is holds
        warned = [line for line in done.stderr.splitlines() if "does not hold entropy down from above" in line]
        assert len(warned) == (0 if holds else 1), done.stderr[-2000:]
        assert ("holds_beyond" in report["corridor"]) == (preset == "seed")
