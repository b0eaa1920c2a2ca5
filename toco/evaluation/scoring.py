"""Scoring images: `ImageView` (one image, and what the model makes of it, computed once on first use),
`ImageScorer` (a model and the evaluators' needs) and `score_images` (the one loop over a source, which every
evaluation runs: in training, `toco eval`, `toco predict`, sharded or not)."""
from __future__ import annotations

from functools import cached_property

import torch
import torch.nn.functional as F
from tqdm import tqdm

from toco.config import Config
from toco.data import DatasetError, Sample
from toco.data.transforms import denormalize, normalize
from toco.evaluation.evaluators import VALIDATION, Scores
from toco.evaluation.inference import InferenceSettings, Prediction, autocast, predict_image
from toco.par import PAR
from toco.pseudo import cam_to_label, multi_scale_cam, refine_cams_with_bkg


def _nearest(label: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(label[:, None].float(), size=size, mode="nearest")[:, 0].long()


class ImageView:
    """One image as the evaluators see it. The segmentation follows the test-time settings; the CAMs and the
    classification come from the image resized to data.val_size, as in-training validation sees it."""

    def __init__(self, scorer: "ImageScorer", sample: Sample):
        self.scorer, self.sample = scorer, sample
        self._cam_labels: dict[str, torch.Tensor] = {}
        self._par_labels: dict[str, torch.Tensor] = {}

    @cached_property
    def prediction(self) -> Prediction:
        s = self.scorer
        return predict_image(s.model, self.sample.image, s.settings, s.device, keep_probs=s.keep_probs)

    @cached_property
    def x_val(self) -> torch.Tensor:  # (1,3,S,S)
        size = self.scorer.cfg.data.val_size
        x = normalize(self.sample.image)[None].to(self.scorer.device)
        return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)

    @cached_property
    def cls_logits(self) -> torch.Tensor:  # (C-1,)
        s = self.scorer
        if s.predicts and s.settings.single_pass and s.settings.resize == s.cfg.data.val_size:
            output = self.prediction.output  # in-training validation: the segmentation's forward serves both
            if output is not None:
                return output.cls_logits[0].float()
        with torch.no_grad(), autocast(s.settings.precision, s.device):
            return s.model(self.x_val).cls_logits[0].float()

    @cached_property
    def gt(self) -> torch.Tensor:  # (1,H,W) int64
        return torch.from_numpy(self.sample.mask.astype("int64"))[None]

    @cached_property
    def cls_label(self) -> torch.Tensor:  # (1,C-1)
        return torch.from_numpy(self.sample.cls_label)[None].to(self.scorer.device)

    @cached_property
    def cams(self) -> dict[str, torch.Tensor]:  # cam, aux_cam: (1,C-1,S,S) in [0, 1]
        s = self.scorer
        with autocast(s.settings.precision, s.device):
            return dict(zip(("cam", "aux_cam"), multi_scale_cam(s.model, self.x_val, s.cfg.pseudo.cam_scales)))

    def cam_at_gt(self, key: str) -> torch.Tensor:  # (1,C-1,H,W)
        return F.interpolate(self.cams[key], size=self.gt.shape[-2:], mode="bilinear", align_corners=False)

    def cam_label(self, key: str) -> torch.Tensor:
        if key not in self._cam_labels:
            self._cam_labels[key] = cam_to_label(self.cam_at_gt(key), self.cls_label,
                                                 self.scorer.cfg.pseudo.bkg_thre).cpu()
        return self._cam_labels[key]

    @cached_property
    def images01(self) -> torch.Tensor:
        return denormalize(self.x_val).clamp(0, 255).floor() / 255  # as the training step sees it

    def par_label(self, key: str) -> torch.Tensor:
        if key not in self._par_labels:
            bkg = self.scorer.cfg.pseudo.bkg_thre
            refined = refine_cams_with_bkg(self.scorer.par, self.images01, self.cams[key], self.cls_label, bkg, bkg)
            self._par_labels[key] = _nearest(refined, self.gt.shape[-2:]).cpu()
        return self._par_labels[key]

    @cached_property
    def seg_target(self) -> torch.Tensor:
        pseudo = self.scorer.cfg.pseudo
        target = refine_cams_with_bkg(self.scorer.par, self.images01, self.cams["cam"], self.cls_label,
                                      pseudo.high_thre, pseudo.low_thre)
        return _nearest(target, self.gt.shape[-2:]).cpu()

    def shown(self) -> dict:
        """What a person would look at, of what was computed: the image, the ground truth, the prediction and
        its probabilities, the CAM's heat map and label."""
        computed = vars(self)
        shown = {"image": self.sample.image, "gt": self.sample.mask}
        if "prediction" in computed:
            shown.update(pred=self.prediction.labels, probs=self.prediction.probs)
        if "cams" in computed:
            present = self.cls_label[0] > 0.5
            up = self.cam_at_gt("cam")[0]
            heat = up[present].amax(dim=0) if present.any() else torch.zeros(self.gt.shape[-2:])
            shown.update(cam=heat.cpu().numpy(), cam_label=self.cam_label("cam")[0].numpy())
        return shown


