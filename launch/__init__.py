"""Turn an intent (debug, cpu N, gpus N, zero1/2/3, zero3-offload, multi-node, SLURM) into the right
`python` / `torchrun` / `accelerate launch` command and run it. No training logic lives here.

    python -m launch cpu 2 -- --config configs/quickstart.yaml
    python -m launch zero2 8 --dry-run -- --config configs/imdb_bert_base.yaml
"""

from launch.commands import INTENTS, Command, Host, Request, build_command
from launch.slurm import LaunchError, expand_hostlist

__all__ = ["INTENTS", "Command", "Host", "LaunchError", "Request", "build_command", "expand_hostlist"]
