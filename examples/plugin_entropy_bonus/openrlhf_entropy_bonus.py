"""An entropy bonus as an OpenRLHF loss plugin, written from docs/plugins.md alone.

    python -m openrlhf_hooks.train_ppo_ray <OpenRLHF flags> --loss_plugin entropy_bonus --entropy_bonus.coef 0.01

Adds -coef * (mean entropy of the policy over the action tokens of each optimizer step) to the
actor's loss, normalised like the host's own token-mean loss, so that its gradient does not depend
on micro-batch size, gradient accumulation or the number of ranks. Logs train/entropy_bonus/entropy
(the token mean over the RL step, all ranks) and train/entropy_bonus/term (-coef x entropy).

Check it on CPU:  python -m openrlhf_hooks.testing --loss_plugin entropy_bonus --entropy_bonus.coef 0.1
"""

import torch

from openrlhf_hooks import LossPlugin, PluginConfigError, RankLoss, hookimpl


class EntropyBonusRankLoss(RankLoss):
    needs_entropy = True

    def __init__(self, coef, context):
        self.coef = coef
        self.context = context
        self.steps = 0
        self._sums = torch.zeros(2, dtype=torch.float64)  # entropy summed over action tokens, action tokens

    def begin_step(self):
        self._sums.zero_()

    def policy_loss(self, host_outputs, *, action_mask, entropy, loss_batch_info):
        mask = action_mask.to(entropy.dtype)
        entropy_sum = (entropy * mask).sum()
        # this micro-batch's share of the optimizer step's token mean, as the host's aggregate_loss takes it
        share = entropy_sum / loss_batch_info["batch_num_tokens"] * loss_batch_info["dp_size"]
        term = -self.coef * share
        self._sums += torch.stack([entropy_sum.detach(), mask.sum()]).double().cpu()
        return (host_outputs[0] + term.to(host_outputs[0].dtype), *host_outputs[1:])

    def end_step(self):
        # summed over all ranks, so that every rank reports the same numbers
        entropy_sum, tokens = self.context.all_reduce_sum(self._sums.clone()).tolist()
        entropy = entropy_sum / tokens if tokens else float("nan")
        self.steps += 1
        return {"entropy": entropy, "term": -self.coef * entropy, "steps": float(self.steps)}

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state):
        self.steps = int(state["steps"])


class EntropyBonusPlugin(LossPlugin):
    name = "entropy_bonus"
    version = "0.1.0"

    def add_arguments(self, group):
        group.add_argument("--entropy_bonus.coef", metavar="X", help="weight of the entropy bonus (>= 0; default 0.01)")

    def resolve_config(self, flags):
        text = flags.get("coef")
        if text is None:
            return {"coef": 0.01}
        try:
            coef = float(text)
        except ValueError:
            coef = float("nan")
        if not 0 <= coef < float("inf"):
            raise PluginConfigError(f"--entropy_bonus.coef={text!r} is invalid: expected a finite number >= 0")
        return {"coef": coef}

    def check_host(self, host_args, config):
        if host_args.actor.entropy_coef:  # None or 0 when the user did not ask for the host's own bonus
            raise PluginConfigError(
                f"--actor.entropy_coef={host_args.actor.entropy_coef} adds the host's entropy bonus as well; "
                "use one of --actor.entropy_coef and --loss_plugin entropy_bonus"
            )

    def host_summary(self, host_args):
        return {"actor.entropy_coef": host_args.actor.entropy_coef, "rollout.temperature": host_args.rollout.temperature}

    def build_rank_loss(self, host_args, config, context):
        return EntropyBonusRankLoss(config["coef"], context)


@hookimpl
def register_loss_plugins(register):
    register(EntropyBonusPlugin())
