"""Fréchet Inception Distance, self-contained and faithful to pytorch-fid.

    python fid.py A B                     # FID between two image sets (or saved statistics)
    python fid.py A --save-stats A.npz    # save mu/sigma of A for later comparisons
    python fid.py A B --all               # the panel: FID, clean FID, KID, precision/recall, density/coverage
    python fid.py --help

A and B may each be a folder of images, an .npz/.npy of uint8 images ((N,3,H,W) or (N,H,W,3); an .npz
takes its `images` array), or an .npz of statistics with keys `mu` and `sigma`.

The network is the FID variant of Inception-v3 (Heusel et al. 2017, "GANs trained by a two time-scale
update rule converge to a local Nash equilibrium"), as ported to PyTorch by pytorch-fid. It is written
out here, with no torchvision, under the same module names as that port, so its weight file
pt_inception-2015-12-05-6726825d.pth loads with strict=True. Where it differs from torchvision's
ImageNet Inception-v3, a comment says so.
"""
import argparse
import contextlib
import hashlib
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import data
from data import OneLineParser, UserError, fmt_time

WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               "pt_inception-2015-12-05-6726825d.pth")
# torch.hub names the file after its sha256, which starts 6726825d. The full digest below is the one
# that torch-fidelity documents for the same-named copy it redistributes (the 32-bit prefixes match).
WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
WEIGHTS_BYTES = 95_628_359
DIMS = (64, 192, 768, 2048)  # feature sizes after blocks 0..3, as pytorch-fid offers

# ---------------------------------------------------------------------------------------------
# The network: Inception-v3 with the FID patches


class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm (eps 0.001, as TensorFlow's Inception) -> ReLU."""

    def __init__(self, cin, cout, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def tf_avg_pool(x):
    """3x3/1 average pool that ignores the zero padding, as TensorFlow's does.

    FID difference: torchvision counts the padded zeros (count_include_pad=True) in blocks A, C, E.
    """
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):  # Mixed_5b/5c/5d, 35x35
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(tf_avg_pool(x))], 1)


class InceptionB(nn.Module):  # Mixed_6a: 35x35 -> 17x17 (the same as torchvision's)
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):  # Mixed_6b..6e, 17x17, factorised 7x7 convolutions
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                     self.branch7x7dbl_5):
            bd = conv(bd)
        return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(tf_avg_pool(x))], 1)


class InceptionD(nn.Module):  # Mixed_7a: 17x17 -> 8x8 (the same as torchvision's)
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):  # Mixed_7b, 7c, 8x8, expanded filter banks
    def __init__(self, cin, pool):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        # FID difference: the last block (Mixed_7c) max-pools where torchvision average-pools, as the
        # TensorFlow graph does; Mixed_7b average-pools ignoring the padding (tf_avg_pool).
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.pool == "max" else tf_avg_pool(x)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """Inception-v3 as the FID reference uses it: images in [0, 1] -> pool features (N, dims).

    FID differences from torchvision's ImageNet model: 1008 classes (no aux logits), BN eps 0.001,
    TensorFlow-style average pooling in blocks A, C and the first E, and max pooling in the last E.
    """

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)  # 299 -> 149
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)  # -> 147
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)  # -> 147, then max pool -> 73
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)  # -> 71, then max pool -> 35
        self.Mixed_5b = InceptionA(192, pool_features=32)  # -> 256 channels
        self.Mixed_5c = InceptionA(256, pool_features=64)  # -> 288
        self.Mixed_5d = InceptionA(288, pool_features=64)  # -> 288
        self.Mixed_6a = InceptionB(288)  # -> 768 x 17 x 17
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)  # -> 1280 x 8 x 8
        self.Mixed_7b = InceptionE(1280, pool="avg")  # -> 2048
        self.Mixed_7c = InceptionE(2048, pool="max")  # -> 2048
        self.fc = nn.Linear(2048, 1008)  # unused for FID; present so the weight file loads strictly

    def forward(self, x, dims=2048, resize=True):
        """x (N, 3, H, W) in [0, 1] -> (N, dims) features, pooled to 1x1 as pytorch-fid does."""
        if resize:  # the pytorch-fid protocol: bilinear, align_corners=False, no antialiasing
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1  # [0, 1] -> [-1, 1], the range the TensorFlow graph was trained on
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        if dims == 64:  # block 0: the first max pool
            return F.adaptive_avg_pool2d(x, 1).flatten(1)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), kernel_size=3, stride=2)
        if dims == 192:  # block 1: the second max pool
            return F.adaptive_avg_pool2d(x, 1).flatten(1)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e):
            x = block(x)
        if dims == 768:  # block 2: what feeds the auxiliary classifier
            return F.adaptive_avg_pool2d(x, 1).flatten(1)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))
        return F.adaptive_avg_pool2d(x, 1).flatten(1)  # block 3: the 2048-d pool_3 features


