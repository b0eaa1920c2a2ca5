import math

import pytest
import torch
import torch.nn.functional as F

from toco import kernels
from toco.filters import LATTICE_GAIN, Lattice, lattice_features
from toco.losses import DenseCRFEnergy, cls_loss, ctc_loss, dense_crf_loss, ptc_loss, seg_loss


# ---------------------------------------------------------------------------------------------------- cls
def test_cls_loss_is_mean_sigmoid_bce():
    logits = torch.tensor([[2.0, -1.0, 0.0], [0.5, 0.5, -2.0]])
    y = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    sig = torch.sigmoid(logits)
    manual = -(y * sig.log() + (1 - y) * (1 - sig).log()).mean()
    assert cls_loss(logits, y).item() == pytest.approx(manual.item(), rel=1e-6)


# ---------------------------------------------------------------------------------------------------- PTC
def _ptc_loop(tokens, labels, ignore=255):
    b, d, h, w = tokens.shape
    pos_sum = neg_sum = 0.0
    n_pos = n_neg = 0
    for n in range(b):
        x = tokens[n].reshape(d, -1)
        lab = labels[n].reshape(-1).tolist()
        for i in range(h * w):
            for j in range(h * w):
                if i == j or lab[i] == ignore or lab[j] == ignore:
                    continue
                c = abs(float(torch.dot(x[:, i], x[:, j]) / (x[:, i].norm() * x[:, j].norm())))
                if lab[i] == lab[j]:
                    pos_sum, n_pos = pos_sum + c, n_pos + 1
                else:
                    neg_sum, n_neg = neg_sum + c, n_neg + 1
    return 0.5 * (1 - pos_sum / (n_pos + 1)) + 0.5 * neg_sum / (n_neg + 1)


def test_ptc_hand_case_absolute_cosine():
    # tokens t0=(1,0), t1=(-1,0) (anti-parallel, |cos|=1), t2=(1,1) (|cos|=1/sqrt2 to both), labels [1,1,0]
    tokens = torch.tensor([[1.0, -1.0, 1.0], [0.0, 0.0, 1.0]]).reshape(1, 2, 1, 3)
    labels = torch.tensor([[[1, 1, 0]]])
    # positives: (0,1),(1,0) sum 2, n 2 -> 1 - 2/3; negatives: 4 pairs of 1/sqrt2, n 4 -> 2 sqrt2 / 5
    expected = 0.5 * (1 - 2 / 3) + 0.5 * (4 / math.sqrt(2)) / 5
    assert ptc_loss(tokens, labels).item() == pytest.approx(expected, rel=1e-6)
    # ignoring token 1: no positive pair -> 0.5 * (1 - 0/1); negatives (0,2),(2,0) -> sqrt2 / 3
    labels_ign = torch.tensor([[[1, 255, 0]]])
    expected_ign = 0.5 * 1 + 0.5 * (2 / math.sqrt(2)) / 3
    assert ptc_loss(tokens, labels_ign).item() == pytest.approx(expected_ign, rel=1e-6)


def test_ptc_matches_loop_and_pools_batch():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(2, 5, 3, 3, generator=g, requires_grad=True)
    labels = torch.randint(0, 3, (2, 3, 3), generator=g)
    labels[0, 0, :2] = 255
    loss = ptc_loss(tokens, labels)
    assert loss.item() == pytest.approx(_ptc_loop(tokens.detach(), labels), rel=1e-5)
    loss.backward()
    assert torch.isfinite(tokens.grad).all()


# ---------------------------------------------------------------------------------------------------- CTC
def _ctc_loop(student, teacher, flags, temp, legacy):
    """Direct transcription of the formula (docs/method.md §3.3), float64 exp."""
    b, v = flags.shape
    s = student.double().reshape(v, b, -1)
    t = teacher.double().reshape(2, b, -1)
    total = 0.0
    for i in range(b):
        loss = 0.0
        pos = [j for j in range(v) if flags[i, j] == 1]
        for tv in range(2):
            e = [math.exp(float(t[tv, i] @ s[j, i]) / temp) for j in range(v)]
            n_t = sum(e[j] for j in range(v) if flags[i, j] == 0)
            for j in pos:
                loss += -math.log(e[j] / (e[j] + n_t + 1e-4))
            if legacy:
                loss += -math.log(1 / (1 + n_t + 1e-4))
        total += loss / 2 / (len(pos) + 1e-4)
    return total / b


