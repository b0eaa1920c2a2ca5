"""ToCo losses (docs/method.md §3): classification, PTC, CTC, balanced segmentation CE, DenseCRF energy."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from toco.filters import bilateral_filter


# ----------------------------------------------------------------------------------------------------
# docs/method.md §3.1
def cls_loss(logits: torch.Tensor, cls_label: torch.Tensor) -> torch.Tensor:
    """Multilabel soft-margin loss (mean sigmoid-BCE over classes and batch). logits, cls_label: (B,C-1)."""
    return F.multilabel_soft_margin_loss(logits, cls_label.to(logits.dtype))


# ----------------------------------------------------------------------------------------------------
# docs/method.md §3.2
def ptc_loss(tokens: torch.Tensor, token_label: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Patch token contrast.

    tokens (B,D,h,w) final patch tokens; token_label (B,h,w) with ignore_index. S = |cos| of every token pair
    of an image; positives = same label, negatives = different labels; pairs with an ignored token and the
    diagonal are excluded. Loss = 0.5 (1 - sum_pos S / (n_pos + 1)) + 0.5 sum_neg S / (n_neg + 1), sums and
    counts pooled over the batch.
    """
    b, d, h, w = tokens.shape
    x = F.normalize(tokens.reshape(b, d, h * w), p=2, dim=1, eps=1e-8)  # (B,D,N)
    sim = torch.bmm(x.transpose(1, 2), x).abs()  # (B,N,N); anti-parallel tokens count as similar
    lab = token_label.reshape(b, h * w).to(tokens.device)
    valid = lab != ignore_index  # (B,N)
    eye = torch.eye(h * w, dtype=torch.bool, device=tokens.device)
    pair = valid[:, :, None] & valid[:, None, :] & ~eye  # (B,N,N)
    same = lab[:, :, None] == lab[:, None, :]
    pos, neg = pair & same, pair & ~same
    pos_term = 1 - (sim * pos).sum() / (pos.sum() + 1)
    neg_term = (sim * neg).sum() / (neg.sum() + 1)
    return 0.5 * pos_term + 0.5 * neg_term


# ----------------------------------------------------------------------------------------------------
# docs/method.md §3.3
def ctc_loss(student: torch.Tensor, teacher: torch.Tensor, flags: torch.Tensor, temperature: float = 0.5,
             legacy_bugs: bool = False) -> torch.Tensor:
    """Class token contrast with negative local crops.

    student (V*B,D) and teacher (2*B,D) are view-major (view 0 images 0..B-1, view 1, ...); flags (B,V), 1 =
    positive view, 0 = negative. With s = teacher . student^T / tau (B,2,V) and N_t = sum_{neg j} exp(s_tj):
        l_tj = -log(exp(s_tj) / (exp(s_tj) + N_t + 1e-4))   for every positive j,
        loss_i = sum_t sum_j l_tj / 2 / (n_pos_i + 1e-4),    loss = mean_i loss_i.
    legacy_bugs=True adds the original's `for...else` term log(1 + N_t + 1e-4) once per image and teacher view.
    Computed with logsumexp, so large logits cannot overflow exp().
    """
    b, v = flags.shape
    s_out = student.reshape(v, b, -1).transpose(0, 1)  # (B,V,D)
    t_out = teacher.reshape(2, b, -1).transpose(0, 1)  # (B,2,D)
    logits = torch.bmm(t_out, s_out.transpose(1, 2)) / temperature  # (B,2,V), log of the original's exp
    pos = (flags > 0).to(logits.device)  # (B,V)
    neg = ~pos
    eps = torch.full_like(logits[..., :1], math.log(1e-4))  # (B,2,1)
    # log(N_t + 1e-4) over the negatives of each image (B,2,1)
    log_neg = torch.logsumexp(torch.cat([logits.masked_fill(~neg[:, None, :], float("-inf")), eps], dim=-1),
                              dim=-1, keepdim=True)
    per_view = torch.logaddexp(logits, log_neg) - logits  # (B,2,V) = -log(e_j / (e_j + N_t + 1e-4))
    total = (per_view * pos[:, None, :]).sum(dim=(1, 2))  # (B,)
    if legacy_bugs:
        # -log(1 / (1 + N_t + 1e-4)) = log(1 + N_t + 1e-4) = logaddexp(0, log(N_t + 1e-4))
        total = total + torch.logaddexp(torch.zeros_like(log_neg), log_neg).sum(dim=(1, 2))
    per_image = total / 2 / (pos.sum(dim=1) + 1e-4)
    return per_image.mean()


