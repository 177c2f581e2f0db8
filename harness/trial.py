"""A run as one trial of an Optuna search (`python -m launch search`): each validation is reported to the study,
whose pruner may stop the run there.

The search passes the trial in the environment (HARNESS_OPTUNA_TRIAL = "<journal file>::<study>::<trial
number>"), never in the config: the same config runs alone as it does in a search. The study lives in Optuna's
journal file, which processes on many nodes share through the file system. Rank 0 reports and asks the pruner;
every rank follows its answer. A resumed trial reports its steps again: Optuna keeps the first value of a step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

TRIAL_ENV = "HARNESS_OPTUNA_TRIAL"


class Pruned(Exception):
    """The search's pruner stopped this trial at a validation; its files stay as they are."""


@dataclass
class SearchTrial:
    journal: str
    study: str
    number: int

    @classmethod
    def from_env(cls) -> SearchTrial | None:
        spec = os.environ.get(TRIAL_ENV)
        if not spec:
            return None
        journal, study, number = spec.rsplit("::", 2)
        return cls(journal, study, int(number))

    def should_stop(self, value: float, step: int) -> bool:
        """Report this validation's value (at this optimizer step); whether the pruner stops the trial here."""
        import math

        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(self.journal))
        # A pruner is not stored with a study: the search keeps its settings in the study's user attributes.
        study_id = storage.get_study_id_from_name(self.study)
        settings = storage.get_study_user_attrs(study_id).get("pruner", {})
        study = optuna.load_study(study_name=self.study, storage=storage, pruner=make_pruner(settings))
        trial = optuna.trial.Trial(study, storage.get_trial_id_from_study_id_trial_number(study_id, self.number))
        if math.isfinite(value):  # a NaN validation is no evidence either way
            trial.report(value, step)
        return trial.should_prune()


def make_pruner(settings: dict):
    """The search file's pruner: median (stop a trial worse than the median of completed trials at the same
    step, once `startup_trials` have completed), successive_halving, or none."""
    import optuna

    name = settings.get("name", "median")
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=settings.get("startup_trials", 2), n_warmup_steps=0,
                                           n_min_trials=1)  # fmt: skip
    if name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1)
    return optuna.pruners.NopPruner()
