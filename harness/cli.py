"""Command line shared by the entry points: `--config FILE [--print-config] [key=value ...]`.

Exit codes: 0 done; 2 bad input (config, data, model, resume), reported before any training work starts;
3 too many non-finite losses; 4 a checkpoint could not be written; 5 the run completed but pushing it to the
Hub (hub.push_to) failed; 6 another rank was lost (its process or node died, or it hung past
runtime.collective_timeout_s): the checkpoints written so far are intact, the same command resumes; 7 pruned by
the search it is a trial of (its files stay); 75 stopped by SIGTERM/SIGUSR1 after a checkpoint (requeue and run the same command to
resume).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from harness.config import ConfigError, ExperimentConfig, load_config
from harness.rundir import write_exit_status

EXIT_BAD_INPUT = 2
EXIT_NONFINITE = 3
EXIT_SAVE_FAILED = 4
EXIT_PUSH_FAILED = 5
EXIT_LOST_PEER = 6
EXIT_PRUNED = 7


def parse_args(argv: list[str] | None, prog: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    parser.add_argument("--config", required=True, help="experiment YAML file")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.lr=3e-5")
    return parser.parse_args(argv)


def main_entry(
    run: Callable[[ExperimentConfig], dict],
    argv: list[str] | None,
    prog: str,
    config_class: type[ExperimentConfig] = ExperimentConfig,
) -> int:
    args = parse_args(argv, prog)
    try:
        cfg = load_config(args.config, args.overrides, cls=config_class)
        if args.print_config:
            print(cfg.to_yaml(), end="")
            return 0
    except ConfigError as exc:  # nothing was written yet, not even the status
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    # Imported only now: a config error is reported in a fraction of a second, before torch loads.
    from harness.checkpoint import CheckpointSaveError
    from harness.data.sources import DataError
    from harness.distributed import EXIT_REQUEUE, Preempted, StoppedBeforeTraining, lost_a_peer
    from harness.loop import NonFiniteLoss
    from harness.model import ModelError
    from harness.push import PushError
    from harness.trial import Pruned

    try:
        run(cfg)
    except (ConfigError, DataError, ModelError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    except Preempted as exc:
        if isinstance(exc, StoppedBeforeTraining):
            print(f"{exc}", file=sys.stderr, flush=True)
        write_exit_status(cfg.output_dir, "preempted", EXIT_REQUEUE)
        return EXIT_REQUEUE
    except Pruned as exc:
        print(f"{exc}: stopped by the search's pruner; the run's files stay", file=sys.stderr, flush=True)
        write_exit_status(cfg.output_dir, "pruned", EXIT_PRUNED)
        return EXIT_PRUNED
    except NonFiniteLoss as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        write_exit_status(cfg.output_dir, "failed", EXIT_NONFINITE)
        return EXIT_NONFINITE
    except CheckpointSaveError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        write_exit_status(cfg.output_dir, "failed", EXIT_SAVE_FAILED)
        return EXIT_SAVE_FAILED
    except PushError as exc:  # the run itself completed: its results stay, the push can be redone by hand
        print(f"error: {exc}; the run completed: python -m harness.push <output_dir>/best --repo-id "
              f"{cfg.hub.push_to} retries the push", file=sys.stderr, flush=True)  # fmt: skip
        write_exit_status(cfg.output_dir, "completed", EXIT_PUSH_FAILED)
        return EXIT_PUSH_FAILED
    except Exception as exc:
        if not lost_a_peer(exc):
            raise
        # Said plainly instead of a traceback: what failed is another machine or process, not this one.
        print(f"error: lost contact with another rank ({str(exc).splitlines()[0][-300:]}): its process or node died, "
              "or it hung; the checkpoints written so far are intact and the same command resumes from the newest. "
              "(Under SLURM with --requeue, a job whose node failed is requeued by SLURM itself.)",
              file=sys.stderr, flush=True)  # fmt: skip
        write_exit_status(cfg.output_dir, "failed", EXIT_LOST_PEER)
        return EXIT_LOST_PEER
    write_exit_status(cfg.output_dir, "completed", 0)
    return 0