class ImageScorer:
    """Scores one image at a time with a model in eval mode: adds it to a `Scores` and returns what a person
    would look at (ImageView.shown). `predict` segments images that no metric scores (`toco predict`)."""

    def __init__(self, model, cfg: Config, metrics: tuple[str, ...], settings: InferenceSettings, device,
                 predict: bool = False, keep_probs: bool = False):
        self.model, self.cfg, self.metrics, self.settings = model, cfg, tuple(metrics), settings
        self.device = torch.device(device)
        self.predicts = predict or "seg" in self.metrics
        self.keep_probs = keep_probs
        self.par = None
        if any(m in self.metrics for m in ("cam_par", "aux_cam_par", "seg_target")):
            self.par = PAR(cfg.pseudo.par_dilations, cfg.pseudo.par_iters).to(self.device)

    @torch.no_grad()
    def __call__(self, sample: Sample, scores: Scores) -> dict:
        view = ImageView(self, sample)
        if self.predicts:
            view.prediction
        scores.process(view)
        return view.shown()


class _Loaded(torch.utils.data.Dataset):
    """source.load(i) for DataLoader workers; a DatasetError comes back as a value, so the loop raises it with
    its one-line message instead of DataLoader's wrapped traceback."""

    def __init__(self, source, indices):
        self.source, self.indices = source, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int):
        try:
            return self.source.load(self.indices[k])
        except DatasetError as err:
            return err


def _as_is(item):
    return item


def score_images(scorer: ImageScorer, source, indices, scores: Scores, keep: int = 0, num_workers: int = 0,
                 on_image=None, skip_unreadable: bool = False, progress: tqdm | None = None) -> tuple[list, list]:
    """Score `source`'s images at `indices` into `scores`; images load in `num_workers` processes ahead of the
    model. `on_image(sample, shown)` sees every image (files written by workers). Returns (the first `keep`
    images' pictures, the unreadable files skipped when `skip_unreadable`, else the first one raises)."""
    loader = torch.utils.data.DataLoader(_Loaded(source, indices), batch_size=None, num_workers=num_workers,
                                         collate_fn=_as_is)
    samples, skipped = [], []
    for item in loader:
        if isinstance(item, DatasetError):
            if not skip_unreadable:
                raise item
            skipped.append(str(item))
        else:
            shown = scorer(item, scores)
            if on_image is not None:
                on_image(item, shown)
            if len(samples) < keep:
                samples.append({k: v for k, v in shown.items() if k != "probs"})
        if progress is not None:
            progress.update(1)
    return samples, skipped


def evaluate_model(model, cfg: Config, source, metrics=VALIDATION, settings: InferenceSettings | None = None,
                   limit: int = 0, keep: int = 6, num_workers: int = 0, desc: str = "validate") -> tuple[Scores, list]:
    """Score a model in this process (in-training validation: resized to data.val_size, single scale)."""
    settings = settings or InferenceSettings(resize=cfg.data.val_size)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    scores = Scores(source.num_classes, tuple(metrics))
    n = min(len(source), limit) if limit else len(source)
    with tqdm(total=n, desc=desc, unit="img", leave=False, dynamic_ncols=True, mininterval=2.0) as progress:
        samples, _ = score_images(ImageScorer(model, cfg, metrics, settings, device), source, range(n), scores,
                                  keep, num_workers, progress=progress)
    model.train(was_training)
    return scores, samples
