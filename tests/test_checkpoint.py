import pytest
import torch

from toco.engine.checkpoint import check_compatible, load_checkpoint, save_checkpoint


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


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
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
