"""The LR schedule, AdamW's parameter groups, gradient accumulation and the train config's checks."""

import math

import pytest
import torch

from growfam.errors import ConfigError
from growfam.model import Llama
from growfam.train import TrainConfig, forward_backward, lr_at, lr_bounds, param_groups

from train.support import TINY, config


# ---- schedule and optimizer --------------------------------------------------------------------


def test_lr_schedule_warmup_peak_cosine_floor():
    total, peak, floor, warm = 110, 1e-3, 1e-4, 10
    assert lr_at(0, total, peak, floor, warm) == pytest.approx(peak / 10)
    assert lr_at(4, total, peak, floor, warm) == pytest.approx(peak / 2)
    assert lr_at(9, total, peak, floor, warm) == pytest.approx(peak)
    assert lr_at(10, total, peak, floor, warm) == pytest.approx(peak)  # the cosine starts at the peak
    middle = 10 + (total - 1 - 10) / 2
    assert lr_at(int(middle), total, peak, floor, warm) == pytest.approx((peak + floor) / 2, rel=0.02)
    assert lr_at(total - 1, total, peak, floor, warm) == pytest.approx(floor)  # the last step at the floor
    assert lr_at(total + 5, total, peak, floor, warm) == pytest.approx(floor)
    lrs = [lr_at(s, total, peak, floor, warm) for s in range(total)]
    assert all(a >= b for a, b in zip(lrs[warm:], lrs[warm + 1:]))  # monotone decay


@pytest.mark.parametrize("shape, quarter", [("linear", 0.75), ("cosine", 0.5 * (1 + math.cos(math.pi / 4))),
                                            ("sqrt", 0.5)])
def test_wsd_warms_up_holds_the_peak_then_decays_to_the_floor_at_the_last_step(shape, quarter):
    total, peak, floor, warm, decay = 100, 1e-3, 1e-4, 10, 20
    at = [lr_at(s, total, peak, floor, warm, "wsd", decay, shape) for s in range(total + 3)]
    assert at[0] == pytest.approx(peak / 10) and at[9] == peak  # the end of the warm-up
    assert all(lr == peak for lr in at[10:80])  # the stable part, exactly the peak
    # the decay: its k-th step at progress k / 20, the floor exactly at the last step
    assert at[80] == pytest.approx(floor + (peak - floor) * {"linear": 0.95, "cosine": 0.5 * (1 + math.cos(math.pi / 20)),
                                                             "sqrt": 1 - math.sqrt(0.05)}[shape], rel=1e-12)
    assert at[84] == pytest.approx(floor + (peak - floor) * quarter, rel=1e-12)
    assert at[99] == floor and at[102] == floor
    assert all(a > b for a, b in zip(at[79:100], at[80:100]))  # strictly down through the decay
    assert [lr_at(s, total, peak, floor, warm, "constant") for s in (9, 10, 99, 150)] == [peak] * 4
    # a decay longer than what follows the warm-up starts where the warm-up ends
    assert lr_at(10, 20, peak, floor, 10, "wsd", 15) < peak and lr_at(19, 20, peak, floor, 10, "wsd", 15) == floor


def test_schedule_steps_and_bad_schedule_keys(tmp_path):
    from growfam.train import Schedule

    sched = Schedule.of(config(tmp_path, max_steps=30, lr_schedule="wsd", decay_frac=0.25, warmup_frac=0.1), 1)
    assert (sched.warmup_steps, sched.decay_steps, sched.stable_end) == (3, 8, 22)
    assert Schedule.of(config(tmp_path, max_steps=30), 1).stable_end == 30
    for bad, message in ((dict(lr_schedule="step"), "lr_schedule must be cosine or wsd or constant"),
                         (dict(decay_shape="exp"), "decay_shape must be linear or cosine or sqrt"),
                         (dict(decay_frac=0), "decay_frac"), (dict(decay_frac=1.5), "decay_frac")):
        with pytest.raises(ConfigError, match=message):
            config(tmp_path, **bad)


def test_lr_floor_ratio_or_absolute(tmp_path):
    assert lr_bounds(config(tmp_path, max_lr=1e-3)) == pytest.approx((1e-3, 1e-4))  # default ratio 0.1
    assert lr_bounds(config(tmp_path, max_lr=1e-3, min_lr_ratio=0.0)) == (1e-3, 0.0)
    assert lr_bounds(config(tmp_path, max_lr=1e-3, min_lr=3e-5), scale=0.5) == (5e-4, 3e-5)
    assert lr_bounds(config(tmp_path, max_lr=1e-3, min_lr=8e-4), scale=0.5) == (5e-4, 5e-4)
    with pytest.raises(ConfigError, match="at most one"):
        config(tmp_path, min_lr=1e-5, min_lr_ratio=0.1)


@pytest.mark.parametrize("tied", [False, True])
def test_param_groups_decay_matrices_only(tied):
    model = Llama(TINY.replace(tie_embeddings=tied))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in no_decay["params"]} == {n for n, p in model.named_parameters() if p.ndim == 1}
    assert all(p.ndim == 2 for p in decay["params"])
    assert "embed_tokens.weight" in {names[id(p)] for p in decay["params"]}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_gradient_accumulation_matches_one_batch():
    torch.manual_seed(0)
    x = torch.randint(0, TINY.vocab_size, (4, 16))
    y = torch.randint(0, TINY.vocab_size, (4, 16))
    one, two = Llama(TINY), Llama(TINY)
    two.load_state_dict(one.state_dict())
    loss_one = forward_backward(one.loss, [(x, y)], torch.device("cpu"))
    loss_two = forward_backward(two.loss, [(x[:2], y[:2]), (x[2:], y[2:])], torch.device("cpu"))
    assert loss_two.item() == pytest.approx(loss_one.item(), abs=1e-6)
    for (name, a), b in zip(one.named_parameters(), two.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_config_rejects_unknown_keys_and_reads_yaml_numbers(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'max_lrr' in the train config.*did you mean 'max_lr'"):
        TrainConfig.from_dict({"model": "tiny-1", "max_steps": 10, "max_lrr": 1e-3})
    path = tmp_path / "train.yaml"
    path.write_text("model: tiny-1\nmax_tokens: 2e6\nmax_lr: 6e-4\nbetas: [0.9, 0.99]\n")
    cfg = TrainConfig.load(path)
    assert cfg.max_tokens == 2_000_000 and cfg.max_lr == 6e-4 and cfg.betas == (0.9, 0.99)
    assert cfg.model.name == "tiny-1"
    with pytest.raises(ConfigError, match="exactly one of max_steps and max_tokens"):
        TrainConfig(model=TINY)


@pytest.mark.parametrize("changes, message", [
    ({"betas": [1.0, 0.95]}, r"betas must each be in \[0, 1\), got 1.0"),
    ({"betas": [0.9, -0.1]}, r"betas must each be in \[0, 1\)"),
    ({"device": "banana"}, "device must be auto, cpu, cuda, cuda:N or mps, got 'banana'"),
    ({"device": "cuda"}, "device 'cuda': CUDA is not available"),
    ({"device": 3}, "device must be"),
    ({"max_rollbacks": -1}, "max_rollbacks must be an integer >= 0"),
])
def test_config_refuses_bad_betas_devices(tmp_path, monkeypatch, changes, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=message):
        config(tmp_path, **changes)