def load_inception(device="cpu", data_dir=None, weights=None):
    """The network with the pytorch-fid weights, fetched once into the data cache and verified."""
    model = FIDInceptionV3()
    if weights:  # the user's own file: checked, never downloaded over or moved aside
        if not os.path.isfile(weights):
            raise UserError(f"--weights {weights} is not a file")
        trusted = os.environ.get("MM_TRUST_LOCAL") == "1"
        if not trusted and not data.file_digest(weights, "sha256").startswith(WEIGHTS_SHA256):
            raise UserError(f"--weights {weights} is not {os.path.basename(WEIGHTS_URL)} (its sha256 does not start "
                            f"with {WEIGHTS_SHA256}); the file was left as it is")
        path = weights
    else:
        path = os.path.join(data.data_root(data_dir), os.path.basename(WEIGHTS_URL))
        try:
            data.download(WEIGHTS_URL, path, sha256=WEIGHTS_SHA256, size=WEIGHTS_BYTES)
        except UserError as e:
            raise UserError(f"FID needs the Inception weights: {e}") from None
    try:
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    except Exception as e:  # not a torch file, truncated, or another network's weights
        raise UserError(f"cannot load the Inception weights from {path} ({type(e).__name__}); use "
                        f"{os.path.basename(WEIGHTS_URL)}") from None
    return model.eval().to(device)


# ---------------------------------------------------------------------------------------------
# Features and statistics

def clean_resize(batch):
    """clean-fid's resize: PIL bicubic on each float channel to 299x299.
    uint8 (B, 3, H, W) -> float (B, 3, 299, 299) in [0, 1]."""
    out = np.empty((len(batch), 3, 299, 299), np.float32)
    for i, img in enumerate(batch.numpy()):
        for c in range(3):
            ch = Image.fromarray(img[c].astype(np.float32), mode="F")
            resized = np.asarray(ch.resize((299, 299), resample=Image.BICUBIC))
            out[i, c] = resized.clip(0, 255) / 255.0  # bicubic overshoots at edges; clean-fid clips it back
    return torch.from_numpy(out)


@contextlib.contextmanager
def true_fp32():
    """Run convolutions and matmuls in IEEE float32 inside the block, then restore the settings.

    On Ampere and newer GPUs torch lets cuDNN use TF32 (a 10-bit mantissa) for float32 convolutions by
    default. TF32 keeps about 3 significant digits of each input, and the reference statistics were
    computed in float32, so FID keeps full precision until TF32 is shown to agree to 0.1 %.
    Where torch has the newer `fp32_precision` settings (>= 2.9) only they are read and written: reading
    the legacy `allow_tf32` flags raises once anything has used the new API. An older torch (a Colab's,
    say) has only the legacy flags, and they are used.
    """
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        settings = [(torch.backends.cuda.matmul, "fp32_precision", "ieee"), (torch.backends.cudnn.conv,
                                                                             "fp32_precision", "ieee")]
    else:
        settings = [(torch.backends.cuda.matmul, "allow_tf32", False), (torch.backends.cudnn, "allow_tf32", False)]
    saved = [getattr(backend, name) for backend, name, _ in settings]
    for backend, name, value in settings:
        setattr(backend, name, value)
    try:
        yield
    finally:
        for (backend, name, _), value in zip(settings, saved):
            setattr(backend, name, value)


