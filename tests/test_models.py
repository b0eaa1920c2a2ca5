import pytest
import torch
import torch.nn.functional as F

from toco.models.heads import CTCHead


def test_shapes_at_any_input_size(tiny_model):
    out = tiny_model(torch.randn(2, 3, 32, 32))
    assert out.cls_logits.shape == (2, 4) and out.aux_cls_logits.shape == (2, 4)
    assert out.seg_logits.shape == (2, 5, 4, 4) and out.tokens.shape == (2, 32, 4, 4)
    cam, aux_cam = tiny_model.forward_cams(torch.randn(1, 3, 48, 16))  # position table interpolated
    assert cam.shape == aux_cam.shape == (1, 4, 6, 2)


def test_aux_tokens_come_from_block_minus_3_without_final_norm(tiny_model):
    x = torch.randn(1, 3, 32, 32)
    enc = tiny_model.encode(x)
    vit = tiny_model.encoder
    h = vit._pos_embed(vit.patch_embed(x))
    for blk in vit.blocks[: len(vit.blocks) - 2]:  # blocks 0..depth-3 inclusive = index -3
        h = blk(h)
    expected = h[:, 1:].transpose(1, 2).reshape(1, 32, 4, 4)
    torch.testing.assert_close(enc.aux_tokens, expected)
    for blk in vit.blocks[len(vit.blocks) - 2:]:
        h = blk(h)
    h = vit.norm(h)
    torch.testing.assert_close(enc.cls_token, h[:, 0])
    torch.testing.assert_close(enc.tokens, h[:, 1:].transpose(1, 2).reshape(1, 32, 4, 4))


def test_scores_are_gmp_then_classifier_and_cam_is_the_classifier_per_token(tiny_model):
    x = torch.randn(2, 3, 32, 32)
    enc = tiny_model.encode(x)
    out = tiny_model.heads(enc)
    weight = tiny_model.classifier.weight[:, :, 0, 0]  # (C-1, D)
    pooled = enc.tokens.amax(dim=(2, 3))  # (B, D)
    torch.testing.assert_close(out.cls_logits, pooled @ weight.t())
    cam, _ = tiny_model.forward_cams(x)
    torch.testing.assert_close(cam, torch.einsum("cd,bdhw->bchw", weight, enc.tokens))
    assert tiny_model.classifier.bias is None and tiny_model.aux_classifier.bias is None


def test_ctc_head_outputs_cosines_with_frozen_unit_norm():
    head = CTCHead(8, hidden=16, bottleneck=4, out_dim=6)
    y = head(torch.randn(5, 8))
    assert y.shape == (5, 6) and y.abs().max() <= 1 + 1e-6
    g = head.last_layer.parametrizations.weight.original0
    assert not g.requires_grad and torch.all(g == 1)
    w = head.last_layer.weight
    torch.testing.assert_close(w.norm(dim=1), torch.ones(6))


def test_teacher_is_an_ema_of_the_student_head_only(tiny_model):
    student = [p.detach().clone() for p in tiny_model.proj_head.parameters()]
    with torch.no_grad():
        for p in tiny_model.proj_head.parameters():
            p.add_(1.0)
    teacher_before = [p.detach().clone() for p in tiny_model.proj_head_teacher.parameters()]
    encoder_before = [p.detach().clone() for p in tiny_model.encoder.parameters()]
    tiny_model.update_teacher(0.9)
    for t0, s0, t in zip(teacher_before, student, tiny_model.proj_head_teacher.parameters()):
        torch.testing.assert_close(t, 0.9 * t0 + 0.1 * (s0 + 1.0))
    for e0, e in zip(encoder_before, tiny_model.encoder.parameters()):
        assert torch.equal(e0, e)
    assert all(not p.requires_grad for p in tiny_model.proj_head_teacher.parameters())


def test_missing_pretrained_file_is_a_clear_error(tiny_cfg):
    from toco.models import build_model

    tiny_cfg.model.pretrained = True
    tiny_cfg.model.pretrained_file = "/nonexistent/vit.pth"
    with pytest.raises(FileNotFoundError, match="model.pretrained_file.*/nonexistent/vit.pth"):
        build_model(tiny_cfg.model, 5)