@pytest.mark.parametrize("legacy", [False, True])
def test_ctc_matches_direct_loop(legacy):
    g = torch.Generator().manual_seed(1)
    b, v, d = 3, 6, 8
    student = torch.randn(v * b, d, generator=g)
    teacher = torch.randn(2 * b, d, generator=g)
    flags = torch.tensor([[1, 1, 0, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]])
    got = ctc_loss(student, teacher, flags, temperature=0.5, legacy_bugs=legacy)
    assert got.item() == pytest.approx(_ctc_loop(student, teacher, flags, 0.5, legacy), rel=1e-5)


def test_ctc_hand_case():
    # B=1, views: 2 globals (positive) + 1 negative, D=1; teacher t = [1, 0.5], student s = [1, 0, 2], tau = 1
    student, teacher = torch.tensor([[1.0], [0.0], [2.0]]), torch.tensor([[1.0], [0.5]])
    flags = torch.tensor([[1, 1, 0]])
    loss = 0.0
    for t in (1.0, 0.5):
        n = math.exp(2 * t)
        loss += sum(-math.log(math.exp(t * s) / (math.exp(t * s) + n + 1e-4)) for s in (1.0, 0.0))
    expected = loss / 2 / (2 + 1e-4)
    assert ctc_loss(student, teacher, flags, temperature=1.0).item() == pytest.approx(expected, rel=1e-6)


def test_ctc_large_logits_stay_finite():
    # head outputs are 1024 cosines: dot products up to ~1000, exp(1000/0.5) overflows a direct formula
    student = torch.full((3 * 2, 4), 15.0, requires_grad=True)
    teacher = torch.full((2 * 2, 4), 15.0)
    flags = torch.tensor([[1, 1, 0], [1, 1, 1]])
    loss = ctc_loss(student, teacher, flags)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
    # all logits equal: image 0 -> -log(1/2) per positive, image 1 (no negatives) -> ~0
    assert loss.item() == pytest.approx((math.log(2) * 2 * 2 / 2 / (2 + 1e-4)) / 2, rel=1e-4)


# ---------------------------------------------------------------------------------------------------- seg
def _manual_ce(logits, label, keep):
    logp = F.log_softmax(logits, dim=1)
    vals = [-logp[n, label[n, i, j], i, j] for n, i, j in keep.nonzero().tolist()]
    return torch.stack(vals).mean() if vals else torch.tensor(0.0)


def test_seg_loss_matches_manual_balanced_ce():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 4, 3, 3, generator=g)
    label = torch.randint(0, 4, (2, 6, 6), generator=g)
    label[0, :2] = 255
    up = F.interpolate(logits, size=(6, 6), mode="bilinear", align_corners=False)
    expected = 0.5 * _manual_ce(up, label, label == 0) + 0.5 * _manual_ce(up, label, (label > 0) & (label != 255))
    assert seg_loss(logits, label).item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("fill", ["ignore", "bg", "fg"])
def test_seg_loss_empty_terms_are_zero_not_nan(fill):
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    label = torch.full((1, 4, 4), {"ignore": 255, "bg": 0, "fg": 2}[fill])
    loss = seg_loss(logits, label)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    if fill == "ignore":
        assert loss.item() == 0.0
    else:  # only one term survives, with weight 0.5
        expected = 0.5 * F.cross_entropy(logits.detach(), label)
        assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


# ---------------------------------------------------------------------------------------------------- DenseCRF
def _dense_w(image, sigma_xy, sigma_rgb):
    """Explicit (N,N) bilateral matrix of one (3,H,W) image, float64, via loops."""
    _, h, w = image.shape
    n = h * w
    wm = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        yi, xi = divmod(i, w)
        for j in range(n):
            yj, xj = divmod(j, w)
            dp = (yi - yj) ** 2 + (xi - xj) ** 2
            dc = float(((image[:, yi, xi] - image[:, yj, xj]).double() ** 2).sum())
            wm[i, j] = math.exp(-dp / (2 * sigma_xy ** 2) - dc / (2 * sigma_rgb ** 2))
    return wm


def _crf_case(seed, h=6, w=6, b=2, k=3):
    g = torch.Generator().manual_seed(seed)
    image = 100 + 40 * torch.rand(b, 3, h, w, generator=g, dtype=torch.float64)
    probs = torch.softmax(2 * torch.randn(b, k, h, w, generator=g, dtype=torch.float64), dim=1)
    roi = torch.ones(b, h, w, dtype=torch.float64)
    roi[0, :, -2:] = 0  # padding on the right of image 0
    label = torch.randint(0, k, (b, h, w), generator=g)
    label[1, :3, :3] = 255
    return image, probs, roi, label


