"""The RL trainer: :func:`rl` runs rollouts and policy-gradient steps on the shared loop.

Each step samples (or, with ``ppo_epochs > 1``, reuses) a batch of rollouts
(:mod:`steer_lens.train.rl.rollout`), computes the log-probabilities of the sampled tokens by a training
forward pass (the same numerics as the loss, not the sampling logits) and returns the clipped
policy-gradient loss (:mod:`steer_lens.train.rl.loss`) to :func:`~steer_lens.train.loop.run_loop`,
which owns AdamW, clipping, checkpoints, resume and the NaN guard. What a run carries from step to
step is an :class:`RLState`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from steer_lens.errors import ConfigError
from steer_lens.hf_generation import HFSampler
from steer_lens.steering import Generation, SteeredTransformer
from steer_lens.train import distributed
from steer_lens.train.loop import (
    TrainResult,
    accumulate_gradients,
    micro_batches,
    run_loop,
    typical_resid_rms,
)
from steer_lens.train.recompute import recompute_context
from steer_lens.train.rewards import reward_name
from steer_lens.train.rl.advantages import AdvantageEstimator, estimator_state, get_advantage
from steer_lens.train.rl.config import RLConfig
from steer_lens.train.rl.loss import completion_logprobs, policy_loss
from steer_lens.train.rl.rollout import Rollout, collect_rollout, prompt_items, prompt_order, sample
from steer_lens.train.supervised import heldout_loss

__all__ = ["RLResult", "RLState", "rl"]


@dataclass
class RLState:
    """What an :func:`rl` run carries from one step to the next.

    Attributes:
        steered: the :class:`~steer_lens.SteeredTransformer` being trained.
        items, texts: the prompts as sampling items and as text (see
            :func:`~steer_lens.train.rl.rollout.prompt_items`).
        order: prompt indices, ``prompts_per_step`` per batch of rollouts.
        reward: the reward callable.
        estimator: this run's advantage estimator (its own state, e.g. REINFORCE's baseline, inside).
        config: the :class:`~steer_lens.train.rl.RLConfig`.
        rollout: the current batch of rollouts (``None`` before the first step).
        rollout_index: which batch ``rollout`` is (``-1`` before the first).
        old_logp: ``[batch, new]`` log-probs under the policy that sampled ``rollout`` (PPO epochs only).
    """

    steered: SteeredTransformer
    items: list[Any]
    texts: list[str]
    order: list[int]
    reward: Callable[..., Any]
    estimator: AdvantageEstimator
    config: RLConfig
    rollout: Rollout | None = None
    rollout_index: int = -1
    old_logp: Tensor | None = None

    def rollout_for(self, step: int) -> Rollout:
        """The batch of rollouts optimisation step ``step`` uses (sampled when the batch changes).

        If sampling, scoring or weighing fails, the estimator's state is put back as it was, so a
        resumed run does not count the failed batch in REINFORCE's baseline.
        """
        r = step // self.config.ppo_epochs
        if self.rollout is None or self.rollout_index != r:
            per = self.config.prompts_per_step
            before = estimator_state(self.estimator)
            try:
                self.rollout = collect_rollout(
                    self.steered, self.items, self.texts, self.order[r * per : (r + 1) * per],
                    reward=self.reward, estimator=self.estimator, config=self.config, rollout=r,
                )
            except BaseException:
                if before is not None:
                    self.estimator.load_state_dict(before)
                raise
            self.rollout_index = r
            self.old_logp = None
        return self.rollout

    def checkpoint_state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """The rollout in flight, the PPO reference log-probs and the estimator's state (a ``RunState``).

        Saved with every checkpoint of :func:`rl` so that ``resume=True`` continues with the very
        batch of rollouts an uninterrupted run would use (``ppo_epochs > 1``) and REINFORCE's baseline
        as it was; see :class:`~steer_lens.train.loop.RunState`.
        """
        tensors: dict[str, Tensor] = {}
        meta: dict[str, Any] = {"rollout_index": self.rollout_index, "rollout": None}
        est = estimator_state(self.estimator)
        if est is not None:
            meta["estimator"] = {k: None if v is None else "tensor" for k, v in est.items()}
            tensors.update({f"estimator.{k}": v for k, v in est.items() if v is not None})
        ro = self.rollout
        if ro is not None:
            g = ro.generation
            tensors.update({"tokens": g.tokens, "attention_mask": g.attention_mask,
                            "completion_mask": g.completion_mask, "rewards": ro.rewards,
                            "advantages": ro.advantages})
            if ro.ref_logp is not None:
                tensors["ref_logp"] = ro.ref_logp
            if self.old_logp is not None:
                tensors["old_logp"] = self.old_logp
            meta["rollout"] = {"prompt_len": g.prompt_len, "prompts": g.prompts, "completions": g.completions,
                               "sample_seconds": ro.sample_seconds, "score_seconds": ro.score_seconds,
                               "reference_seconds": ro.reference_seconds, "reward_prompts": list(ro.prompts),
                               "reward_completions": list(ro.completions)}
        return {k: v.detach().cpu() for k, v in tensors.items()}, meta

    def load_checkpoint_state(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        """Restore what :meth:`checkpoint_state` saved (tensors moved to the model's device)."""
        dev = self.steered.device
        t = {k: v.to(dev) for k, v in tensors.items()}
        if "estimator" in meta and hasattr(self.estimator, "load_state_dict"):
            self.estimator.load_state_dict({k: t.get(f"estimator.{k}") for k in meta["estimator"]})
        self.rollout_index = int(meta["rollout_index"])
        m = meta.get("rollout")
        if m is None:
            self.rollout, self.old_logp = None, None
            return
        g = Generation(tokens=t["tokens"], attention_mask=t["attention_mask"], completion_mask=t["completion_mask"],
                       prompt_len=int(m["prompt_len"]), prompts=m["prompts"], completions=m["completions"])
        self.rollout = Rollout(
            generation=g, rewards=t["rewards"], advantages=t["advantages"], ref_logp=t.get("ref_logp"),
            sample_seconds=float(m["sample_seconds"]), score_seconds=float(m.get("score_seconds", 0.0)),
            reference_seconds=float(m.get("reference_seconds", 0.0)), prompts=tuple(m["reward_prompts"]),
            completions=tuple(m["reward_completions"]),
        )
        self.old_logp = t.get("old_logp")

    def step(self, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss and metrics of optimisation step ``step`` (the ``step_fn`` of ``run_loop``).

        With ``config.micro_batch_size`` the batch is scored in micro-batches and the backward
        pass of all but the last runs here (:func:`~steer_lens.train.loop.accumulate_gradients`);
        ``run_loop``'s ``loss.backward()`` adds the last one's.
        """
        config = self.config
        ro = self.rollout_for(step)
        g = ro.generation
        n_tok = g.completion_mask.sum() if ro.n_tokens is None else ro.n_tokens  # distributed: the global count
        fresh: list[Tensor] = []  # log-probs of the sampling policy, collected for later PPO epochs

        def chunk_loss(rows: slice) -> tuple[Tensor, dict[str, Tensor]]:
            with recompute_context(self.steered, config.recompute):
                logp, ent = completion_logprobs(
                    self.steered, g.tokens[rows], g.attention_mask[rows], g.prompt_len,
                    entropy_grad=config.entropy_coef > 0, temperature=config.logprob_temperature,
                    share_prompts=config.recompute is False,  # (a block with a KV cache is not recomputed)
                )
            if config.ppo_epochs > 1 and self.old_logp is None:
                fresh.append(logp.detach())
            return policy_loss(
                logp, ro.advantages[rows], g.completion_mask[rows],
                old_logp=None if self.old_logp is None else self.old_logp[rows],
                ref_logp=None if ro.ref_logp is None else ro.ref_logp[rows], entropy=ent,
                kl_coef=config.kl_coef, entropy_coef=config.entropy_coef, clip_eps=config.clip_eps,
                n_tokens=n_tok,
            )

        loss, metrics = accumulate_gradients(micro_batches(g.tokens.shape[0], config.micro_batch_size), chunk_loss)
        if fresh:
            self.old_logp = torch.cat(fresh)
        # distributed: the loss terms are shards' parts of global means; sum them (one all_reduce)
        metrics = dict(zip(metrics, distributed.all_reduce_sum(torch.stack(list(metrics.values()))), strict=True))
        rewards = ro.rewards if ro.batch_rewards is None else ro.batch_rewards
        metrics.update(
            reward=rewards.mean(),
            reward_std=rewards.std() if rewards.numel() > 1 else torch.zeros(()),
            completion_tokens=n_tok.float() / rewards.shape[0],
            tokens_per_s=n_tok.float() / max(ro.sample_seconds, 1e-9),
            sample_s=torch.tensor(ro.sample_seconds),
            score_s=torch.tensor(ro.score_seconds),
            reference_s=torch.tensor(ro.reference_seconds),
        )
        if config.heldout_texts and (step % config.heldout_every == 0 or step == config.steps - 1):
            with torch.no_grad():
                metrics["heldout_loss"] = torch.tensor(heldout_loss(self.steered, config.heldout_texts))
        return loss, metrics


@dataclass(frozen=True)
class RLResult(TrainResult):
    """What :func:`rl` returns: a :class:`~steer_lens.train.loop.TrainResult` plus RL samples.

    Metrics per step (``metrics[name]``, CPU float tensors ``[steps]``): ``loss``, ``reward`` (mean),
    ``reward_std``, ``kl`` (k3 to the base, nats/token; penalised only with ``kl_coef``; absent
    when ``kl_coef=0`` and ``log_kl=False``, which skip the reference forward), ``entropy``
    (nats/token), ``pg_loss``, ``clip_frac``, ``completion_tokens`` (mean generated tokens per
    completion), ``tokens_per_s`` (sampling throughput), ``sample_s``
    (seconds sampling), ``score_s`` (seconds in the reward), ``reference_s`` (seconds in the base
    model's forward for ``kl``; 0 without it), ``heldout_loss`` (nats/token; NaN between evaluations), ``grad_norm``,
    ``lr`` and ``norm/<hook>``.

    Attributes:
        last_prompts, last_completions: the last step's rollouts (text), for a look.
    """

    last_prompts: tuple[str, ...] = ()
    last_completions: tuple[str, ...] = ()

    @property
    def rewards(self) -> Float[Tensor, " steps"]:
        """Mean reward per step."""
        return self.metrics["reward"]

    def plot(self, metrics: Sequence[str] | None = None):
        """Plotly figure: reward, KL, entropy, held-out loss and vector norms per step."""
        if metrics is None:
            wanted = ["reward", "kl", "entropy", "heldout_loss", "tokens_per_s"]
            metrics = [k for k in wanted if k in self.metrics]
            metrics += [k for k in self.metrics if k.startswith("norm/")]
        return super().plot(metrics)


def rl(
    steered: SteeredTransformer,
    prompts: Sequence[str] | str | Int[Tensor, "n_prompts pos"],
    reward: Callable[..., Any],
    config: RLConfig | None = None,
) -> RLResult:
    """Train the steering vectors of ``steered`` by online reinforcement learning on ``reward``.

    Only the vectors learn (AdamW; the model is frozen). Each of ``config.steps`` steps samples
    ``group_size`` completions for ``prompts_per_step`` prompts (a seeded permutation of
    ``prompts``, cycled), scores them, turns the rewards into advantages with the estimator
    registered as ``config.algorithm`` (:mod:`steer_lens.train.rl.advantages`) and updates the
    vectors with the clipped policy-gradient loss (:mod:`steer_lens.train.rl.loss`). Progress bar,
    JSONL log, checkpoints, resume and the NaN guard come from
    :func:`~steer_lens.train.loop.run_loop`; the same seed gives the same run on the CPU. This is
    the recipe of "Small Vectors, Big Effects" (Sinii et al. 2025).

    Args:
        steered: a :class:`~steer_lens.SteeredTransformer` (any vector kind, e.g. gated or low rank).
        prompts: prompt texts (or token ids ``[n_prompts, pos]`` for models without a tokenizer:
            the reward then sees token ids as space-separated text).
        reward: ``f(prompts, completions) -> Float[Tensor, "batch"]`` (see
            :mod:`steer_lens.train.rewards`), on decoded text without EOS.
        config: :class:`~steer_lens.train.rl.RLConfig` (default ``RLConfig()``).

    Returns:
        An :class:`RLResult` (per-step reward, KL, entropy, held-out loss, tokens/s, vector norms;
        ``.plot()``). The vectors keep their trained values; ``steered.training_config`` records
        the run.

    Raises:
        EmptyInputError: no prompts.
        ConfigError: a bad config or prompt.
        SequenceTooLongError: a prompt plus ``max_new_tokens`` longer than ``n_ctx``.
        RewardError: the reward raised or returned a wrong shape / NaN (names the completion).
        TrainingDivergedError: non-finite loss or gradient (vectors restored to the last good state).
    """
    config = config or RLConfig()
    distributed.init_distributed()  # torchrun without init_process_group: join the group (no-op otherwise)
    distributed.require_shardable(config.prompts_per_step, "prompts_per_step")
    if distributed.is_distributed() and config.ppo_epochs > 1:
        raise ConfigError(
            f"ppo_epochs: expected 1 under torch.distributed ({distributed.world_size()} processes), got "
            f"{config.ppo_epochs}: a checkpoint holds rank 0's shard of the rollouts in flight only. "
            "Fix: ppo_epochs=1, or train on one process."
        )
    if not callable(reward):
        raise ConfigError(
            f"reward: expected a callable f(prompts, completions), got {type(reward).__name__}."
        )
    if config.sampler == "hf":
        HFSampler(steered)  # refusals (kind, positions, weights) before any step; loads the HF model once
    items, texts = prompt_items(prompts)
    resid_rms: dict[str, float] = {}
    if config.lr_units == "relative":
        # relative learning rates: residual scale from one unsteered rollout of (some of) the prompts
        # (absolute learning rates, as the papers' recipes use, need no probe)
        with steered.disabled():
            probe = sample(steered, items[: min(len(items), config.prompts_per_step)], config, seed=config.seed)
        resid_rms = typical_resid_rms(steered, probe.tokens, probe.attention_mask)
    state = RLState(
        steered=steered, items=items, texts=texts, order=prompt_order(len(items), config), reward=reward,
        estimator=get_advantage(config.algorithm).make(config), config=config,
    )
    result = run_loop(
        steered, state.step, config, resid_rms=resid_rms, objective="rl",
        extra_config={"rl": {"reward": reward_name(reward), "n_prompts": len(items)}}, state=state, sharded=True,
    )
    last = state.rollout
    return RLResult(
        metrics=result.metrics, config=result.config, resid_rms=result.resid_rms, seconds=result.seconds,
        objective="rl", last_prompts=last.prompts if last else (), last_completions=last.completions if last else (),
    )
