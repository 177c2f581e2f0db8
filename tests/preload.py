"""Imported once by the test session's forkserver (tests/ranks.py), so that each run forked from it starts with
these already loaded. Nothing here may start threads or run torch operations: the forks must begin clean."""

import accelerate  # noqa: F401
import accelerate.utils.deepspeed  # noqa: F401
import datasets  # noqa: F401
import evaluate  # noqa: F401
import pandas  # noqa: F401
import pyarrow.parquet  # noqa: F401
import torch  # noqa: F401
import transformers  # noqa: F401
import transformers.models.bert.modeling_bert  # noqa: F401

import harness.cli  # noqa: F401
import harness.loop  # noqa: F401
import harness.multimodal  # noqa: F401
import harness.predict  # noqa: F401
import harness.pretrain  # noqa: F401
import harness.tasks.masked_lm  # noqa: F401
import harness.train  # noqa: F401

try:
    import deepspeed  # noqa: F401
    import deepspeed.runtime.engine  # noqa: F401
except ImportError:  # the deepspeed extra is optional
    pass
