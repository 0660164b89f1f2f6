"""slime-style asynchronous RL for GLM-5: rollouts on our engine, training on our trainer, a data buffer and a
rollout manager (``glm5 rl``).

Modules (one idea each):

* ``sample``       the :class:`Sample` record (token ids, rollout log-probs, loss mask, reward, group, versions, status)
* ``losses``       ONE policy loss with switches (PPO clip-higher, GSPO, GLM-5 DDIS, CISPO, REINFORCE; TIS / IcePop /
                   double-sided IS mask; KL k1/k2/k3; entropy; token/sequence averaging) + advantage estimators
* ``rewards``      answer after ``</think>``, verifiable scoring, the abstention reward (+1 / 0 / −1), plugins
* ``tasks``        offline tasks (reasoning-gym generators, a built-in one) + unanswerable questions
* ``tools``        calculator and a sandboxed Python interpreter for multi-turn rollouts
* ``buffer``       prompts → groups, partial-rollout resume, dynamic sampling, staleness bound τ with counters
* ``rollout``      rollout logic over ``glm5.engine.LLMEngine`` (multi-turn, tool outputs masked)
* ``rollout_worker``  the rollout process; ``rollout_client``: the clients the manager drives (process, local);
                   ``rollout_pool``: several rollout workers as one
* ``weight_sync``  version-stamped weights trainer → rollout: in process, shared memory, torch.distributed broadcast
* ``trainer``      the RL train step on ``glm5.train.optim`` (Muon / AdamW)
* ``manager``      sync / one-step-off / async schedules
* ``metrics``      batch metrics, intervals, JSONL, PNG; ``evaluate`` held-out before/after with paired intervals
* ``runner``       ``run_rl(RLConfig)``: the whole job; ``cli``: ``glm5 rl``; ``ray_launcher``: optional Ray placement

Quick use::

    from glm5.rl import RLConfig, run_rl
    summary = run_rl(RLConfig(model="runs/sft/hf", out="runs/rl", manager={"mode": "async", "num_steps": 50, "tau": 2}))
"""

from glm5.rl.losses import LossConfig, compute_advantages, policy_loss
from glm5.rl.sample import Sample, Status

__all__ = ["LossConfig", "RLConfig", "Sample", "Status", "compute_advantages", "policy_loss", "run_rl"]


def __getattr__(name):  # the runner pulls in the engine and trainer: import it on first use only
    if name in ("RLConfig", "run_rl"):
        from glm5.rl import runner

        return getattr(runner, name)
    raise AttributeError(name)