def test_pretrained_weights_load_from_a_local_file(tiny_cfg, tiny_model, tmp_path):
    from toco.models import build_model

    path = tmp_path / "vit.pth"
    torch.save(tiny_model.encoder.state_dict(), path)
    tiny_cfg.model.pretrained, tiny_cfg.model.pretrained_file = True, str(path)
    loaded = build_model(tiny_cfg.model, 5)
    torch.testing.assert_close(loaded.encoder.blocks[0].attn.qkv.weight, tiny_model.encoder.blocks[0].attn.qkv.weight)
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(loaded.encode(x).tokens, tiny_model.encode(x).tokens)
    assert F.mse_loss(loaded.encode(x).tokens, tiny_model.encode(x).tokens) == 0


def test_ctc_forward_equals_the_originals_separate_passes(tiny_model):
    x, g2, crops = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32), torch.randn(16, 3, 16, 16)
    with torch.no_grad():  # a student that has moved away from its teacher
        for p in tiny_model.proj_head.mlp.parameters():
            p.add_(0.01)
    teacher_head = [p.clone() for p in tiny_model.proj_head_teacher.parameters()]
    out = tiny_model(x, g2, crops, ema_momentum=0.5)
    alone = tiny_model(x)
    torch.testing.assert_close(out.cls_logits, alone.cls_logits)
    torch.testing.assert_close(out.seg_logits, alone.seg_logits)
    globals_cls = torch.cat([tiny_model.encode(x).cls_token, tiny_model.encode(g2).cls_token])
    local_cls = tiny_model.encode(crops).cls_token
    torch.testing.assert_close(out.student, tiny_model.proj_head(torch.cat([globals_cls, local_cls])))
    torch.testing.assert_close(out.teacher, tiny_model.proj_head_teacher(globals_cls))
    assert out.student.shape == (20, 24) and out.teacher.shape == (4, 24)
    assert not out.teacher.requires_grad
    moved = [not torch.equal(a, b) for a, b in zip(teacher_head, tiny_model.proj_head_teacher.parameters())]
    assert any(moved)  # the EMA update ran once, before the teacher pass


def test_conv_stem_encoder_has_stride_8_and_any_input_size(tiny_cfg):
    from toco.models import build_model

    tiny_cfg.model.conv_stem = (16, 16, 32)
    tiny_cfg.model.backbone_kwargs = dict(img_size=32, embed_dim=32, depth=4, num_heads=2)
    model = build_model(tiny_cfg.model, 5)
    assert model.patch_size == 8
    assert model(torch.randn(2, 3, 32, 32)).tokens.shape == (2, 32, 4, 4)
    cam, _ = model.forward_cams(torch.randn(1, 3, 48, 16))
    assert cam.shape == (1, 4, 6, 2)
    stem_params = {id(p) for p in model.encoder.patch_embed.parameters()}
    assert stem_params <= {id(p) for g in model.param_groups() for p in g}  # the stem trains with the encoder


def test_gap_pooling_makes_the_score_the_mean_of_the_cam(tiny_cfg):
    from toco.models import build_model

    tiny_cfg.model.pooling = "gap"
    model = build_model(tiny_cfg.model, 5)
    x = torch.randn(2, 3, 32, 32)
    cam, aux_cam = model.forward_cams(x)
    out = model(x)
    torch.testing.assert_close(out.cls_logits, cam.mean(dim=(2, 3)))
    torch.testing.assert_close(out.aux_cls_logits, aux_cam.mean(dim=(2, 3)))
    tiny_cfg.model.pooling = "avg"
    with pytest.raises(ValueError, match="model.pooling"):
        build_model(tiny_cfg.model, 5)


