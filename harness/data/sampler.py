"""Length-bucketed, distributed-aware batching.

Training is planned in *global optimizer steps*, independent of how a step is split across processes and
accumulation slots: each epoch shuffles the examples (seed, epoch), sorts them by length within windows of
`window_steps` steps, cuts the windows into steps of `examples_per_step` examples and shuffles the step order.
Each step is then cut into world_size x grad_accum micro-batches of neighbouring lengths; micro-batch
`slot * world_size + rank` goes to that rank at that accumulation slot. So:

* every rank gets a disjoint shard, and together the ranks cover every example of a step once;
* micro-batches that run at the same time on different ranks have similar lengths (little padding, no rank
  waits long for another);
* world 2 x accum 1 and world 1 x accum 2 see the same examples in every step, so with a loss normalised by
  the step's example count they make the same update.

The last, smaller step of an epoch is split as evenly as possible (micro-batch sizes differ by at most one);
if it holds fewer examples than there are micro-batches, those few examples wait for the next epoch.

With a token budget (`max_tokens`, train.max_tokens_per_batch) the number of examples adapts to their length
instead: walking a window longest first, each step takes as many examples as keep every micro-batch within
the budget (micro-batch examples x its longest example <= max_tokens), so memory stays flat while short texts
get large batches. Steps then differ in size; the loss stays exact because it is normalised by each step's
example count. Examples left over at the end of a window (fewer than the micro-batches) join the next window.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MicroBatch = list[int]
Step = list[MicroBatch]  # world_size * grad_accum micro-batches, in slot-major order


@dataclass(frozen=True)
class StepLayout:
    """How one optimizer step is split: examples per micro-batch, processes and accumulation slots."""

    batch_size: int
    world_size: int
    grad_accum: int
    max_tokens: int = 0
    """Token budget per micro-batch (padded tokens); 0: batch_size examples per micro-batch."""

    @property
    def micro_batches(self) -> int:
        return self.world_size * self.grad_accum

    @property
    def examples_per_step(self) -> int:
        return self.batch_size * self.micro_batches


def _split_evenly(indices: np.ndarray, parts: int) -> list[MicroBatch]:
    """`parts` consecutive slices whose sizes differ by at most one (larger ones first)."""
    base, extra = divmod(len(indices), parts)
    out, start = [], 0
    for p in range(parts):
        size = base + (1 if p < extra else 0)
        out.append(indices[start : start + size].tolist())
        start += size
    return out


def plan_epoch(lengths: np.ndarray, layout: StepLayout, seed: int, epoch: int, window_steps: int) -> list[Step]:
    """All global steps of one epoch, deterministic in (seed, epoch)."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    if layout.max_tokens:
        steps = _token_budget_steps(order, lengths, layout, window_steps)
        return [steps[i] for i in rng.permutation(len(steps))]
    per_step = layout.examples_per_step
    tail = len(order) % per_step
    if 0 < tail < layout.micro_batches:  # too few to give every micro-batch an example
        order = order[: len(order) - tail]
    window = per_step * window_steps
    steps: list[Step] = []
    for start in range(0, len(order), window):
        chunk = order[start : start + window]
        # Longest first within the window; the stable sort keeps ties in shuffled order.
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        for s in range(0, len(chunk), per_step):
            steps.append(_split_evenly(chunk[s : s + per_step], layout.micro_batches))
    return [steps[i] for i in rng.permutation(len(steps))]


def _token_budget_steps(order: np.ndarray, lengths: np.ndarray, layout: StepLayout, window_steps: int) -> list[Step]:
    """Steps whose micro-batches each hold at most `layout.max_tokens` padded tokens (see the module doc)."""
    parts = layout.micro_batches
    window = layout.examples_per_step * window_steps
    steps: list[Step] = []
    carry = order[:0]
    for start in range(0, len(order), window):
        chunk = np.concatenate([carry, order[start : start + window]])
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]  # longest first; ties keep shuffled order
        i = 0
        while len(chunk) - i >= parts:
            per_micro_batch = max(1, layout.max_tokens // max(1, int(lengths[chunk[i]])))
            take = min(per_micro_batch * parts, len(chunk) - i)
            steps.append(_split_evenly(chunk[i : i + take], parts))
            i += take
        carry = chunk[i:]
    return steps


def steps_per_epoch(num_examples: int, layout: StepLayout) -> int:
    """Steps of a fixed-batch-size epoch (with a token budget the count depends on the lengths: plan it)."""
    assert not layout.max_tokens, "a token-budget epoch's step count comes from its plan"
    full, tail = divmod(num_examples, layout.examples_per_step)
    return full + (1 if tail >= layout.micro_batches else 0)


def rank_micro_batches(step: Step, layout: StepLayout, rank: int) -> list[MicroBatch]:
    """The micro-batches one rank runs in a step, in accumulation order."""
    return [step[slot * layout.world_size + rank] for slot in range(layout.grad_accum)]


def step_example_count(step: Step) -> int:
    return sum(len(mb) for mb in step)


@dataclass
class EvalPlan:
    """One rank's evaluation batches; `is_padding[i]` marks a repeated batch whose outputs are discarded."""

    batches: list[MicroBatch]
    is_padding: list[bool]


def plan_eval(lengths: np.ndarray, batch_size: int, world_size: int, rank: int) -> EvalPlan:
    """Length-sorted batches dealt round-robin to ranks, independent of the world size.

    Each example sits in the same batch (same neighbours, same padded shape) whatever the world size, so
    gathered predictions equal those of a single process. Every rank runs the same number of forward passes
    (sharded models such as ZeRO-3 need that); a rank short of batches repeats one as padding.
    """
    order = np.argsort(-lengths, kind="stable")
    all_batches = [order[s : s + batch_size].tolist() for s in range(0, len(order), batch_size)]
    mine = all_batches[rank::world_size]
    rounds = -(-len(all_batches) // world_size)
    padding = [False] * len(mine)
    while len(mine) < rounds:
        mine.append(all_batches[-1])
        padding.append(True)
    return EvalPlan(mine, padding)


@dataclass(frozen=True)
class EpochPlanner:
    """A run's epochs as plans of global steps: `plan_epoch` over the training lengths with the run's seed and
    bucketing window; after a change of layout mid-epoch, a plan over the examples not yet consumed."""

    lengths: np.ndarray
    layout: StepLayout
    seed: int
    window_steps: int

    def plan(self, epoch: int, exclude: list[int] | None = None) -> list[Step]:
        if not exclude:
            return plan_epoch(self.lengths, self.layout, self.seed, epoch, self.window_steps)
        remaining = np.setdiff1d(np.arange(len(self.lengths)), np.asarray(exclude))
        plan = plan_epoch(self.lengths[remaining], self.layout, self.seed, epoch, self.window_steps)
        return [[remaining[mb].tolist() for mb in step] for step in plan]

    def with_layout(self, layout: StepLayout) -> EpochPlanner:
        return EpochPlanner(self.lengths, layout, self.seed, self.window_steps)

    def steps_left(self, epoch: int, position: int, exclude: list[int] | None, epochs: int) -> int:
        """Steps from `position` of `epoch` to the end of the last epoch (planned: with a token budget the epochs'
        sizes differ); 0 once `epoch` is past the last (a checkpoint of the last step)."""
        if epoch >= epochs:
            return 0
        left = len(self.plan(epoch, exclude)) - position
        return left + sum(len(self.plan(later)) for later in range(epoch + 1, epochs))
