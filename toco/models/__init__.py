from toco.models.toco_net import ModelOutput, ToCoNet, build_model

__all__ = ["ModelOutput", "ToCoNet", "build_model"]