def test_windowed_attention_keeps_patch_features_local(tiny_cfg):
    """With attention_window k, a change in one patch reaches only patches within depth * k tokens (aux block:
    (aux + 1) * k), while the class token still reads the whole image; window 0 is timm's global attention."""
    from toco.models import build_model

    tiny_cfg.model.backbone_kwargs = dict(tiny_cfg.model.backbone_kwargs, img_size=64, depth=3)
    tiny_cfg.model.attention_window = 1
    torch.manual_seed(0)
    model = build_model(tiny_cfg.model, 5).eval()
    x = torch.randn(1, 3, 64, 64)
    moved = x.clone()
    moved[..., :8, :8] += 3.0  # the top-left patch of the 8x8 grid
    with torch.no_grad():
        before, after = model.encode(x), model.encode(moved)
    reach = lambda a, b: (a != b).any(dim=1)[0]  # noqa: E731  (h, w) bool: which patches changed at all
    yy, xx = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    distance = torch.maximum(yy, xx)
    assert torch.equal(reach(before.tokens, after.tokens), distance <= 3)          # 3 blocks x window 1
    assert torch.equal(reach(before.aux_tokens, after.aux_tokens), distance <= 1)  # aux = block 0 of 3
    assert not torch.allclose(before.cls_token, after.cls_token)

    mask = model.attention_mask(8, 8, torch.device("cpu"))
    assert mask.shape == (65, 65) and mask[0].all() and not mask[1:, 0].any()
    neighbours = [int(((yy - i).abs().maximum((xx - j).abs()) <= 1).sum()) for i in range(8) for j in range(8)]
    assert mask[1:, 1:].sum(dim=1).tolist() == neighbours  # 4 in a corner, 6 on an edge, 9 inside

    model.attention_window = 0
    with torch.no_grad():
        torch.testing.assert_close(model.encode(x).cls_token, model.encoder.forward_features(x)[:, 0], rtol=0, atol=1e-5)
    tiny_cfg.model.attention_window = -1
    with pytest.raises(ValueError, match="model.attention_window"):
        build_model(tiny_cfg.model, 5)


def test_the_synthetic_default_starts_from_its_shipped_pretext_encoder():
    """experiments/synthetic.yaml names a weights file in the repository (`make pretext`) that fits its model."""
    from pathlib import Path

    from toco.config import load_config
    from toco.models import build_model

    cfg = load_config("experiments/synthetic.yaml")
    assert cfg.model.pretrained and Path(cfg.model.pretrained_file).is_file()
    own = build_model(cfg.model, cfg.data.num_classes).encoder.state_dict()
    shipped = torch.load(cfg.model.pretrained_file, weights_only=True)
    assert shipped.keys() == own.keys()
    for name, tensor in shipped.items():
        assert torch.equal(own[name], tensor), name
    pretext = load_config("experiments/pretext/synthetic.yaml").model  # the stage that made the file
    assert (pretext.backbone, pretext.backbone_kwargs, pretext.conv_stem, pretext.attention_window) == \
        (cfg.model.backbone, cfg.model.backbone_kwargs, cfg.model.conv_stem, cfg.model.attention_window)


def _vit_b_like(antialias: bool):
    """A ViT-B/16 geometry (224 px, 14 x 14 position table), narrow, with a random table and a zero patch embedding,
    so the encoder's input to its blocks is the prefix tokens + the position table it resampled."""
    from toco.models.toco_net import ToCoNet, create_encoder

    torch.manual_seed(0)
    encoder = create_encoder("vit_base_patch16_224", False, None, (), embed_dim=8, depth=2, num_heads=2)
    net = ToCoNet(encoder, 5, aux_layer=-2, decoder_channels=4, proj_hidden=4, proj_bottleneck=4, proj_out=4,
                  pos_embed_antialias=antialias)
    with torch.no_grad():
        encoder.pos_embed.normal_()
        encoder.cls_token.normal_()
        for p in encoder.patch_embed.parameters():
            p.zero_()
    return net


def _table_seen_by_the_blocks(net, size: int) -> torch.Tensor:
    seen = []
    hook = net.encoder.norm_pre.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    net.encode(torch.randn(1, 3, size, size))
    hook.remove()
    return seen[0]


