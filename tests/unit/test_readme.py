"""The README documents what the code has."""

from harness.config import all_keys
from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()


def test_every_config_key_is_in_the_readme_reference():
    missing = [key for key in all_keys() if f"| `{key}` |" not in README]
    assert not missing, f"add to the README's config reference: {missing}"


def test_readme_commands_name_files_that_exist():
    for path in ("configs/quickstart.yaml", "configs/imdb_bert_base.yaml", "configs/imdb_minilm_cpu.yaml",
                 "slurm/train.sbatch", "slurm/sweep.sbatch", "benchmarks/vs_trainer.py", "configs/pretrain_imdb.yaml",
                 "slurm/pretrain.sbatch", "configs/text_tabular.yaml", "harness/pretrain.py"):  # fmt: skip
        assert path in README and (ROOT / path).exists(), path