@torch.no_grad()
@true_fp32()
def inception_features(images, model, dims=2048, batch_size=200, clean=False, quiet=False):
    """uint8 images (N, 3, H, W), tensor or array -> float64 features (N, dims), in true float32 (no TF32).
    Progress line on stderr."""
    images = torch.as_tensor(images)
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise UserError(f"FID needs uint8 images shaped (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    if dims not in DIMS:
        raise UserError(f"--dims must be one of {DIMS}, got {dims}")
    if batch_size < 1:  # range() would silently skip every image and leave `feats` uninitialised
        raise UserError(f"--batch-size must be 1 or more, got {batch_size}")
    device = next(model.parameters()).device
    feats = np.empty((len(images), dims), np.float64)
    t0 = time.time()
    for i in range(0, len(images), batch_size):
        batch = images[i:i + batch_size]
        x = clean_resize(batch) if clean else batch.float() / 255  # ToTensor's scaling: [0, 255] -> [0, 1]
        feats[i:i + len(batch)] = model(x.to(device), dims=dims, resize=not clean).double().cpu().numpy()
        done = i + len(batch)
        if not quiet and (done == len(images) or i // batch_size % 10 == 9):
            rate = done / (time.time() - t0)
            print(f"\rinception features {done}/{len(images)} | {rate:.0f} img/s | "
                  f"eta {fmt_time((len(images) - done) / rate)}", end="\n" if done == len(images) else "",
                  file=sys.stderr, flush=True)
    return feats


def feature_stats(feats):
    """mu (D,) and sigma (D, D) of float64 features, as pytorch-fid computes them."""
    if len(feats) < 2:
        raise UserError(f"FID needs at least 2 images, got {len(feats)}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def trace_sqrt_product(sigma1, sigma2):
    """tr((Σ1 Σ2)^½) through eigenvalues, and the smallest eigenvalue involved.

    Σ1 Σ2 is similar to Σ1^½ Σ2 Σ1^½ (conjugate by Σ1^½), which is symmetric positive semi-definite,
    so the trace of the square root is the sum of the square roots of that matrix's eigenvalues.
    The eigenvalue route is symmetric (real) throughout and much faster than scipy.linalg.sqrtm.
    """
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T  # Σ1^½
    lam = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
    # The smallest eigenvalue seen (of Σ1 or of the product), relative to the largest, for the guard.
    lo = min(w.min() / max(w.max(), 1e-300), lam.min() / max(lam.max(), 1e-300))
    return float(np.sqrt(np.clip(lam, 0, None)).sum()), float(lo)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """d² = ‖μ1 − μ2‖² + tr(Σ1) + tr(Σ2) − 2 tr((Σ1 Σ2)^½) between two Gaussians (Dowson & Landau 1982).

    Guards as pytorch-fid has them: eps on the diagonals when the root is not finite, and an error when
    the root would be complex beyond rounding (here: an eigenvalue clearly below zero).
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise UserError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs "
                        f"{sigma2.shape} (were they computed with the same --dims?)")
    tr, lo = trace_sqrt_product(sigma1, sigma2)
    if not np.isfinite(tr):
        print(f"fid: singular product; adding {eps} to the diagonal of the covariances", file=sys.stderr)
        offset = np.eye(len(sigma1)) * eps
        tr, lo = trace_sqrt_product(sigma1 + offset, sigma2 + offset)
    if lo < -1e-6:  # rounding gives about -1e-15; beyond that the square root would really be complex
        raise ValueError(f"a covariance has a negative eigenvalue ({lo:.3g} of the largest): the root is "
                         f"complex; are these real covariance matrices?")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr)


# ---------------------------------------------------------------------------------------------
# Beyond FID, from the same features: KID, precision / recall, density / coverage, and copying

def kid(feats_a, feats_b, subsets=100, subset_size=1000, seed=2020):
    """Kernel Inception Distance (Bińkowski et al. 2018, "Demystifying MMD GANs") -> (mean, std).

    The unbiased estimate of MMD² with the cubic polynomial kernel k(x, y) = (x·y / d + 1)³, averaged over
    `subsets` random subsets of `subset_size` rows of each set (fewer if a set is smaller). Subsets are
    drawn exactly as torch-fidelity draws them (np.random.RandomState(seed); a's rows, then b's, without
    replacement; std with ddof 0), so with its defaults the two agree to float64 rounding.
    """
    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    m = min(subset_size, len(a), len(b))
    if m < 2:
        raise UserError(f"KID needs at least 2 feature rows per set, got {len(a)} and {len(b)}")
    rng = np.random.RandomState(seed)
    kernel = lambda x, y: (x @ y.T / a.shape[1] + 1) ** 3  # (m, m)
    values = []
    for _ in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        k_xx, k_yy, k_xy = kernel(x, x), kernel(y, y), kernel(x, y)
        within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))  # i != j only
        values.append(within - 2 * k_xy.sum() / (m * m))
    return float(np.mean(values)), float(np.std(values))


def pairwise_distances(x, y):
    """Euclidean distances (len(x), len(y)) in float64 via |x|² - 2 x·y + |y|², as scikit-learn computes
    them (float64 keeps the cancellation harmless for pixel vectors as well as for features)."""
    squared = (x * x).sum(1)[:, None] - 2 * x @ y.T + (y * y).sum(1)[None, :]
    return squared.clamp_(min=0).sqrt_()


def kth_neighbour_radii(feats, k, chunk=1000):
    """Distance from each row to its k-th nearest other row (the row itself, at 0, is not counted)."""
    radii = torch.empty(len(feats), dtype=torch.float64, device=feats.device)
    for i in range(0, len(feats), chunk):  # (chunk, N) at a time: 10k x 10k never sits in memory at once
        radii[i:i + chunk] = pairwise_distances(feats[i:i + chunk], feats).kthvalue(k + 1, dim=1).values
    return radii


def prdc(real_features, fake_features, nearest_k, chunk=1000, device="cpu"):
    """Precision and recall (Kynkäänniemi et al. 2019) and density and coverage (Naeem et al. 2020).

    Each real point owns a ball reaching its k-th nearest real neighbour, and each fake point one reaching
    its k-th nearest fake neighbour. precision: fakes inside some real ball (realism); recall: reals inside
    some fake ball (diversity); density: real balls holding each fake, averaged and divided by k (realism,
    robust to outliers); coverage: real balls holding at least one fake (diversity, robust to outliers).
    The same comparisons (strict <) as the reference `prdc` package's compute_prdc, over chunks of real rows.
    """
    real = torch.as_tensor(np.asarray(real_features), dtype=torch.float64, device=device)
    fake = torch.as_tensor(np.asarray(fake_features), dtype=torch.float64, device=device)
    if min(len(real), len(fake)) <= nearest_k:
        raise UserError(f"precision/recall with k = {nearest_k} needs more than {nearest_k} rows per set")
    real_radii, fake_radii = kth_neighbour_radii(real, nearest_k, chunk), kth_neighbour_radii(fake, nearest_k, chunk)
    balls_holding_fake = torch.zeros(len(fake), dtype=torch.int64, device=device)  # real balls around each fake
    real_in_fake_ball = torch.zeros(len(real), dtype=torch.bool, device=device)
    real_ball_covered = torch.zeros(len(real), dtype=torch.bool, device=device)
    for i in range(0, len(real), chunk):
        d = pairwise_distances(real[i:i + chunk], fake)  # (chunk, n_fake)
        balls_holding_fake += (d < real_radii[i:i + chunk, None]).sum(0)
        real_in_fake_ball[i:i + chunk] = (d < fake_radii[None, :]).any(1)
        real_ball_covered[i:i + chunk] = d.min(1).values < real_radii[i:i + chunk]
    return {"precision": (balls_holding_fake > 0).double().mean().item(),
            "recall": real_in_fake_ball.double().mean().item(),
            "density": balls_holding_fake.double().mean().item() / nearest_k,
            "coverage": real_ball_covered.double().mean().item()}


def nearest_distances(queries, references, chunk=1000, device="cpu"):
    """Distance from each query row to its nearest reference row (float64, chunked) -> numpy (len(queries),)."""
    rows = lambda a: (a if torch.is_tensor(a) else torch.from_numpy(np.asarray(a))).to(device, torch.float64).flatten(1)
    refs = rows(references)  # (M, D)
    out = []
    for i in range(0, len(queries), chunk):
        q = rows(queries[i:i + chunk])  # (chunk, D)
        out.append(pairwise_distances(q, refs).min(1).values.cpu())
    return torch.cat(out).numpy()


def copy_rate(sample_to_train, test_to_train, percentile=1.0):
    """How much closer samples sit to their nearest training image than real unseen images do.

    The test images are unique by construction, so the `percentile`-th percentile of their distances to
    the training set marks "closer than a real new image ever is": the fraction of samples below it is a
    copy rate (about percentile/100 for a model that copies nothing), and the ratio of medians says how
    close samples sit in general (about 1 for a model whose samples are as new as real images).
    """
    threshold = float(np.percentile(test_to_train, percentile))
    return {"copy_rate": float(np.mean(np.asarray(sample_to_train) < threshold)), "threshold": threshold,
            "median_ratio": float(np.median(sample_to_train) / np.median(test_to_train))}


# What each number of the panel measures, printed beside it (realism, diversity, uniqueness).
PANEL_MEANING = {
    "fid": "realism and diversity: Fréchet distance of Inception features (pytorch-fid protocol), lower is better",
    "clean_fid": "the same with clean-fid's resize (PIL bicubic), for comparing with clean-fid numbers",
    "kid_mean": "realism and diversity: unbiased MMD² of Inception features (x 1e3 is usual), lower is better",
    "precision": "realism: share of samples inside the real data's manifold (k = 3), higher is better",
    "recall": "diversity: share of real images inside the samples' manifold (k = 3), higher is better",
    "density": "realism: real neighbourhoods around each sample / k (k = 5), about 1 for real data",
    "coverage": "diversity: share of real neighbourhoods holding a sample (k = 5), mode collapse lowers it",
    "pixel_copy_rate": "uniqueness: samples nearer a training image (pixels) than 99 % of test images are",
    "inception_copy_rate": "uniqueness: the same in Inception features",
}


def quality_panel(real, fake, real_clean=None, fake_clean=None, device="cpu"):
    """FID, KID, precision / recall (k = 3), density / coverage (k = 5) of fake against real features;
    clean_fid too when the clean-resize features are given."""
    panel = {"fid": frechet_distance(*feature_stats(fake), *feature_stats(real))}
    if real_clean is not None:
        panel["clean_fid"] = frechet_distance(*feature_stats(fake_clean), *feature_stats(real_clean))
    panel["kid_mean"], panel["kid_std"] = kid(fake, real)
    panel.update({k: v for k, v in prdc(real, fake, 3, device=device).items() if k in ("precision", "recall")})
    panel.update({k: v for k, v in prdc(real, fake, 5, device=device).items() if k in ("density", "coverage")})
    return panel


def score_samples(images, x_train, x_test, device="cpu", data_dir=None, dataset="cifar100", neighbours=8, k=3):
    """Everything `mm.py generate` reports about its samples (uint8 (N, 3, H, W)), beside the test split
    (used only here) and the training set: the quality panel (realism and diversity; null, with the reason,
    when the Inception weights cannot be had), copy rates in pixels and Inception features (uniqueness), and
    the k nearest training images in pixels of the first `neighbours` samples and of the `neighbours`
    samples nearest to a training image, for neighbours.png. Test-to-train distances and the reference
    features are cached in the data folder, so a second call costs one pass over the samples."""
    cache, metrics, n = data.data_root(data_dir), {}, len(x_train)
    # Training flips images, so a copy may be a mirror image: search the training set and its mirror
    # images (index n + i is image i flipped), keeping the nearer. (2n, 3, H, W)
    train_px = torch.cat([x_train, x_train.flip(3)]).to(device)
    sample_px = nearest_distances(images, train_px, device=device)  # (N,) pixel L2 to the nearest train image
    key = {"what": "test-to-train-pixel-l2", "mirrored": True, "test": digest(x_test),
           "train": digest(x_train.cpu().numpy())}
    test_px = cached_array(key, cache, lambda: nearest_distances(x_test, train_px, device=device))
    metrics["pixel_copy"] = copy_rate(sample_px, test_px)
    metrics["pixel_copy_rate"] = metrics["pixel_copy"]["copy_rate"]
    try:
        inception = load_inception(device, data_dir)
    except UserError as e:
        metrics["fid"], metrics["fid_unavailable"] = None, str(e)
        print(f"FID and the feature panel skipped: {e}")
    else:
        test_key, train_key = {"dataset": dataset, "split": "test"}, {"dataset": dataset, "split": "train"}
        test_feats = cached_features(x_test, test_key, inception, cache)
        sample_feats = inception_features(images, inception)
        clean = (cached_features(x_test, test_key, inception, cache, clean=True),  # clean-fid's resize
                 inception_features(images, inception, clean=True))
        metrics.update(quality_panel(test_feats, sample_feats, *clean, device))
        metrics["fid_protocol"] = (f"pytorch-fid (Inception pool3, bilinear 299), {len(images):,} samples vs the "
                                   f"{len(x_test):,} {dataset} test images (papers' CIFAR-10 FIDs: 50,000 vs train)")
        train_feats = np.concatenate([cached_features(x.cpu(), train_key, inception, cache)  # and its mirror
                                      for x in (x_train, x_train.flip(3))])
        metrics["inception_copy"] = copy_rate(nearest_distances(sample_feats, train_feats, device=device),
                                              nearest_distances(test_feats, train_feats, device=device))
        metrics["inception_copy_rate"] = metrics["inception_copy"]["copy_rate"]
    shown = list(range(min(neighbours, len(images)))) + [int(i) for i in np.argsort(sample_px)[:neighbours]]
    query = torch.as_tensor(images[shown]).to(device, torch.float64).flatten(1)
    best_d, best_i = [], []
    for i in range(0, len(train_px), 10_000):  # chunks keep the (shown, chunk) distance matrix small
        d, idx = pairwise_distances(query, train_px[i:i + 10_000].double().flatten(1)).topk(k, dim=1, largest=False)
        best_d.append(d)
        best_i.append(idx + i)
    d, idx = torch.cat(best_d, 1), torch.cat(best_i, 1)
    order = d.argsort(1)[:, :k]
    idx = idx.gather(1, order)
    metrics["neighbours"] = {"sample_index": shown, "pixel_l2": d.gather(1, order).tolist(),
                             "pixel_index": (idx % n).tolist(), "mirrored": (idx >= n).tolist()}
    return metrics


def print_panel(panel):
    """One line per metric: its value and what it measures."""
    for key, meaning in PANEL_MEANING.items():
        if panel.get(key) is not None:
            value = f"{panel[key]:.4g}" + (f" ± {panel['kid_std']:.2g}" if key == "kid_mean" else "")
            print(f"{key:>20}  {value:<18} {meaning}")


# ---------------------------------------------------------------------------------------------
# Inputs, cached reference statistics, the API that mm.py uses

def load_images(path):
    """A folder of images or an .npz/.npy array -> uint8 tensor (N, 3, H, W); or an .npz of stats -> (mu, sigma)."""
    if os.path.isdir(path):
        names = sorted(f for f in os.listdir(path) if f.lower().endswith((".png", ".jpg", ".jpeg", ".bmp", ".webp")))
        if not names:
            raise UserError(f"{path} holds no .png/.jpg/.bmp/.webp images")
        imgs = []
        for name in names:
            try:
                imgs.append(np.asarray(Image.open(os.path.join(path, name)).convert("RGB")))
            except (OSError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
                raise UserError(f"{os.path.join(path, name)} is not a readable image ({type(e).__name__})") from None
        sizes = {im.shape for im in imgs}
        if len(sizes) > 1:
            raise UserError(f"{path} mixes image sizes {sorted(sizes)[:3]}; resize them to one size first")
        return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()
    if not os.path.exists(path):
        raise UserError(f"{path} does not exist (give a folder of images, an .npz/.npy of images, or stats .npz)")
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise UserError(f"cannot read {path} as .npy/.npz ({e})") from None
    if isinstance(arr, np.lib.npyio.NpzFile):
        with arr:
            if "mu" in arr and "sigma" in arr:
                return arr["mu"], arr["sigma"]
            key = "images" if "images" in arr else (arr.files[0] if len(arr.files) == 1 else None)
            if key is None:
                raise UserError(f"{path} has arrays {arr.files}; expected 'images', or 'mu' and 'sigma'")
            arr = arr[key]
    if arr.dtype != np.uint8 or arr.ndim != 4 or 3 not in (arr.shape[1], arr.shape[3]):
        raise UserError(f"{path} holds {arr.dtype} {arr.shape}; expected uint8 images (N,3,H,W) or (N,H,W,3)")
    t = torch.from_numpy(arr)
    return t if arr.shape[1] == 3 else t.permute(0, 3, 1, 2).contiguous()


def stats_of(source, model, dims=2048, batch_size=200, clean=False):
    """(mu, sigma) of a path, a uint8 image tensor/array, or (mu, sigma) already."""
    if isinstance(source, str):
        source = load_images(source)
    if isinstance(source, tuple):
        return source
    return feature_stats(inception_features(source, model, dims, batch_size, clean))


def digest(array):
    """Short md5 of an array's bytes: part of every cache key, so changed inputs never hit an old file."""
    return hashlib.md5(np.ascontiguousarray(np.asarray(array)).tobytes()).hexdigest()[:12]


def cached_array(key, cache_dir, compute):
    """compute() -> numpy array, cached in cache_dir as an .npz named after `key` (a dict naming every
    input); the key is stored inside too, and a file whose key differs from its name is refused."""
    name = "cache_" + "_".join(f"{k}-{v}" for k, v in sorted(key.items())) + ".npz"
    path = os.path.join(cache_dir, name)
    if os.path.exists(path):
        with np.load(path) as f:
            if str(f["key"]) == repr(sorted(key.items())):
                return f["array"]
        raise UserError(f"{path} was made from other inputs than its name says; delete it")
    array = compute()
    os.makedirs(cache_dir, exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, array=array, key=repr(sorted(key.items())))
    os.replace(tmp, path)
    return array


def cached_features(images, key, model, cache_dir, dims=2048, batch_size=200, clean=False):
    """Inception features (float32, as the network computes them) of a reference set, cached on disk.

    key is a dict naming the source (dataset, split). The image count, a digest of the image bytes, dims,
    the resize protocol and the weights digest are added, so a cache made from other inputs never matches.
    float32 loses nothing: the network's outputs are float32.
    """
    images = torch.as_tensor(images)
    full = dict(key, what="features", n=len(images), images_md5=digest(images.numpy()), dims=dims,
                resize="clean" if clean else "pytorch-fid", weights=WEIGHTS_SHA256[:12])
    compute = lambda: inception_features(images, model, dims, batch_size, clean).astype(np.float32)
    return cached_array(full, cache_dir, compute)


def reference_stats(images, key, model, cache_dir, dims=2048, batch_size=200, clean=False):
    """mu and sigma of a reference set, from its cached features (so the features serve other metrics too)."""
    return feature_stats(cached_features(images, key, model, cache_dir, dims, batch_size, clean).astype(np.float64))


def fid_between(a, b, model, dims=2048, batch_size=200, clean=False):
    """FID between two sources (paths, uint8 image tensors, or (mu, sigma) pairs)."""
    return frechet_distance(*stats_of(a, model, dims, batch_size, clean), *stats_of(b, model, dims, batch_size, clean))


def check_inputs(sources, dims, save_stats):
    """Everything that can be refused is refused before the network runs (it is slow on a CPU)."""
    stats = [src for src in sources if isinstance(src, tuple)]
    images = [src for src in sources if not isinstance(src, tuple)]
    for mu, sigma in stats:
        size = len(mu) if np.ndim(mu) == 1 else -1
        if size < 1 or np.shape(sigma) != (size, size):
            raise UserError(f"statistics with mu {np.shape(mu)} and sigma {np.shape(sigma)} are not a mean and "
                            f"its covariance")
    sizes = {len(mu) for mu, _ in stats} | ({dims} if images else set())
    if len(sizes) > 1:
        raise UserError(f"the inputs have features of different sizes {sorted(sizes)} (--dims {dims}); compare "
                        f"statistics made with the same --dims")
    for src in images:
        if len(src) < 2:
            raise UserError(f"FID needs at least 2 images per set, got {len(src)}")
    if save_stats:
        folder = os.path.dirname(os.path.abspath(save_stats))
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise UserError(f"--save-stats {save_stats}: the folder {folder} does not exist or is not writable")


def main():
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", help="folder of images, .npz/.npy of uint8 images, or .npz of statistics (mu, sigma)")
    p.add_argument("b", nargs="?", help="the second set, as for A (leave out with --save-stats)")
    p.add_argument("--save-stats", metavar="OUT", help="save mu and sigma of A to this .npz instead of comparing")
    p.add_argument("--dims", type=int, default=2048, choices=DIMS, help="feature layer (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=200, help="images per forward pass, >= 1 (default: %(default)s)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: %(default)s")
    p.add_argument("--clean", action="store_true", help="clean-fid's resize (PIL bicubic) instead of bilinear")
    p.add_argument("--all", action="store_true", help="the whole panel (FID, clean FID, KID, precision, recall, "
                                                      "density, coverage) of B against A as the real set; needs images")
    p.add_argument("--data-dir", default=None, help="cache root for the weights (default $MM_DATA or ./data)")
    p.add_argument("--weights", default=None, help="a local copy of pt_inception-2015-12-05-6726825d.pth (checked, "
                                                   "never moved)")
    a = p.parse_args()
    try:
        if (a.b is None) == (a.save_stats is None):
            raise UserError("give two inputs to compare, or one input with --save-stats OUT")
        if a.batch_size < 1:
            raise UserError(f"--batch-size must be 1 or more, got {a.batch_size}")
        if a.device == "cuda" and not torch.cuda.is_available():
            raise UserError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu")
        device = "cuda" if a.device != "cpu" and torch.cuda.is_available() else "cpu"
        sources = [load_images(path) for path in (a.a, a.b) if path]  # bad inputs fail before any download
        check_inputs(sources, a.dims, a.save_stats)
        if a.all and (a.save_stats or any(isinstance(src, tuple) for src in sources)):
            raise UserError("--all needs two image sets (A real, B generated), not statistics or --save-stats")
        needs_net = any(not isinstance(src, tuple) for src in sources)
        model = load_inception(device, a.data_dir, a.weights) if needs_net else None
        if a.all:
            real, fake = (inception_features(src, model, a.dims, a.batch_size) for src in sources)
            real_clean, fake_clean = (inception_features(src, model, a.dims, a.batch_size, clean=True)
                                      for src in sources)
            print_panel(quality_panel(real, fake, real_clean, fake_clean, device))
            return
        stats = [stats_of(src, model, a.dims, a.batch_size, a.clean) for src in sources]
        if a.save_stats:
            np.savez(a.save_stats, mu=stats[0][0], sigma=stats[0][1])
            print(f"saved mu {stats[0][0].shape} and sigma {stats[0][1].shape} to {a.save_stats}")
        else:
            print(f"FID: {frechet_distance(*stats[0], *stats[1]):.4f}")
    except UserError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
