"""Upload a model folder (a run's `best/` or `final/`) to the Hugging Face Hub, with its model card.

    python -m harness.push runs/imdb/best --repo-id user/imdb-minilm [--private] [--revision main]

The repository is created if it does not exist (private with --private), then the folder is uploaded in one
commit; its README.md is the model card made from the run's files (harness/card.py), its usage snippets naming the
repository. The token comes from the usual places (`hf auth login`, HF_TOKEN). Offline (HF_HUB_OFFLINE), without a
token or without a reachable Hub: exit 2 with a message saying which, and nothing in the folder changes. A run
with `hub.push_to: user/name` pushes its best model the same way when it completes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from harness.cli import EXIT_BAD_INPUT


class PushError(RuntimeError):
    """The folder cannot be pushed; the message says why and what to do."""


def hub_ready() -> None:
    """PushError unless a push could be tried: the Hub not switched off here, and a token at hand."""
    from huggingface_hub import constants, get_token

    if constants.HF_HUB_OFFLINE:
        raise PushError("the Hub is switched off here (HF_HUB_OFFLINE=1); unset it, on a machine that reaches "
                        f"{constants.ENDPOINT}, to push")  # fmt: skip
    if get_token() is None:
        raise PushError("no Hugging Face token: run `hf auth login`, or set HF_TOKEN to a token with write access")


def push(folder: str | Path, repo_id: str, private: bool = False, revision: str | None = None) -> str:
    """Create `repo_id` if needed and upload `folder` to it in one commit; returns the commit's URL."""
    from huggingface_hub import CommitOperationAdd, HfApi, constants

    from harness.card import CARD_FILE, model_card

    path = Path(folder)
    if not (path / "config.json").is_file():
        raise PushError(f"{path}: not a model folder (no config.json); push a run's best/ or final/")
    hub_ready()
    run = path.parent
    card = None
    if (run / "config.yaml").is_file() and (run / "results.json").is_file():  # a run's export: its card, for the repo
        card = model_card(run, path.name, model_ref=repo_id).encode()
    operations = [CommitOperationAdd(path_in_repo=str(file.relative_to(path)), path_or_fileobj=str(file))
                  for file in sorted(path.rglob("*")) if file.is_file() and (card is None or file.name != CARD_FILE)]  # fmt: skip
    if card is not None:
        operations.append(CommitOperationAdd(path_in_repo=CARD_FILE, path_or_fileobj=card))
    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.create_commit(repo_id, operations=operations, revision=revision,
                                   commit_message=f"Upload {path.name} (harness)")  # fmt: skip
    except Exception as exc:  # connection, authentication, permission: huggingface_hub and requests raise many kinds
        raise PushError(f"pushing {path} to {repo_id} at {constants.ENDPOINT} failed: {exc}") from exc
    return commit.commit_url


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m harness.push", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="a run's best/ or final/, or any model folder")
    parser.add_argument("--repo-id", required=True, help="the Hub repository, user/name or org/name")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument("--revision", help="a branch to push to (created if missing; default: main)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        url = push(args.folder, args.repo_id, args.private, args.revision)
    except PushError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    print(url, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
