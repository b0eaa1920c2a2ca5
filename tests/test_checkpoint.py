import pytest
import torch

from toco.checkpoint import CheckpointError, check_compatible, export_encoder, load_checkpoint, save_checkpoint


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"iteration": 1})

    def broken_save(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt  # the process is killed mid-write

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"iteration": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["iteration"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind


def test_load_refuses_pickled_code(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"payload": object()}, path)  # arbitrary objects need unpickling of code
    with pytest.raises(Exception, match="[Ww]eights only"):
        load_checkpoint(path)


class _NotATensor:
    pass


def test_a_damaged_or_foreign_checkpoint_gets_our_own_message(tmp_path):
    """Never torch's text (which advises weights_only=False): what is wrong with the file, in one line."""
    import pickle

    good = tmp_path / "good.pt"
    torch.save({"model": {"w": torch.ones(2)}}, good)
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "truncated.pt").write_bytes(good.read_bytes()[:len(good.read_bytes()) // 2])
    (tmp_path / "text.pt").write_text("not a checkpoint\n" * 20)
    (tmp_path / "pickle.pt").write_bytes(pickle.dumps({"w": [1, 2]}))
    torch.save({"model": _NotATensor()}, tmp_path / "object.pt")
    expected = {"empty.pt": "is empty (0 bytes)", "truncated.pt": "is damaged: truncated",
                "text.pt": "is not a PyTorch checkpoint", "pickle.pt": "is not a PyTorch checkpoint",
                "object.pt": "holds Python objects other than tensors"}
    for name, message in expected.items():
        for mmap in (False, True):
            with pytest.raises(CheckpointError) as err:
                load_checkpoint(tmp_path / name, mmap=mmap)
            assert str(err.value).startswith(f"checkpoint {tmp_path / name} {message}")
            assert "weights_only" not in str(err.value) and "\n" not in str(err.value)


def test_a_legacy_format_checkpoint_loads_even_where_a_map_is_asked_for(tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save({"model": {"w": torch.arange(3.0)}}, path, _use_new_zipfile_serialization=False)
    assert torch.equal(load_checkpoint(path, mmap=True)["model"]["w"], torch.arange(3.0))


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")


def test_other_class_count_or_backbone_is_a_readable_error(tiny_cfg, tiny_model):
    from toco.models import build_model

    tiny_cfg.data.num_classes = 7
    other = build_model(tiny_cfg.model, 7).state_dict()
    with pytest.raises(ValueError, match="number of classes"):
        check_compatible(tiny_model, other, "x.pt")
    tiny_cfg.model.backbone_kwargs = dict(tiny_cfg.model.backbone_kwargs, embed_dim=48)
    wider = build_model(tiny_cfg.model, 5).state_dict()
    with pytest.raises(ValueError, match="backbone"):
        check_compatible(tiny_model, wider, "x.pt")
    check_compatible(tiny_model, tiny_model.state_dict(), "x.pt")


def test_exported_encoder_is_another_runs_pretrained_backbone(tiny_cfg, tmp_path):
    """A conv-stem encoder survives checkpoint -> export -> model.pretrained_file; the heads start fresh."""
    from toco.models import build_model

    tiny_cfg.model.conv_stem = (8, 16)
    tiny_cfg.model.backbone_kwargs = dict(tiny_cfg.model.backbone_kwargs, patch_size=1)
    torch.manual_seed(0)
    trained = build_model(tiny_cfg.model, 5)
    save_checkpoint(tmp_path / "last.pt", dict(model=trained.state_dict(), iteration=3))
    assert export_encoder(tmp_path / "last.pt", tmp_path / "enc.pt") == len(trained.encoder.state_dict())

    tiny_cfg.model.pretrained, tiny_cfg.model.pretrained_file = True, str(tmp_path / "enc.pt")
    torch.manual_seed(1)
    loaded = build_model(tiny_cfg.model, 5)
    for (name, theirs), ours in zip(trained.encoder.state_dict().items(), loaded.encoder.state_dict().values()):
        assert torch.equal(theirs, ours), name
    assert not torch.equal(trained.classifier.weight, loaded.classifier.weight)
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(trained.eval().encode(x).tokens, loaded.eval().encode(x).tokens)


def test_export_of_a_file_that_is_no_training_checkpoint(tmp_path):
    save_checkpoint(tmp_path / "weights.pt", {"blocks.0.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="weights.pt has no 'model' entry"):
        export_encoder(tmp_path / "weights.pt", tmp_path / "out.pt")
    assert not (tmp_path / "out.pt").exists()
