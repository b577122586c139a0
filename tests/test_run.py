"""RunOptions (src/flashzo/run.py): a run's options checked once, and the configs they make."""

import pytest

from flashzo.run import RunOptions


def test_configs_follow_the_options():
    o = RunOptions(steps=40, lr=1e-3, eps=1e-2, lora_r=4, target_modules="v_proj, q_proj", lora_layers="3,1",
                   seed=7, lr_schedule="linear")
    lc, mc = o.lora_config(), o.mezo_config(parallel="batch")
    assert lc.r == 4 and lc.alpha == 8.0 and lc.target_modules == ("q_proj", "v_proj") and lc.layers == (1, 3)
    assert lc.seed == 7 and mc.seed == 7 and mc.total_steps == 40 and mc.lr_schedule == "linear"
    assert mc.parallel == "batch" and mc.eps == 1e-2
    assert RunOptions.from_dict(o.to_dict()) == o


@pytest.mark.parametrize("kwargs,match", [
    (dict(eval_every=-1), "eval_every must be >= 0"), (dict(save_every=-1), "save_every"),
    (dict(batch_size=0), "batch_size"), (dict(steps=-5), "steps"), (dict(lr=float("nan")), "lr"),
    (dict(eps=0.0), "eps"), (dict(lora_r=True), "lora_r must be an integer"), (dict(lr_schedule="step"), "lr_sched"),
    (dict(template="mnli"), "template"), (dict(lora_layers="a,b"), "lora_layers"), (dict(target_modules=""), "empty"),
    (dict(eps=1e-320), "eps must be >= 1.175e-38"), (dict(eps=1e-39), "eps must be >="),
])
def test_out_of_range_options_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RunOptions(**kwargs)


def test_the_least_eps_is_float32s_smallest_normal():
    assert RunOptions(eps=2.0**-126).eps == 2.0**-126


def test_unknown_option_names_are_refused():
    with pytest.raises(ValueError, match="unknown option learning_rate"):
        RunOptions.from_dict({"learning_rate": 1e-3})


def test_differences_compare_meanings():
    a = RunOptions(lora_r=4, target_modules="q_proj,v_proj", lora_layers="1,3")
    assert a.differences(RunOptions(lora_r=4, lora_alpha=8, target_modules="v_proj,q_proj", lora_layers="3,1")) == []
    assert a.differences(a.replace(lr=1.0, steps=5, lora_alpha=3.0)) == ["steps", "lr", "lora_alpha"]
    assert a.differences(a.replace(lr=1.0, steps=5), names=("steps",)) == ["steps"]


@pytest.mark.parametrize("kwargs,match", [(dict(eval_batch_size=0), "eval_batch_size must be >= 1"),
                                          (dict(keep_best="f1"), "keep_best must be None or one of")])
def test_new_options_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RunOptions(**kwargs)


def test_from_args_names_the_flag():
    import argparse

    with pytest.raises(ValueError, match="^--eval-every must be >= 0, got -1$"):
        RunOptions.from_args(argparse.Namespace(eval_every=-1, lora_r=2))
