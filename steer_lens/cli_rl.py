"""The ``steer-lens train rl`` command: train a steering vector by RL with a built-in or Python reward.

Example::

    steer-lens train rl --reward contains:dog --layer 1 --steps 100 --out runs/dog
    steer-lens train rl --reward my_rewards:likes_dogs --out runs/dog          # an importable module
    steer-lens train rl --reward path/to/rewards.py:likes_dogs --out runs/dog  # a Python file

writes ``runs/dog/vector/`` (load it with ``SteeredTransformer.load``) and ``runs/dog/metrics.jsonl``
(one line of metrics per step: reward, KL, entropy, tokens/s, held-out loss ...); the progress bar
shows four of them (:func:`steer_lens.train.loop.progress_fields`).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys
from pathlib import Path
from typing import Any

from steer_lens.errors import ConfigError

__all__ = ["BUILTIN_REWARDS", "add_rl_arguments", "load_reward", "run_rl_command"]

BUILTIN_REWARDS = ("contains", "regex", "boxed", "exact_answer", "math")
"""``--reward KIND:ARG`` kinds parsed by :func:`steer_lens.train.rewards.from_spec`; any other
``A:B`` is a Python reward ``module:function`` or ``path/to/file.py:function``."""

logger = logging.getLogger(__name__)


def add_rl_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``steer-lens train rl`` to ``parser``."""
    from steer_lens.train.rl import DEFAULT_RL_LR, advantage_names, get_advantage
    from steer_lens.train.rl.config import SAMPLERS

    p = parser
    p.add_argument("--model", default="raincandy-u/TinyStories-656K", help="Hugging Face model name")
    p.add_argument("--gguf-file", default=None,
                   help="GGUF file in that repository, for a GGUF model (e.g. SmolLM2-135M-Instruct.Q4_1.gguf)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--layer", type=int, nargs="+", default=[1], help="block index (or indices) of the hook")
    p.add_argument("--hook", default="resid_pre",
                   help="hook kind at that layer: resid_pre, resid_mid, resid_post, attn_out, mlp_out")
    p.add_argument("--vectors", choices=["plain", "gated", "lowrank"], default="plain",
                   help="parameterisation: one vector per hook, token-gated, or low rank shared across hooks")
    p.add_argument("--rank", type=int, default=1, help="rank of --vectors lowrank")
    p.add_argument("--reward", required=True,
                   help="contains:WORD, regex:PATTERN, boxed:ANSWER (the \\boxed{} answer), math:ANSWER, or a "
                   "Python reward: module:function or path/to/file.py:function, called as "
                   "fn(prompts, completions) -> one number per completion")
    p.add_argument("--prompt", action="append", default=None,
                   help="a prompt (repeat for several; default: 'Once upon a time')")
    p.add_argument("--prompts-file", default=None, help="text file with one prompt per line")
    names = advantage_names()
    p.add_argument("--algorithm", choices=names, default="rloo",
                   help="advantage estimator (registered in steer_lens.train.rl.advantages): "
                   + "; ".join(f"{n}: {get_advantage(n).description}" for n in names))
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=DEFAULT_RL_LR, help="learning rate (relative units by default)")
    p.add_argument("--lr-units", choices=["relative", "absolute"], default="relative")
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--prompts-per-step", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--chat", action="store_true",
                   help="send each prompt as one user turn through the tokenizer's chat template (chat models)")
    p.add_argument("--sampler", choices=list(SAMPLERS), default="transformer_lens",
                   help="who samples the rollouts: transformer_lens (any vector) or hf (transformers' generate "
                        "with the vectors as hooks: faster; constant vectors at every position)")
    p.add_argument("--micro-batch-size", type=int, default=None,
                   help="at most this many sequences per forward/backward of the update (default: all)")
    p.add_argument("--recompute", choices=["off", "full", "selective"], default="off",
                   help="activation recomputation over the blocks from the first vector (less memory)")
    p.add_argument("--kl-coef", type=float, default=0.0, help="weight of the k3 KL to the base model")
    p.add_argument("--entropy-coef", type=float, default=0.0)
    p.add_argument("--ppo-epochs", type=int, default=1)
    p.add_argument("--max-norm", type=float, default=None)
    p.add_argument("--heldout", default=None, help="text file whose loss is logged as heldout_loss")
    p.add_argument("--heldout-every", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-dir", default=None)
    p.add_argument("--checkpoint-every", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--out", required=True, help="folder for vector/ and metrics.jsonl")


def load_reward(spec: str) -> Any:
    """The reward of ``--reward SPEC``: a built-in ``KIND:ARG`` or a Python callable.

    ``KIND`` in :data:`BUILTIN_REWARDS` goes to :func:`steer_lens.train.rewards.from_spec`
    (``contains:dog``, ``regex:PATTERN``, ``boxed:42``, ``math:1/2``). Anything else is
    ``TARGET:NAME``, split at the last colon: ``TARGET`` ending in ``.py`` is a file, loaded as a module
    (as ``runpy`` would; its folder need not be importable); otherwise it is a dotted module name
    imported with the current directory on ``sys.path`` first (as ``uvicorn module:app`` does).
    ``NAME`` may be dotted (``rewards:Scorer.score``). The object must be callable as
    ``reward(prompts: list[str], completions: list[str]) -> [batch]`` numbers (the
    :class:`~steer_lens.train.rewards.Reward` protocol); what it returns is checked during training.

    Raises:
        ConfigError: no colon, a file that does not exist, a module that cannot be imported (the
            import error is named), a missing name, or an object that is not callable (or is a class).
    """
    from steer_lens.train.rewards import from_spec

    kind, sep, _ = spec.partition(":")
    if not sep or kind in BUILTIN_REWARDS:
        return from_spec(spec)
    target, _, name = spec.rpartition(":")
    if not target or not name:
        raise ConfigError(
            f"reward: expected module:function or path/to/file.py:function, got {spec!r}."
        )
    module = _reward_module(target, spec)
    obj: Any = module
    for part in name.split("."):
        if not hasattr(obj, part):
            raise ConfigError(
                f"reward: {target!r} has no attribute {name!r} (looked up for --reward {spec!r}). Fix: name a "
                f"function defined there, e.g. {target}:my_reward."
            )
        obj = getattr(obj, part)
    if not callable(obj) or isinstance(obj, type):
        what = "a class" if isinstance(obj, type) else f"a {type(obj).__name__}"
        raise ConfigError(
            f"reward: {target}:{name} is {what}, not a reward function. Fix: point --reward at a function (or an "
            "instance with __call__) taking (prompts: list[str], completions: list[str]) and returning one "
            "number per completion."
        )
    return obj


def _reward_module(target: str, spec: str) -> Any:
    """Import the module of a Python ``--reward`` (a ``.py`` file or a dotted module name)."""
    try:
        if target.endswith(".py"):
            path = Path(target).expanduser().resolve()
            if not path.is_file():
                raise ConfigError(f"reward: the file {target!r} of --reward {spec!r} does not exist.")
            mod_name = f"steer_lens_reward_{path.stem}"
            loader_spec = importlib.util.spec_from_file_location(mod_name, path)
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[mod_name] = module  # dataclasses and pickling look the module up by name
            try:
                loader_spec.loader.exec_module(module)
            except BaseException:
                sys.modules.pop(mod_name, None)
                raise
            return module
        cwd = str(Path.cwd())
        if cwd not in sys.path:
            sys.path.insert(0, cwd)
        return importlib.import_module(target)
    except ConfigError:
        raise
    except Exception as e:  # ImportError, SyntaxError, or whatever the module raised on import
        raise ConfigError(
            f"reward: could not import {target!r} for --reward {spec!r}: {type(e).__name__}: {e}. Fix: give an "
            "importable module (run from the folder that holds it, or set PYTHONPATH) or a path to a .py file."
        ) from e


def run_rl_command(args: argparse.Namespace) -> int:
    """Run ``steer-lens train rl`` with parsed ``args``; returns the exit code (0 on success).

    Raises:
        SteerLensError: any library error (the CLI prints it and exits with 2).
    """
    import steer_lens as sl
    from steer_lens.hook_sites import HookSite
    from steer_lens.train.rl import RLConfig, rl
    from steer_lens.vectors import GatedVectors, LowRankVectors

    reward = load_reward(args.reward)
    prompts = list(args.prompt or [])
    if args.prompts_file:
        prompts += [ln.strip() for ln in Path(args.prompts_file).read_text(encoding="utf-8").splitlines()
                    if ln.strip()]
    if not prompts:
        prompts = ["Once upon a time"]
    if args.chat:  # one user turn each, rendered with the chat template when the rollouts are tokenised
        prompts = [[{"role": "user", "content": p}] for p in prompts]
    heldout = None
    if args.heldout:
        from steer_lens.demo import load_texts

        heldout = load_texts([args.heldout])
    out = Path(args.out)
    cfg = RLConfig(
        algorithm=args.algorithm, steps=args.steps, lr=args.lr, lr_units=args.lr_units,
        group_size=args.group_size, prompts_per_step=args.prompts_per_step,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        sampler=args.sampler, micro_batch_size=args.micro_batch_size,
        recompute=False if args.recompute == "off" else args.recompute,
        kl_coef=args.kl_coef, entropy_coef=args.entropy_coef, ppo_epochs=args.ppo_epochs,
        max_norm=args.max_norm, heldout_texts=heldout, heldout_every=args.heldout_every, seed=args.seed,
        checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every, resume=args.resume,
        log_path=str(out / "metrics.jsonl"), progress=not args.no_progress,
    )
    model = sl.load_model(args.model, gguf_file=args.gguf_file, device=args.device)
    hooks = [HookSite.name_of(args.hook, layer) for layer in args.layer]
    d_model = int(model.cfg.d_model)
    vectors = None
    if args.vectors == "gated":
        vectors = GatedVectors(hooks, d_model)
    elif args.vectors == "lowrank":
        vectors = LowRankVectors(hooks, d_model, rank=args.rank, seed=args.seed)
    steered = sl.SteeredTransformer(model, hooks, vectors=vectors)
    result = rl(steered, prompts, reward, cfg)
    steered.save(out / "vector")
    r = result.metrics["reward"]
    k = max(1, min(10, r.shape[0] // 5))
    print(f"trained {result.steps} steps in {result.seconds:.0f} s; mean reward first {k} steps "
          f"{float(r[:k].mean()):.3f} -> last {k} steps {float(r[-k:].mean()):.3f}; "
          f"vector saved to {out / 'vector'}, metrics to {out / 'metrics.jsonl'}")
    return 0
