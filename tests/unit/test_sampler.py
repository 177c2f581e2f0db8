import numpy as np
import pytest

from harness.data.sampler import (
    StepLayout,
    plan_epoch,
    plan_eval,
    rank_micro_batches,
    step_example_count,
    steps_per_epoch,
)

rng = np.random.default_rng(0)
LENGTHS = rng.integers(10, 500, size=203)


@pytest.mark.parametrize("world,accum,batch", [(1, 1, 8), (2, 1, 8), (2, 2, 4), (3, 2, 5), (4, 1, 16)])
def test_ranks_get_disjoint_complete_shards(world, accum, batch):
    layout = StepLayout(batch, world, accum)
    plan = plan_epoch(LENGTHS, layout, seed=1, epoch=0, window_steps=4)
    assert len(plan) == steps_per_epoch(len(LENGTHS), layout)
    per_rank = [[i for step in plan for mb in rank_micro_batches(step, layout, r) for i in mb] for r in range(world)]
    everything = [i for shard in per_rank for i in shard]
    assert len(everything) == len(set(everything)), "an example was given to two ranks (or twice)"
    dropped = len(LENGTHS) - len(everything)
    # Only a tail too small to give every micro-batch one example waits for the next epoch.
    assert dropped == (
        len(LENGTHS) % layout.examples_per_step if len(LENGTHS) % layout.examples_per_step < layout.micro_batches else 0
    )
    for step in plan:  # every rank runs the same number of non-empty micro-batches in every step
        assert len(step) == layout.micro_batches and all(len(mb) >= 1 for mb in step)
        sizes = [len(mb) for mb in step]
        assert max(sizes) - min(sizes) <= 1


def test_deterministic_and_reshuffled_per_epoch():
    layout = StepLayout(8, 2, 1)
    a = plan_epoch(LENGTHS, layout, seed=5, epoch=0, window_steps=4)
    assert a == plan_epoch(LENGTHS, layout, seed=5, epoch=0, window_steps=4)
    assert a != plan_epoch(LENGTHS, layout, seed=5, epoch=1, window_steps=4)
    assert a != plan_epoch(LENGTHS, layout, seed=6, epoch=0, window_steps=4)


def test_length_grouped_batches_pad_far_less_than_random():
    lengths = np.random.default_rng(1).integers(10, 500, size=2000)
    layout = StepLayout(16, 2, 1)
    plan = plan_epoch(lengths, layout, seed=0, epoch=0, window_steps=50)
    bucketed_padding = sum(len(mb) * lengths[mb].max() - lengths[mb].sum() for step in plan for mb in step)
    shuffled = np.random.default_rng(2).permutation(2000)
    random_padding = sum(
        16 * lengths[shuffled[i : i + 16]].max() - lengths[shuffled[i : i + 16]].sum() for i in range(0, 2000, 16)
    )
    assert bucketed_padding < 0.1 * random_padding
    # Micro-batches of one step (run at the same time on different ranks) have neighbouring lengths.
    for step in plan[:20]:
        assert abs(lengths[step[0]].max() - lengths[step[1]].max()) < 60


def test_step_content_independent_of_how_the_step_is_split():
    two_ranks = plan_epoch(LENGTHS, StepLayout(4, 2, 1), seed=3, epoch=0, window_steps=4)
    two_slots = plan_epoch(LENGTHS, StepLayout(4, 1, 2), seed=3, epoch=0, window_steps=4)
    assert two_ranks == two_slots
    assert [step_example_count(s) for s in two_ranks][-1] >= 2
    layout = StepLayout(4, 1, 2)
    assert rank_micro_batches(two_slots[0], layout, 0) == two_ranks[0]


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_eval_plan_covers_each_example_once_with_equal_batch_counts(world):
    plans = [plan_eval(LENGTHS, 16, world, r) for r in range(world)]
    assert len({len(p.batches) for p in plans}) == 1
    kept = [i for p in plans for b, pad in zip(p.batches, p.is_padding, strict=True) if not pad for i in b]
    assert sorted(kept) == list(range(len(LENGTHS)))
    single = plan_eval(LENGTHS, 16, 1, 0).batches
    assert sorted(
        map(tuple, (b for p in plans for b, pad in zip(p.batches, p.is_padding, strict=True) if not pad))
    ) == sorted(map(tuple, single)), (
        "an example's batch (its neighbours and padded shape) must not depend on the world size"
    )


@pytest.mark.parametrize("world,accum,budget", [(1, 1, 2000), (2, 1, 2000), (2, 2, 1500), (3, 1, 600)])
def test_token_budget_keeps_every_micro_batch_within_it_and_uses_every_example(world, accum, budget):
    layout = StepLayout(8, world, accum, max_tokens=budget)
    plan = plan_epoch(LENGTHS, layout, seed=1, epoch=0, window_steps=4)
    assert plan == plan_epoch(LENGTHS, layout, seed=1, epoch=0, window_steps=4)
    used = [i for step in plan for mb in step for i in mb]
    assert len(used) == len(set(used))
    assert len(LENGTHS) - len(used) < layout.micro_batches  # only a last remainder waits for the next epoch
    for step in plan:
        assert len(step) == layout.micro_batches and all(len(mb) >= 1 for mb in step)
        assert all(len(mb) * LENGTHS[mb].max() <= budget for mb in step)
    sizes = [step_example_count(step) for step in plan]
    assert max(sizes) > 2 * min(sizes), "short texts must get larger steps than long ones"
    # Budgets are filled: the average micro-batch holds more than half the budget in padded tokens.
    fill = [len(mb) * LENGTHS[mb].max() / budget for step in plan for mb in step]
    assert np.mean(fill) > 0.5


def test_token_budget_plan_is_independent_of_how_a_step_is_split():
    two_ranks = plan_epoch(LENGTHS, StepLayout(4, 2, 1, max_tokens=1200), seed=3, epoch=0, window_steps=4)
    two_slots = plan_epoch(LENGTHS, StepLayout(4, 1, 2, max_tokens=1200), seed=3, epoch=0, window_steps=4)
    assert two_ranks == two_slots