def _crf_reference(image, probs, roi, label, sigma_xy, sigma_rgb, scale):
    """Energy and the original's gradient -2 s AS / B * roi from explicit dense matrices."""
    b, k = probs.shape[:2]
    energy = 0.0
    grad = torch.zeros_like(probs)
    for n in range(b):
        wm = _dense_w(image[n], sigma_xy, sigma_rgb)
        gate = roi[n] - probs[n].max(dim=0).values
        gate[label[n] == 255] = 1
        gate = gate.clamp_min(0).reshape(-1)
        for c in range(k):
            p = (probs[n, c] * roi[n]).reshape(-1)
            a_s = gate * (wm @ p)
            energy -= float(p @ a_s) / b * scale
            grad[n, c] = (-2 * scale * a_s / b).reshape(roi[n].shape) * roi[n]
    return energy, grad


def test_dense_crf_loss_matches_dense_matrix_and_original_gradient():
    image, probs, roi, label = _crf_case(0)
    probs.requires_grad_(True)
    loss = dense_crf_loss(image, probs, roi, label, sigma_rgb=15.0, sigma_xy=2.0, downscale=1.0,
                          energy_scale=1.0, backend="exact")
    # the exact filter is brought to the original lattice's scale: its sum / LATTICE_GAIN
    energy, grad = _crf_reference(image, probs.detach(), roi, label, 2.0, 15.0, 1.0 / LATTICE_GAIN)
    assert loss.item() == pytest.approx(energy, rel=1e-10)
    loss.backward()
    torch.testing.assert_close(probs.grad, grad, rtol=1e-10, atol=1e-12)


def test_dense_crf_loss_downscales_like_the_original():
    # 12x12 at scale 0.5 -> 6x6: image/roi/label nearest (= [::2, ::2]), probs bilinear (= 2x2 average)
    image, probs, roi, label = _crf_case(1, h=12, w=12)
    loss = dense_crf_loss(image, probs, roi, label, sigma_rgb=15.0, sigma_xy=4.0, downscale=0.5,
                          energy_scale=1e-7, backend="exact")
    energy, _ = _crf_reference(image[..., ::2, ::2], F.avg_pool2d(probs, 2), roi[..., ::2, ::2],
                               label[..., ::2, ::2], 4.0 * 0.5, 15.0, 1e-7 / LATTICE_GAIN)
    assert loss.item() == pytest.approx(energy, rel=1e-9)


def test_dense_crf_loss_on_the_lattice_is_the_originals_raw_lattice_energy():
    # the original's energy uses its permutohedral filter's raw sum; the lattice backends give exactly that
    try:
        kernels.load("cpu")
    except kernels.KernelBuildError as err:
        pytest.skip(f"the CPU lattice kernel does not build here: {err}")
    image, probs, roi, label = _crf_case(3, h=16, w=16)
    probs = probs.float()
    loss = dense_crf_loss(image.float(), probs, roi.float(), label, sigma_rgb=15.0, sigma_xy=8.0, downscale=1.0,
                          energy_scale=1e-7, backend="cpu")
    gate = (roi - probs.max(dim=1).values).masked_fill(label == 255, 1.0).clamp_min(0)  # (B,H,W)
    p = probs * roi[:, None]
    raw = Lattice(lattice_features(image.float(), 8.0, 15.0), "cpu").filter(p.flatten(2), "symmetric")  # W P~
    energy = -(p.flatten(2) * gate.flatten(1)[:, None] * raw).sum() / probs.shape[0] * 1e-7
    assert loss.item() == pytest.approx(energy.item(), rel=1e-5)


def test_dense_crf_gradient_is_exact_when_gate_is_constant():
    # every pixel ignored and roi = 1 -> g = 1: the original's -2 W P / B is the true derivative of E
    image, probs, roi, label = _crf_case(2, h=4, w=4, k=2)
    roi = torch.ones_like(roi)
    label = torch.full_like(label, 255)
    logits = torch.randn(probs.shape, dtype=torch.float64, requires_grad=True)

    def energy(z):  # softmax + bilinear downscale in front, as in training
        return dense_crf_loss(image, torch.softmax(z, dim=1), roi, label, sigma_rgb=20.0, sigma_xy=3.0,
                              downscale=0.5, energy_scale=1.0)

    assert torch.autograd.gradcheck(energy, (logits,), eps=1e-6, atol=1e-7)
    # and directly on the Function at working resolution
    p = probs.clone().requires_grad_(True)
    fn = lambda q: DenseCRFEnergy.apply(image, q, roi, label == 255, 3.0, 20.0, 1.0, "exact")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (p,), eps=1e-6, atol=1e-7)
