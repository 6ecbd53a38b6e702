"""A third-party loss plugin: multiplies the host's policy loss by --scaled.factor.

It is found exactly like EPO: through the `openrlhf_hooks` entry point in its pyproject.toml.
"""

from openrlhf_hooks import LossPlugin, PluginConfigError, RankLoss, hookimpl


class ScaledRankLoss(RankLoss):
    def __init__(self, factor: float):
        self.factor = factor
        self.calls = 0

    def policy_loss(self, host_outputs, *, action_mask, entropy, loss_batch_info):
        self.calls += 1
        return (host_outputs[0] * self.factor, *host_outputs[1:])

    def end_step(self):
        return {"factor": self.factor, "calls": float(self.calls)}


class ScaledLossPlugin(LossPlugin):
    name = "scaled"
    version = "0.2.0"

    def add_arguments(self, group):
        group.add_argument("--scaled.factor", metavar="X", help="multiplier of the policy loss (> 0)")

    def resolve_config(self, flags):
        text = flags.get("factor") or "1.0"
        try:
            factor = float(text)
        except ValueError:
            factor = float("nan")
        if not factor > 0:
            raise PluginConfigError(f"--scaled.factor={text!r} is invalid: expected a number > 0")
        return {"factor": factor}

    def host_summary(self, host_args):
        return {"actor.policy_loss_type": host_args.actor.policy_loss_type}

    def build_rank_loss(self, host_args, config, context):
        return ScaledRankLoss(config["factor"])


@hookimpl
def register_loss_plugins(register):
    register(ScaledLossPlugin())
