"""`rlmt-jax train [CONFIG] [key=value ...]`: run a recipe (no CONFIG: the tiny CPU default)."""

from __future__ import annotations

import errno
import logging
import os
import shlex
import sys

EXIT_INTERRUPTED = 130  # Ctrl-C before a command could stop in order (128 + SIGINT, as shells report it)
# A full, read-only or forbidden disk is the user's to fix: one line naming the file, not a traceback.
DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="train with GRPO / PPO / DPO / SFT from a YAML recipe",
        description="Train from a YAML recipe (a path, or the name of a shipped one such as "
                    "grpo_llama31_8b_instruct). With no recipe, runs the tiny CPU default (configs/tiny.yaml). "
                    "A run dir that has checkpoints resumes from the newest one.",
    )
    parser.add_argument("config", nargs="?", default=None, help="YAML file or shipped config name")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. rollout.temperature=0.8")
    add_import_option(parser)
    parser.add_argument("--allow-config-change", action="store_true",
                        help="resume a run dir although the config differs from the one it was started with")
    parser.set_defaults(func=run)


def add_import_option(parser) -> None:
    parser.add_argument(
        "--import", dest="imports", action="append", default=[], metavar="MODULE",
        help="a module (importable name or .py file) that registers research variants with "
             "rlmt_jax.algorithms.register_policy_loss / register_advantage / register_kl_estimator before the "
             "config is read; repeatable. Modules of the `rlmt_jax.variants` entry point group load by themselves",
    )


def _split(config: str | None, overrides: list[str]) -> tuple[str | None, list[str]]:
    """`rlmt-jax train key=value` (no file) puts the first override where the config would be."""
    if config is not None and "=" in config:
        return None, [config, *overrides]
    return config, overrides


def run(args) -> int:
    from rlmt_jax.algorithms import import_variants
    from rlmt_jax.core.errors import UserError
    from rlmt_jax.scale.compile_cache import enable_compilation_cache
    from rlmt_jax.settings.config import resolve
    from rlmt_jax.run.stop_signals import EXIT_STOPPED
    from rlmt_jax.trainer.loop import TrainingError, train

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import_variants(args.imports)
    config, overrides = _split(args.config, args.overrides)
    cfg = resolve(config, overrides)
    enable_compilation_cache()
    try:
        summary = train(cfg, allow_config_change=args.allow_config_change)
    except TrainingError as err:
        print(f"rlmt-jax train: stopped: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        if err.errno not in DISK_ERRORS or err.filename:
            raise  # with its file named, the command line says it in one line
        # a write in the run dir that names no file (config.yaml, the metrics on a full disk)
        raise UserError(f"cannot write in the run dir {cfg.run.output_dir} ({err.strerror})") from None
    except KeyboardInterrupt:  # before the loop's own handler (from the first step on: a checkpoint, exit 3)
        print(f"rlmt-jax train: interrupted (Ctrl-C) before the run could stop in order; start it again with the "
              f"same command: rlmt-jax train {resume_command(args)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    history = summary["history"]
    if history:
        print(summarize(history))
    if summary.get("stopped"):
        print(f"rlmt-jax train: stopped by {summary['stopped']} after step {summary['steps']} with checkpoint step "
              f"{summary['checkpoint']} in {cfg.checkpoint_dir}; resume with the same command: "
              f"rlmt-jax train {resume_command(args)}", file=sys.stderr)
        return EXIT_STOPPED
    print(where_the_run_is(cfg, summary["export"]))
    return 0


def where_the_run_is(cfg, export: str | None) -> str:
    """The final lines: where the metrics, TensorBoard events, checkpoints and export are, and how to look."""
    from rlmt_jax.run.metrics import METRICS_FILE, SAMPLES_FILE, TENSORBOARD_DIR

    run_dir = cfg.run.output_dir
    lines = [f"run dir {run_dir}:",
             f"  metrics      {os.path.join(run_dir, METRICS_FILE)}  (plot: rlmt-jax plot {run_dir})",
             f"  samples      {os.path.join(run_dir, SAMPLES_FILE)}"]
    if cfg.logging.tensorboard:
        lines.append(f"  TensorBoard  tensorboard --logdir {os.path.join(run_dir, TENSORBOARD_DIR)}")
    if cfg.logging.wandb_project:
        lines.append(f"  W&B          project {cfg.logging.wandb_project}")
    lines.append(f"  checkpoints  {cfg.checkpoint_dir}  (the same command again resumes from the newest)")
    if export:
        lines.append(f"exported the policy to {export} (a Hugging Face directory)")
    return "\n".join(lines)


def resume_command(args) -> str:
    """The arguments that resume this run: the same recipe and overrides."""
    words = [w for module in args.imports for w in ("--import", module)]
    words += [w for w in (args.config, *args.overrides) if w is not None]
    if args.allow_config_change:
        words.append("--allow-config-change")
    return " ".join(shlex.quote(w) for w in words)


def summarize(history: list[dict], window: int = 10) -> str:
    """Means of the run's key metrics over its first and last steps: `window` steps each, fewer in a run shorter
    than two windows, so that the two never share a step (a 3-step run: step 1 vs step 3)."""
    keys = [k for k in ("reward_mean", "format_valid_rate", "kl", "entropy", "response_tokens_mean", "loss")
            if any(k in h for h in history)]

    def mean(rows, key):
        values = [r[key] for r in rows if r.get(key) is not None]
        return sum(values) / len(values) if values else float("nan")

    n = min(window, len(history) // 2)
    if n == 0:  # one step: nothing to compare it with
        return "\n".join([f"step {history[0]['step']}:", *(f"  {k:22s} {mean(history, k):10.4f}" for k in keys)])
    first, last = history[:n], history[-n:]
    steps = "step" if n == 1 else f"{n} steps"
    lines = [f"steps {history[0]['step']}-{history[-1]['step']}: first {steps} vs last {steps}"]
    lines += [f"  {k:22s} {mean(first, k):10.4f} -> {mean(last, k):10.4f}" for k in keys]
    return "\n".join(lines)