@pytest.mark.parametrize("size, grid", [(448, 28), (96, 6), (224, 14)])
def test_position_table_is_resampled_as_the_original(size, grid):
    """bicubic, align_corners=False, no antialiasing, enlarging (448 px, the training crop) and shrinking (96 px, a
    local crop); the class token's entry untouched. timm's antialiased resampling stays available by the switch."""
    net = _vit_b_like(antialias=False)
    table = net.encoder.pos_embed.detach()  # (1, 1 + 196, D)
    d = table.shape[-1]
    patches14 = table[:, 1:].reshape(1, 14, 14, d).permute(0, 3, 1, 2)
    expected = F.interpolate(patches14, size=(grid, grid), mode="bicubic", align_corners=False)
    expected = expected.permute(0, 2, 3, 1).reshape(1, grid * grid, d)
    seen = _table_seen_by_the_blocks(net, size)
    assert seen.shape == (1, 1 + grid * grid, d)
    torch.testing.assert_close(seen[:, 1:], expected, rtol=0, atol=0)
    torch.testing.assert_close(seen[:, :1], net.encoder.cls_token + table[:, :1], rtol=0, atol=0)

    antialiased = _table_seen_by_the_blocks(_vit_b_like(antialias=True), size)[:, 1:]
    timm_way = F.interpolate(patches14, size=(grid, grid), mode="bicubic", align_corners=False, antialias=True)
    torch.testing.assert_close(antialiased, timm_way.permute(0, 2, 3, 1).reshape(1, grid * grid, d))
    if grid != 14:  # the two kernels differ when enlarging as well as when shrinking
        assert (antialiased - expected).norm() / expected.norm() > 0.02


def test_a_size_that_is_not_a_multiple_of_the_patch_drops_the_remainder(tiny_model):
    """The original's strided patch convolution ignores the last size % patch rows and columns: the grid is
    floor(size / patch) and the result is that of the input cropped to it (patch 8 here)."""
    x = torch.randn(2, 3, 37, 45)
    cam, aux = tiny_model.forward_cams(x)
    assert cam.shape == (2, 4, 4, 5)
    cropped_cam, cropped_aux = tiny_model.forward_cams(x[..., :32, :40])
    torch.testing.assert_close(cam, cropped_cam, rtol=0, atol=0)
    torch.testing.assert_close(aux, cropped_aux, rtol=0, atol=0)
    out = tiny_model(x)
    assert out.seg_logits.shape == (2, 5, 4, 5)
    torch.testing.assert_close(out.cls_logits, tiny_model(x[..., :32, :40]).cls_logits, rtol=0, atol=0)


def test_a_token_classifier_trains_the_class_token_and_stays_out_of_the_encoder(tiny_cfg, tmp_path):
    from toco.checkpoint import export_encoder, save_checkpoint
    from toco.engine.step import train_step
    from toco.par import PAR
    from toco.engine.loop import build_loaders

    from toco.models import build_model

    assert build_model(tiny_cfg.model, 5).token_classifier is None  # ToCo itself has none
    tiny_cfg.model.token_classifier = True
    model = build_model(tiny_cfg.model, 5)
    batch = next(iter(build_loaders(tiny_cfg)[0]))
    result = train_step(model, PAR((1,), 1), batch, tiny_cfg, iteration=0)
    with torch.no_grad():
        expected = F.multilabel_soft_margin_loss(model.token_classifier(model.encode(batch["image"]).cls_token),
                                                 batch["cls_label"])
    assert float(result.losses["cls_token"]) == pytest.approx(float(expected), rel=1e-5)
    result.total.backward()
    assert model.token_classifier.weight.grad.abs().sum() > 0 and model.encoder.cls_token.grad.abs().sum() > 0
    assert any(p is model.token_classifier.weight for p in model.param_groups()[2])
    save_checkpoint(tmp_path / "last.pt", dict(model=model.state_dict()))
    export_encoder(tmp_path / "last.pt", tmp_path / "encoder.pt")
    assert not any("token_classifier" in k for k in torch.load(tmp_path / "encoder.pt", weights_only=True))