# ----------------------------------------------------------------------------------------------------
# docs/method.md §3.4
def _masked_ce(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Mean CE over non-ignored pixels; 0 (still attached to the graph) when there is none."""
    total = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum")
    count = (target != ignore_index).sum()
    return total / count.clamp_min(1)


def seg_loss(logits: torch.Tensor, label: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Balanced CE: 0.5 CE(bg pixels) + 0.5 CE(fg pixels) on logits (B,C,h,w) upsampled (bilinear,
    align_corners=False) to label (B,H,W). An empty term contributes 0 instead of the original's NaN."""
    label = label.to(logits.device).long()
    if logits.shape[-2:] != label.shape[-2:]:
        logits = F.interpolate(logits, size=label.shape[-2:], mode="bilinear", align_corners=False)
    ignore = torch.full_like(label, ignore_index)
    bg_target = torch.where(label == 0, label, ignore)
    fg_target = torch.where(label == 0, ignore, label)  # ignored pixels stay ignored
    return 0.5 * _masked_ce(logits, bg_target, ignore_index) + 0.5 * _masked_ce(logits, fg_target, ignore_index)


# ----------------------------------------------------------------------------------------------------
# docs/method.md §3.5
class DenseCRFEnergy(torch.autograd.Function):
    """E = -(s/B) sum_k <P~_k, g (W P~_k)>, P~ = P * roi; backward -2 s g (W P~) / B * roi (the original's).

    All inputs are already at the working resolution; W is the bilateral filter in the original's ("lattice")
    scale (toco.filters.CONVENTIONS). The gradient treats the gate g (which depends on P through max_k P_k) as a
    constant and uses W's symmetry as if g were uniform, exactly like rloss/ToCo: it is the derivative of E only
    where g and roi are constant (e.g. every pixel ignored -> g = 1, roi = 1). In general the true derivative
    would be -(s/B) roi (g W P~ + W (g P~)) plus a term through g.
    """

    @staticmethod
    def forward(ctx, image, probs, roi, unlabeled, sigma_xy, sigma_rgb, scale, backend):
        b = probs.shape[0]
        roi = roi.to(probs.dtype)  # (B,H,W)
        gate = (roi - probs.max(dim=1).values).masked_fill(unlabeled, 1.0).clamp_min(0.0)  # (B,H,W)
        p_roi = probs * roi[:, None]  # (B,K,H,W)
        filtered = bilateral_filter(image, p_roi, sigma_xy, sigma_rgb, backend, convention="lattice")  # W P~
        a_s = gate[:, None] * filtered  # (B,K,H,W)
        ctx.save_for_backward(a_s, roi)
        ctx.factor = scale / b
        return -(p_roi * a_s).sum() * ctx.factor

    @staticmethod
    def backward(ctx, grad_output):
        a_s, roi = ctx.saved_tensors
        grad = -2.0 * ctx.factor * grad_output * a_s * roi[:, None]
        return None, grad, None, None, None, None, None, None


def dense_crf_loss(image: torch.Tensor, probs: torch.Tensor, roi: torch.Tensor, label: torch.Tensor,
                   sigma_rgb: float = 15.0, sigma_xy: float = 100.0, downscale: float = 0.5,
                   energy_scale: float = 1e-7, backend: str = "exact", ignore_index: int = 255) -> torch.Tensor:
    """Regularised DenseCRF loss (Tang et al. 2018, with ToCo's confidence gate), unweighted (`loss.w_reg`
    weights it in the step).

    image (B,3,H,W) RGB 0-255 float; probs (B,K,H,W) softmax probabilities (gradient flows through the
    bilinear downscale); roi (B,H,W) {0,1} valid-crop mask; label (B,H,W) pseudo label with ignore_index.
    At `downscale` the image, roi and label are sampled nearest, probs bilinearly (align_corners=False) and
    sigma_xy is scaled (sigma_rgb is not). Gate g = roi - max_k P_k, 1 on ignored pixels, clipped at 0.
    Returns energy_scale * E (see DenseCRFEnergy): the original's 1e-7 inside the layer, on the original's
    filter scale whichever backend runs.
    """
    h, w = probs.shape[-2:]
    roi = roi.to(probs.dtype)
    label = label.to(probs.device)
    if downscale != 1.0:
        size = (int(h * downscale), int(w * downscale))
        image = F.interpolate(image, size=size, mode="nearest")
        probs = F.interpolate(probs, size=size, mode="bilinear", align_corners=False)
        roi = F.interpolate(roi[:, None], size=size, mode="nearest")[:, 0]
        label = F.interpolate(label[:, None].float(), size=size, mode="nearest")[:, 0].long()
    unlabeled = label == ignore_index  # (B,h,w)
    return DenseCRFEnergy.apply(image.to(probs.dtype), probs, roi, unlabeled, sigma_xy * downscale, sigma_rgb,
                                energy_scale, backend)
