import os

import pytest
import torch

from toco.config import load_config
from toco.models import build_model

TINY = ["model.backbone_kwargs={patch_size: 8, img_size: 32, embed_dim: 32, depth: 4, num_heads: 2}",
        "model.decoder_channels=16", "model.proj_hidden=32", "model.proj_bottleneck=16", "model.proj_out=24",
        "model.pooling=gmp", "model.conv_stem=[]", "model.pretrained=false", "model.attention_window=0",
        "pseudo.cam_scales=[1.0, 0.5, 1.5]"]  # the paper's network and CAM scales, from random weights


# the synthetic experiment shrunk to seconds: 32-px images, 16 training and 4 val images, 4 iterations with every
# loss from iteration 2; the one tiny run every test trains (add overrides after it)
TINY_RUN = TINY + ["data.synth_size=32", "data.crop_size=32", "data.val_size=32", "data.local_crop_size=16",
                   "data.synth_train=16", "data.synth_val=4", "data.num_workers=0", "pseudo.par_dilations=[1, 2]",
                   "pseudo.par_iters=2", "loss.seg_start=2", "loss.reg_sigma_xy=8.0", "train.max_iters=4",
                   "train.eval_every=4", "train.log_every=2", "train.ckpt_every=2", "optim.warmup_iters=2"]


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):  # one torch thread per test process: the workers share the cores
        torch.set_num_threads(1)


@pytest.fixture
def tiny_cfg():
    """The synthetic experiment shrunk to seconds (TINY_RUN): a 4-block ViT of width 32 on 32-px images."""
    return load_config("experiments/synthetic.yaml", TINY_RUN)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for every Ray test of a test process (they share an xdist group: one process)."""
    ray = pytest.importorskip("ray")
    from toco.distributed.cluster import init_ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a throwaway local cluster
    init_ray(num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture
def tiny_model(tiny_cfg):
    torch.manual_seed(0)
    return build_model(tiny_cfg.model, tiny_cfg.data.num_classes)


def cli_user_error(argv, capsys) -> str:
    """Run the CLI expecting a user error: exit status 2, one line on stderr, no traceback; returns that line."""
    from toco.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err, err
    message = err.strip().splitlines()[-1]  # after any progress bar
    assert message.startswith(f"toco {argv[0]}"), err  # "toco data synth: error: ..." from argparse
    return message
