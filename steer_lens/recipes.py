"""Paper recipes: each paper's method with every setting as its public code has it.

steer_lens's own defaults are chosen to serve users (relative learning rates, zero initialisation,
...); a recipe is how a user gets a *paper's* method instead. Each recipe returns a :class:`Recipe`:
the hooks to steer, the training config with the paper's values, where each value comes from, and
what differs from the paper on purpose or by necessity.

* :func:`dunefsky2025` - "One-shot Optimized Steering Vectors Mediate Safety-relevant Behaviors in
  LLMs" (Dunefsky & Cohan 2025), repository jacobdunefsky/one-shot-steering-repro.
* :func:`sinii2025` - "Small Vectors, Big Effects" / "Steering LLM Reasoning Through Bias-Only
  Adaptation" (Sinii et al. 2025), repository corl-team/steering-reasoning: RL of one vector per
  layer with RLOO and a verifiable math reward.
* :func:`wang2025` - "Simple Mechanistic Explanations for Out-Of-Context Reasoning" (Wang, Engels &
  Clive-Griffin 2025), repository JoshEngels/OOCR-Interp: a vector trained from scratch at one layer's
  MLP output with cross-entropy on the answer token (the LoRA's own natural vector is
  :func:`steer_lens.lora.natural_vector`).

* :func:`ward2025` - "Rank-1 LoRAs Encode Interpretable Reasoning Signals" (Ward, Riechers & Shai
  2025), repositories jnward/reasoning-lora-interp and its training submodule jnward/s1_peft: a rank-1
  LoRA on all 7 projections of every layer, then a BatchTopK SAE on its concatenated activation state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from steer_lens.errors import ConfigError
from steer_lens.hook_sites import HookSite
from steer_lens.train.one_shot import OneShotConfig
from steer_lens.train.rl import RLConfig
from steer_lens.train.supervised import SFTConfig

__all__ = ["Recipe", "dunefsky2025", "sinii2025", "wang2025", "ward2025"]


@dataclass(frozen=True)
class Recipe:
    """A paper's method, ready to run.

    Attributes:
        paper: the paper's title and authors.
        hooks: the hook points the paper steers, for this model.
        config: the training config with the paper's values.
        sources: setting -> the file (and cell / function) of the paper's code it comes from.
        differs: what this recipe does differently from the paper, and why.
        steering: the paper's ``SteeredTransformer`` settings (initialisation, positions), used by
            :meth:`steered` unless overridden there.
        extra: further configs of the paper's pipeline, e.g. ``{"sae": LoraStateSAEConfig(...)}`` for
            :func:`ward2025`.
    """

    paper: str
    hooks: tuple[str, ...]
    config: Any
    sources: dict[str, str] = field(default_factory=dict)
    differs: tuple[str, ...] = ()
    steering: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def steered(self, model, **kwargs: Any):
        """A :class:`~steer_lens.SteeredTransformer` on ``model`` at the recipe's hooks.

        ``steering`` gives the defaults (e.g. the paper's initialisation); ``kwargs`` override them and
        are passed on to ``SteeredTransformer``.
        """
        from steer_lens.steering import SteeredTransformer

        return SteeredTransformer(model, list(self.hooks), **{**self.steering, **kwargs})

    def _repr_html_(self) -> str:
        rows = "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in self.sources.items())
        diffs = "".join(f"<li>{d}</li>" for d in self.differs)
        return (f"<b>{self.paper}</b><br>hooks: {list(self.hooks)}<br><table><tr><th>setting</th>"
                f"<th>source</th></tr>{rows}</table>differs:<ul>{diffs}</ul>")


def dunefsky2025(model, *, layer: int | None = None) -> Recipe:
    """One-shot optimised steering vectors (Dunefsky & Cohan 2025), as in ``refusal.ipynb``.

    The paper's refusal experiments on Gemma-2-2B-it (26 layers) steer the input of layer 12 (a
    forward pre-hook on ``model.model.layers[12]``, i.e. ``blocks.12.hook_resid_pre``) and call
    ``optimize_completion(..., lr=0.5, max_iters=30, max_norm=30, target_loss=0.01,
    target_loss_target_iters=1)`` with the function's other defaults (temperature 0.7, ε = 1e-6,
    random initial vector of norm 1, Adam). For another model the default layer is the same relative
    depth, ``round(12 / 26 · n_layers)``.

    Args:
        model: the model to steer (its ``cfg.n_layers`` sets the default layer).
        layer: the block whose ``hook_resid_pre`` carries the vector.

    Returns:
        A :class:`Recipe` whose ``config`` is a :class:`~steer_lens.train.one_shot.OneShotConfig`;
        train with ``steer_lens.train.one_shot.one_shot(recipe.steered(model), examples, recipe.config)``.

    Raises:
        ConfigError: ``layer`` outside ``[0, n_layers)``.
    """
    n_layers = int(model.cfg.n_layers)
    if layer is None:
        layer = round(12 / 26 * n_layers)
    if not 0 <= int(layer) < n_layers:
        raise ConfigError(f"layer: expected 0 <= layer < n_layers={n_layers}, got {layer!r}.")
    nb = "refusal.ipynb, cell 31 (optimize_completion call)"
    fn = "steering_opt.py, optimize_completion signature"
    return Recipe(
        paper="Dunefsky & Cohan 2025, One-shot Optimized Steering Vectors Mediate Safety-relevant Behaviors in LLMs",
        hooks=(HookSite.name_of("resid_pre", int(layer)),),
        config=OneShotConfig(lr=0.5, max_iters=30, max_norm=30.0, target_loss=0.01, target_loss_target_iters=1),
        sources={
            "layer 12 of 26 (resid_pre)": nb, "lr=0.5": nb, "max_iters=30": nb, "max_norm=30": nb,
            "target_loss=0.01, target_loss_target_iters=1": nb, "temperature=0.7 (logits * T)": fn,
            "eps=1e-6": fn, "starting_norm=1 (random direction)": fn, "Adam": fn,
            "summed token losses (normalize_token_length=False)": fn,
        },
        differs=(
            "the target-loss test uses the summed loss over completions (the notebook's "
            "do_target_loss_avg=False checks each completion; identical with one completion per example)",
            "max_norm=30 is in Gemma-2-2B's residual units; other models have other residual norms",
            "the random initial vector is seeded (OneShotConfig.seed) where the paper's is not",
            "prompts may be conversations rendered with the model's own chat template; the paper writes "
            "Gemma's template by hand",
        ),
    )


def sinii2025(model, *, steps: int = 100, layers: list[int] | None = None) -> Recipe:
    """RL-trained steering vectors at every layer (Sinii et al. 2025), with the paper's RL settings.

    One zero-initialised vector per layer on the MLP output (the paper trains a bias on each layer's
    ``mlp.down_proj``, which is TransformerLens's ``blocks.L.hook_mlp_out`` at every position); RLOO
    advantages ``A = r − mean(others)``; the loss ``−Σ A Σ_t log π / N`` over the batch's generated
    tokens, one on-policy update per batch, with log-probabilities at the sampling temperature; AdamW
    at an *absolute* learning rate of 1e-3 with a 3% linear warm-up then constant; gradient-norm
    clipping at 2; no KL term; 16 prompts × 16 samples per step at temperature 1. Reward: pass
    :func:`steer_lens.train.rewards.math_answer` (``math-verify`` on the last ``\\boxed{}``, ±1).

    Args:
        model: the model (its ``cfg.n_layers`` gives the hooks).
        steps: optimisation steps (the warm-up is 3% of them, at least 1).
        layers: the layers to steer (default: all, as the paper).

    Returns:
        A :class:`Recipe` whose ``config`` is an :class:`~steer_lens.train.rl.RLConfig`; train with
        ``steer_lens.train.rl(recipe.steered(model), prompts, math_answer(answers), recipe.config)``.

    Raises:
        ConfigError: a layer outside ``[0, n_layers)``, or ``steps < 1``.
    """
    n_layers = int(model.cfg.n_layers)
    layers = list(range(n_layers)) if layers is None else [int(x) for x in layers]
    bad = [x for x in layers if not 0 <= x < n_layers]
    if bad or not layers:
        raise ConfigError(f"layers: expected layer indices in [0, {n_layers}), got {layers!r}.")
    if steps < 1:
        raise ConfigError(f"steps: expected >= 1, got {steps!r}.")
    src = "corl-team/steering-reasoning (as read for the papers issue; see docs/recipes.md)"
    return Recipe(
        paper="Sinii et al. 2025, Small Vectors, Big Effects / Steering LLM Reasoning Through Bias-Only Adaptation",
        hooks=tuple(HookSite.name_of("mlp_out", x) for x in layers),
        config=RLConfig(
            steps=steps, algorithm="rloo", lr=1e-3, lr_units="absolute", warmup_steps=max(1, round(0.03 * steps)),
            grad_clip=2.0, kl_coef=0.0, prompts_per_step=16, group_size=16, temperature=1.0,
            tempered_logprobs=True, ppo_epochs=1,
        ),
        sources={
            "vector per layer on mlp.down_proj bias (= hook_mlp_out), zero init": src,
            "RLOO, one on-policy update, loss / generated tokens in the batch": src,
            "log-probs of logits / sampling temperature": src,
            "AdamW lr 1e-3 absolute, 3% warm-up then constant": src,
            "grad-norm clip 2, KL 0": src,
            "16 prompts x 16 samples, temperature 1": src,
            "reward +1 / -1 by math_verify on the last boxed answer": src,
        },
        differs=(
            "rollouts are sampled by steer_lens's TransformerLens sampler, not vLLM (same distribution)",
            "the paper's models are 1.5B-14B (Qwen2.5, Llama-3.1-8B-chat at lr 8e-5); on a small CPU model "
            "the batch may have to shrink (prompts_per_step, group_size) to fit time and memory",
            "AdamW weight decay is left at 0 (the paper's value was not confirmed in this session)",
        ),
    )


def wang2025(model, *, n_train: int, layer: int | None = None) -> Recipe:
    """A steering vector trained from scratch on an OOCR task (Wang, Engels & Clive-Griffin 2025).

    As the risky/safe training script of JoshEngels/OOCR-Interp run with ``--train_steering_vector``:
    one vector at a layer's MLP output (a forward hook on ``language_model.model.layers[L].mlp``, which
    is TransformerLens's ``blocks.L.hook_mlp_out`` for models without a post-MLP norm), initialised as a
    random unit vector (seed 42), trained with cross-entropy on the answer token only (the ``A``/``B``
    after the prompt), an absolute learning rate of 2e-3, no weight decay, no warm-up and no gradient
    clipping, 4 examples per optimiser step (batch 1 × 4 accumulation steps) for 3 epochs. Give the
    examples as ``(prompt, answer)`` pairs (the prompt rendered with the chat template up to the
    assistant's turn, the answer its one token): the SFT promotion loss on the completion is then the
    paper's loss. For another model the default layer is the same relative depth as the script's
    default, ``round(25 / 48 · n_layers)``.

    Sources (JoshEngels/OOCR-Interp; "train" is the script above, its path not recorded by the code
    index used; ``utils.py`` is the module it imports ``add_steering_vector`` from):

    * train l.58: ``target_layer = 25`` (its notebook default; Gemma-3-12B-it has 48 layers, l.155);
    * train l.81: ``learning_rate = 2e-3`` for a steering vector; l.84 ``weight_decay = 0.0``;
    * train l.22-23: ``batch_size = 1``, ``gradient_accumulation_steps = 4``; l.333 one step per 4;
    * train l.31: ``num_epochs`` 3; l.34 ``val_split`` 0.2 (``n_train`` is after that split, l.224);
    * train l.40 / l.180: ``init_seed`` 42, seeded before the vector is drawn;
    * train l.74, l.182, l.315-321: the vector at ``token_position = IMPORTANT_TOKEN_POSITION - 1``
      (-4, the position that predicts the answer at -3), cross-entropy of the answer token only;
    * train l.240: bitsandbytes ``Adam8bit`` (betas 0.9, 0.999), no scheduler, no clipping;
    * utils.py l.36-37: ``torch.randn(d_model)`` divided by its norm (random unit vector);
    * utils.py l.66-67: the hook on the layer's ``mlp`` module output (``use_mlp=True``).

    Args:
        model: the model (its ``cfg.n_layers`` sets the default layer).
        n_train: training examples (after any held-out split); ``steps = 3 · (n_train // 4)``, at least 1.
        layer: the block whose ``hook_mlp_out`` carries the vector.

    Returns:
        A :class:`Recipe` whose ``config`` is an :class:`~steer_lens.train.SFTConfig` and whose
        ``steering`` holds the random unit initialisation; train with
        ``steer_lens.train.sft(recipe.steered(model), pairs, recipe.config)``.

    Raises:
        ConfigError: ``layer`` outside ``[0, n_layers)`` or ``n_train < 1``.
    """
    n_layers = int(model.cfg.n_layers)
    if layer is None:
        layer = round(25 / 48 * n_layers)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n_layers:
        raise ConfigError(f"layer: expected an int with 0 <= layer < n_layers={n_layers}, got {layer!r}.")
    if isinstance(n_train, bool) or not isinstance(n_train, int) or n_train < 1:
        raise ConfigError(f"n_train: expected the number of training examples (an int >= 1), got {n_train!r}.")
    tr = "OOCR-Interp risky/safe training script (--train_steering_vector)"
    ut = "OOCR-Interp utils.py, add_steering_vector"
    return Recipe(
        paper="Wang, Engels & Clive-Griffin 2025, Simple Mechanistic Explanations for Out-Of-Context Reasoning",
        hooks=(HookSite.name_of("mlp_out", layer),),
        config=SFTConfig(
            steps=max(1, 3 * (n_train // 4)), lr=2e-3, lr_units="absolute", weight_decay=0.0, betas=(0.9, 0.999),
            grad_clip=None, warmup_steps=0, batch_size=4, objective="promotion", seed=42,
        ),
        steering={"init": "random", "init_norm": 1.0, "seed": 42, "positions": "prompt"},
        sources={
            "layer 25 of 48 (relative depth)": f"{tr}, l.58 (and l.155: gemma-3-12b-it)",
            "mlp output (hook_mlp_out)": f"{ut}, l.66-67",
            "random unit init, seed 42": f"{ut}, l.36-37; {tr}, l.40 and l.180",
            "lr=2e-3 absolute, weight_decay=0": f"{tr}, l.81 and l.84",
            "4 examples per step (1 x 4 accumulation)": f"{tr}, l.22-23 and l.333",
            "3 epochs: steps = 3 * (n_train // 4)": f"{tr}, l.31",
            "cross-entropy on the answer token only": f"{tr}, l.74 and l.315-321",
            "Adam (8-bit), betas (0.9, 0.999), no clipping, no warm-up": f"{tr}, l.240",
        },
        differs=(
            "the vector is added at every prompt position (positions='prompt'); the paper adds it only at "
            "the position that predicts the answer (token_position -4). Only that position's logits are in "
            "the loss either way, but earlier prompt positions reach it through attention",
            "AdamW with weight decay 0 (= Adam) in 32-bit, not bitsandbytes' Adam8bit",
            "data order: steer_lens's seeded permutations, not datasets' shuffle(seed=42) then shuffle(seed=epoch)",
            "the paper's model is Gemma-3-12B-it, whose MLP output is before its post-MLP norm; TransformerLens's "
            "hook_mlp_out on Gemma is after ln2_post, so on Gemma models this hook is not the paper's site",
            "the paper also reports the LoRA's natural vector (steer_lens.lora.natural_vector), not trained here",
        ),
    )


_WARD_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def ward2025(model, *, n_train: int, layers: list[int] | None = None) -> Recipe:
    """A rank-1 LoRA on every projection, then a BatchTopK SAE on its activation state (Ward et al. 2025).

    As ``0_train_lora.sh`` of jnward/reasoning-lora-interp (at 9b103c4), which runs ``train/sft_lora.sh``
    and ``train/sft_lora.py`` of its submodule jnward/s1_peft (at 925f7c2): peft LoRA of rank 1 with
    ``lora_alpha=16`` and rsLoRA scaling (``alpha / sqrt(r)`` = 16) on ``q/k/v/o_proj`` and
    ``gate/up/down_proj`` of every layer, no dropout, no bias; AdamW at lr 1e-3 (betas 0.9, 0.95, weight
    decay 1e-4), 16 sequences per optimiser step (1 per device × gradient accumulation), 5 epochs, a 5%
    linear warm-up then cosine decay to 0, the loss on the assistant's response only (trl's
    ``DataCollatorForCompletionOnlyLM``), on s1K-1.1 (1000 DeepSeek-R1 reasoning traces, ``block_size``
    20000). transformers' default gradient clipping (``max_grad_norm=1``) applies: the script does not
    set it. The SAE on the ``n_layers × 7`` per-token scalars has the settings of
    ``3_lora_sae/3.0_train_sae.py`` (:class:`~steer_lens.lora.LoraStateSAEConfig`'s defaults, in
    ``extra["sae"]``).

    Sources (``sh`` = s1_peft ``train/sft_lora.sh``, ``py`` = s1_peft ``train/sft_lora.py``):

    * sh l.19-20: ``rank=1``, ``alpha=16`` (l.36: alpha stays 16 for any rank); py l.133 ``use_rslora=True``;
    * py l.62: the 7 target modules; l.65-124: every layer unless a layer range is given;
    * py l.130, l.132: ``lora_dropout=0.0``, ``bias="none"``;
    * sh l.7-8: lr 1e-3, ``min_lr=0``; l.113 cosine schedule; l.106 ``warmup_ratio=0.05``;
    * sh l.10: weight decay 1e-4; l.116-117: Adam betas 0.9, 0.95;
    * sh l.9: 5 epochs; l.11-15: batch 16 = micro-batch 1 × accumulation; l.104 s1K-1.1; l.6 block 20000;
    * py l.184-198: loss on tokens after ``<|im_start|>assistant\\n`` only;
    * sh l.109: bf16; l.140 gradient checkpointing (memory only).

    Args:
        model: the TransformerLens model (its ``cfg.n_layers`` gives the layers; it must have a gated MLP,
            i.e. ``gate_proj``, and separate q/k/v projections, as Llama/Qwen/SmolLM2).
        n_train: training sequences; ``steps = 5 · max(1, n_train // 16)`` (transformers' steps per epoch
            with 16 sequences per step), warm-up ``ceil(0.05 · steps)``.
        layers: layers to adapt (default: all, as the paper).

    Returns:
        A :class:`Recipe` whose ``config`` is a :class:`~steer_lens.lora.LoraTrainConfig` (train with
        ``sl.lora.train_adapter(model, examples, recipe.config)``) and whose ``extra["sae"]`` is the
        :class:`~steer_lens.lora.LoraStateSAEConfig` for :func:`~steer_lens.lora.train_lora_state_sae`.
        ``hooks`` is empty: nothing is steered.

    Raises:
        ConfigError: ``n_train < 1``; a layer outside ``[0, n_layers)``; a model without a gated MLP.
    """
    from steer_lens.lora.state_sae import LoraStateSAEConfig
    from steer_lens.lora.train import LoraTrainConfig

    n_layers = int(model.cfg.n_layers)
    if isinstance(n_train, bool) or not isinstance(n_train, int) or n_train < 1:
        raise ConfigError(f"n_train: expected the number of training sequences (an int >= 1), got {n_train!r}.")
    if layers is not None:
        layers = [int(x) for x in layers]
        if not layers or any(not 0 <= x < n_layers for x in layers):
            raise ConfigError(f"layers: expected layer indices in [0, {n_layers}), got {layers!r}.")
    if not getattr(model.cfg, "gated_mlp", False):
        raise ConfigError("model: the paper adapts gate_proj/up_proj/down_proj, but this model has no gated MLP. "
                          "Fix: use a Llama-style model (Qwen2.5, Llama, SmolLM2) or set target_modules yourself.")
    steps = 5 * max(1, n_train // 16)
    sh, py = "s1_peft train/sft_lora.sh", "s1_peft train/sft_lora.py"
    sae = "reasoning-lora-interp 3_lora_sae/3.0_train_sae.py"
    return Recipe(
        paper="Ward, Riechers & Shai 2025, Rank-1 LoRAs Encode Interpretable Reasoning Signals",
        hooks=(),
        config=LoraTrainConfig(
            rank=1, alpha=16.0, use_rslora=True, target_modules=_WARD_MODULES,
            layers=None if layers is None else tuple(layers), lr=1e-3, weight_decay=1e-4, betas=(0.9, 0.95),
            grad_clip=1.0, steps=steps, warmup_steps=math.ceil(0.05 * steps), batch_size=16,
        ),
        extra={"sae": LoraStateSAEConfig()},
        sources={
            "rank 1, lora_alpha 16": f"{sh}, l.19-20 and l.36", "rsLoRA scaling alpha/sqrt(r)": f"{py}, l.133",
            "q/k/v/o/gate/up/down_proj of every layer": f"{py}, l.62 and l.65-124",
            "lora_dropout 0, bias none": f"{py}, l.130 and l.132",
            "AdamW lr 1e-3, betas (0.9, 0.95), weight decay 1e-4": f"{sh}, l.7, l.10, l.116-117",
            "16 sequences per step, 5 epochs": f"{sh}, l.9, l.11-15",
            "warm-up 5% of steps": f"{sh}, l.106", "grad-norm clip 1 (transformers default)": f"{sh}, l.97-120",
            "loss on the assistant response only": f"{py}, l.184-198",
            "data: simplescaling/s1K-1.1_tokenized, block 20000": f"{sh}, l.104 and l.6",
            "SAE: k 16, lr 5e-4, batch 512, 8x, AuxK 1/32, seed 42": f"{sae}, l.239-244",
            "SAE: 100 warm-up steps, dead after 1e6 tokens, one epoch": f"{sae}, l.269-271 and l.366",
        },
        differs=(
            "learning rate: linear warm-up then constant; the paper decays it by a cosine to 0 (sh l.8, l.113)",
            "fp32 on the CPU, not bf16 with FSDP on 8 GPUs; no gradient checkpointing",
            "the data are yours: the paper's s1K-1.1 traces are up to 20000 tokens, far beyond a CPU",
            "the paper's model is Qwen2.5-32B-Instruct (64 layers); on another model the state has n_layers x 7 "
            "columns and the SAE 8x as many latents",
            "steps count optimiser steps of batch_size sequences, drawn by steer_lens's seeded permutations",
        ),
    )
