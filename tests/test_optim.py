import math

import pytest
import torch

from toco.engine.optim import build_optimizer, poly_warmup_factor


@pytest.mark.parametrize("step, logged_lr", [(199, 7.960e-06), (1999, 5.457e-05), (19999, 8.077e-09)])
def test_lr_matches_the_published_voc_log(step, logged_lr):
    # the original's log prints the lr used for iterations 200, 2000 and 20000 (docs/method.md §4)
    lr = 6e-5 * poly_warmup_factor(step, 20000, 1500, 1e-6, 0.9)
    assert lr == pytest.approx(logged_lr, rel=1e-3)


def test_warmup_is_linear_from_ratio_and_poly_uses_absolute_step():
    f = lambda s: poly_warmup_factor(s, 20000, 1500, 1e-6, 0.9)  # noqa: E731
    assert f(0) == pytest.approx(1e-6)
    assert f(750) == pytest.approx(0.5 + 0.5e-6)
    assert f(1500) == pytest.approx((1 - 1500 / 20000) ** 0.9)  # the drop 1.0 -> 0.932
    assert f(1499) > 0.999 and f(1500) == pytest.approx(0.9322, abs=1e-4)
    assert f(20000) == 0.0


def test_param_groups_and_lrs(tiny_model):
    from toco.config import OptimConfig

    opt, sched = build_optimizer(tiny_model, OptimConfig(lr=1e-3, warmup_iters=0), max_iters=10)
    names = [g["name"] for g in opt.param_groups]
    assert names == ["encoder", "encoder_norm", "heads", "decoder"]
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3, 1e-3, 1e-2, 1e-2])
    assert all(g["weight_decay"] == 0.01 for g in opt.param_groups)
    for _ in range(5):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * (1 - 5 / 10) ** 0.9)
    assert not math.isnan(opt.param_groups[2]["lr"])
    grouped = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(grouped) == len(set(grouped))
    trainable = {id(p) for p in tiny_model.parameters() if p.requires_grad}
    assert set(grouped) == trainable
    assert not any(id(p) in trainable for p in tiny_model.proj_head_teacher.parameters())
    assert torch.is_tensor(tiny_model.encoder.pos_embed)


def test_the_decoder_ramps_up_from_the_start_of_its_loss(tiny_model):
    from toco.config import OptimConfig
    from toco.engine.optim import decoder_warmup_factor

    assert [decoder_warmup_factor(s, 10, 4) for s in (0, 9, 10, 11, 13, 14, 50)] == [0, 0, 0.25, 0.5, 1.0, 1.0, 1.0]
    assert decoder_warmup_factor(10, 10, 0) == 1.0  # no ramp: the paper
    opt, sched = build_optimizer(tiny_model, OptimConfig(lr=1e-3, warmup_iters=0, decoder_warmup_iters=4),
                                 max_iters=100, seg_start=10)
    for _ in range(11):  # optimizer steps 0..10: the decoder's first step is step 10, at a quarter of its lr
        opt.step()
        sched.step()
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    poly = (1 - 11 / 100) ** 0.9
    assert lrs["heads"] == pytest.approx(1e-2 * poly)
    assert lrs["decoder"] == pytest.approx(1e-2 * poly * 2 / 4)  # before step 11: the second of four
