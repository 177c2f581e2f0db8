import evaluate
import pytest

from harness.objectives import METRIC_MODULES, is_improvement


@pytest.fixture(scope="module")
def metric():
    return evaluate.load(str(METRIC_MODULES["single_label"]), keep_in_memory=True)


def test_binary_metrics_against_hand_counts(metric):
    # tp=3 (label 1 right), fp=1, fn=2, tn=4
    refs = [1, 1, 1, 1, 1, 0, 0, 0, 0, 0]
    preds = [1, 1, 1, 0, 0, 1, 0, 0, 0, 0]
    m = metric.compute(predictions=preds, references=refs, num_labels=2)
    assert m["accuracy"] == pytest.approx(0.7)
    assert m["precision"] == pytest.approx(3 / 4)
    assert m["recall"] == pytest.approx(3 / 5)
    f1_pos, f1_neg = 2 * 3 / (2 * 3 + 1 + 2), 2 * 4 / (2 * 4 + 2 + 1)
    assert m["f1_macro"] == pytest.approx((f1_pos + f1_neg) / 2)
    assert m["f1_micro"] == pytest.approx(0.7)
    assert m["confusion_matrix"] == [[4, 1], [2, 3]]


def test_multiclass_macro_and_micro(metric):
    refs = [0, 1, 2, 2]
    preds = [0, 2, 2, 1]
    m = metric.compute(predictions=preds, references=refs, num_labels=3)
    # per class precision: 1, 0, 1/2; recall: 1, 0, 1/2; f1: 1, 0, 1/2
    assert m["precision"] == pytest.approx(0.5) and m["recall"] == pytest.approx(0.5)
    assert m["f1_macro"] == pytest.approx(0.5) and m["f1_micro"] == pytest.approx(0.5)


def test_selection_direction():
    assert is_improvement(0.3, 0.4, "loss") and not is_improvement(0.5, 0.4, "loss")
    assert is_improvement(0.9, 0.8, "accuracy") and is_improvement(0.1, None, "f1_macro")
