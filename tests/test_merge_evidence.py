"""demo/merge/evidence.py's data: every task yields the splits asked for, disjoint, with answers its
own metric accepts; a template space too small for the splits is an error, not an endless loop
(the first real run hung in make_data: "sentiment" had 96 distinct prompts for 356 items)."""

import pytest

from demo.merge import evidence as E


@pytest.mark.parametrize("task", E.TASKS)
def test_default_splits_are_disjoint_and_self_consistent(task):
    data = E.make_data([task], n_train=300, n_val=16, n_test=40)[task]
    assert [len(data[s]) for s in ("train", "val", "test")] == [300, 16, 40]
    prompts = [p for s in ("train", "val", "test") for p, _ in data[s]]
    assert len(set(prompts)) == len(prompts)  # held-out items never appear in training
    for p, a in data["test"]:
        assert E.correct(task, a, a), (task, p, a)
        assert not E.correct(task, "I cannot answer that.", a)


def test_too_small_template_space_is_named():
    with pytest.raises(ValueError, match=r"task 'sentiment' has only ~\d+ distinct items; asked for 100000"):
        E.make_data(["sentiment"], n_train=100000 - 56, n_val=16, n_test=40)
