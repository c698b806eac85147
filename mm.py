"""Minimal Mastery: small-budget vision in one readable module.

    pip install -r requirements.txt
    python mm.py classify              # AddNIST classifier: < 100,000 parameters, <= 10,000 steps
    python mm.py classify --runs 5     # five seeds, then a mean ± std table
    python mm.py generate              # CIFAR-100 diffusion: < 1,000,000 params, <= 50,000 steps
    python mm.py gradflow --compare    # depth study: why VGG_38 fails, and the BN / residual fixes
    python mm.py report --classify runs/classify --generate runs/generate --gradflow runs/gradflow
    python mm.py bench                 # ms per training step, sampler and Inception img/s here
    python mm.py COMMAND --help        # every knob of a command, with its default

Reading order: budgets -> classifier -> diffusion (EDM) -> depth study, each opening with its config ->
the run plumbing the three loops share -> figures -> report -> bench -> command line.
"""
import argparse, contextlib, copy, csv, functools, glob, inspect, json, math, os, re, signal, sys, time
from collections import OrderedDict, namedtuple
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

import data
import fid
from data import OneLineParser, UserError, fmt_time

# ---------------------------------------------------------------------------------------------
# Budgets (the coursework rules) and the fields the three training commands share

CLASSIFY_PARAM_LIMIT = 100_000  # classifier: fewer than this many parameters (coursework rule)
CLASSIFY_STEP_LIMIT = 10_000  # classifier: at most this many optimisation steps (coursework rule)
GENERATE_PARAM_LIMIT = 1_000_000  # generator: fewer trained parameters than this (coursework rule)
GENERATE_STEP_LIMIT = 50_000  # generator: at most this many optimisation steps (coursework rule)

@dataclass
class RunConfig:  # the fields the three training commands share
    data_dir: str = ""  # dataset cache root (empty: $MM_DATA, else ./data)
    seed: int = 0  # seed of the first run: batches, augmentation, noise, samples (--sample-only: the samples')
    log_every: int = 100  # steps between progress lines
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 on Ampere+ GPUs, fp16 on older ones, fp32 on CPU) | fp32 | bf16 | fp16
    deterministic: bool = True  # GPU: deterministic kernels, seeded runs repeat (--no-deterministic: faster)
    resume: bool = False  # continue the run(s) in --out, or start them if it holds none (without: --out holds none)
    pause_at: int = 0  # stop, checkpointed, after this many steps; 0 = run to the end

# ---------------------------------------------------------------------------------------------
# Classifier: one digit CNN shared by the three channels; the sum's distribution, their convolution

@dataclass
class ClassifyConfig(RunConfig):
    out: str = "runs/classify"  # results: config.json, metrics.json, accuracy.png, run*/ckpt.pt
    steps: int = 10_000  # optimisation steps per run (budget: at most 10,000)
    allow_penalty: bool = False  # train over a budget anyway and print the coursework penalty
    arch: str = "32,M,48,M,64,96"  # digit CNN: 3x3 conv/BN/ReLU widths, M = 2x2 max pool
    batch_size: int = 128  # AddNIST images per step (3 digits each)
    lr: float = 2e-3  # peak AdamW learning rate
    weight_decay: float = 5e-2  # AdamW decoupled weight decay on conv/linear weights
    warmup_steps: int = 300  # steps of linear warm-up, then cosine decay to 0
    ema_decay: float = 0.999  # per-step decay of the evaluated weight average (warm-up: ema_decay()); 0 = off
    label_smoothing: float = 0.05  # training loss only; reported losses are plain cross-entropy
    train_on: str = "train+valid"  # train+valid (60,000 images) | train (45,000); never test
    shift: int = 2  # max translation per digit, whole pixels (kept all run)
    rotate: float = 10.0  # max rotation per digit, degrees (fades to 0, as zoom and elastic do)
    zoom: float = 0.1  # max relative zoom in or out
    elastic: float = 1.5  # std of a smooth random displacement field, pixels (0 = off)
    runs: int = 1  # independent runs with seeds seed, seed+1, ...
    eval_every: int = 500  # steps between evaluations (train subset + full test set)
    eval_train: int = 10_000  # train images scored at each periodic evaluation (all at the end)
    tta: bool = True  # final figures average the image and its 4 one-pixel shifts (no steps)

class DigitSumNet(nn.Module):
    """One digit network shared by the three channels; log P(sum) over the 20 AddNIST classes."""
    def __init__(self, arch):
        super().__init__()
        self.digit = conv_trunk(arch)
        self.register_buffer("sum_mask", SUM_MASK.clone(), persistent=False)  # moves with .to(), unsaved
    def forward(self, x):  # (B, 3, 28, 28) -> (B, 20)
        logits = self.digit(x.reshape(-1, 1, *x.shape[2:]))  # every digit through the same weights
        return sum_log_probs(logits.view(len(x), 3, 10), self.sum_mask)

def conv_trunk(arch):
    """'32,M,64' -> 3x3 conv/BN/ReLU layers (a number is the width) and 2x2 max pools (M), then
    global average pooling and a linear layer to the 10 digits.  (B, 1, 28, 28) -> (B, 10)"""
    layers, channels, side = [], 1, 28
    for token in arch.upper().replace(" ", "").split(","):
        if token == "M":
            layers.append(nn.MaxPool2d(2))
            side //= 2  # a 2x2 pool floors: 7 -> 3
        elif token.isdigit() and 0 < int(token) <= 4096:
            layers += [nn.Conv2d(channels, int(token), 3, padding=1, bias=False),
                       nn.BatchNorm2d(int(token)), nn.ReLU(inplace=True)]
            channels = int(token)
        else:
            raise UserError(f"--arch {arch}: {token!r} is no width 1..4096 nor M; e.g. 32,M,64,96")
        if side < 1:
            raise UserError(f"--arch {arch}: its pools shrink the 28x28 input below 1 pixel")
    return nn.Sequential(*layers, GlobalAvgPool(), nn.Flatten(), nn.Linear(channels, 10))

class GlobalAvgPool(nn.Module):
    """(B, C, H, W) -> (B, C, 1, 1), a mean over H and W: deterministic on CUDA, where PyTorch lists
    AdaptiveAvgPool2d's backward among the ops without a deterministic kernel."""
    def forward(self, x):
        return x.mean((2, 3), keepdim=True)

# SUM_MASK[k, i] = 0 where the digit triple i = (a, b, c), flattened, sums to k + 1, else -inf. (20, 1000)
TRIPLE_SUMS = (torch.arange(10)[:, None, None] + torch.arange(10)[:, None] + torch.arange(10)).flatten()
SUM_MASK = torch.where(TRIPLE_SUMS[None, :] == torch.arange(1, 21)[:, None], 0.0, -math.inf)

def sum_log_probs(digit_logits, mask=SUM_MASK):
    """log P(r + g + b = s), s = 1..20, from digit logits (B, 3, 10) -> (B, 20): independent digits, so
    P(s) = sum over a+b+c=s of p_r(a) p_g(b) p_b(c), a convolution, here in log space (logsumexp). The
    sums 0 and 21..27 are no class; cross-entropy over the 20 renormalises them away."""
    lp = digit_logits.float().log_softmax(-1)  # (B, 3, 10)
    joint = lp[:, 0, :, None, None] + lp[:, 1, None, :, None] + lp[:, 2, None, None, :]  # (B, 10³)
    return torch.logsumexp(joint.flatten(1)[:, None, :] + mask.to(joint.device), dim=-1)  # (B, 20)

def augment_digits(x, cfg, background, strength=1.0):
    """Random rotation, zoom, whole-pixel shift and elastic distortion of every digit (channel) on
    its own, in one batched grid_sample. (B, 3, H, W) -> same. The elastic field is the distortion
    Simard et al. (2003) found best on MNIST: smooth random displacements, here 5x5 noise upsampled.
    The empty canvas is `background` (data are normalised); `strength` scales all but the shifts."""
    B, C, H, W = x.shape
    n = B * C
    u = lambda: torch.rand(n, device=x.device) * 2 - 1  # uniform in [-1, 1], one per digit
    angle = u() * math.radians(cfg.rotate * strength)
    scale = 1 + u() * cfg.zoom * strength
    shift = lambda: torch.randint(-cfg.shift, cfg.shift + 1, (n,), device=x.device)  # whole pixels
    tx, ty = shift() * 2 / W, shift() * 2 / H  # pixels -> [-1, 1] grid units
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, (n, 1, H, W), align_corners=False)  # (n, H, W, 2): x, y in [-1, 1]
    if cfg.elastic > 0:
        field = torch.randn(n, 2, 5, 5, device=x.device) * (cfg.elastic * strength)  # shifts, px
        field = F.interpolate(field, size=(H, W), mode="bilinear", align_corners=True)  # (n,2,H,W)
        grid = grid + torch.stack([field[:, 0] * (2 / W), field[:, 1] * (2 / H)], -1)  # px -> grid
    out = F.grid_sample(x.reshape(n, 1, H, W) - background, grid, align_corners=False)  # 0 outside
    return out.view(B, C, H, W) + background

TTA_SHIFTS = ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1))  # (dy, dx) pixel shifts scored by --tta

@torch.no_grad()
def evaluate(model, x, y, tta=False, batch_size=1000):
    """Mean cross-entropy and accuracy of `model` in eval mode over (x, y), in float32 whatever the
    training precision. With tta, class probabilities are averaged over the image and its four one-pixel
    shifts; the edge a shift uncovers is background, so a digit touching the border never wraps round."""
    model.eval()
    fill = x.min().item() if tta else 0.0  # the normalised value of an empty pixel
    loss = torch.zeros((), dtype=torch.float64, device=x.device)
    correct = torch.zeros((), dtype=torch.int64, device=x.device)
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        H, W = xb.shape[2:]
        padded = F.pad(xb, (1, 1, 1, 1), value=fill)  # (dy, dx)[i, j] = xb[i - dy, j - dx]
        views = [padded[:, :, 1 - dy:H + 1 - dy, 1 - dx:W + 1 - dx] for dy, dx in TTA_SHIFTS] if tta else [xb]
        logp = torch.stack([model(v).float().log_softmax(1) for v in views])  # (views, B, classes)
        logp = torch.logsumexp(logp, 0) - math.log(len(views))  # log of the mean probability
        loss += F.nll_loss(logp, yb, reduction="sum").double()
        correct += (logp.argmax(1) == yb).sum()
    return loss.item() / len(x), correct.item() / len(x)

def ema_decay(limit, step):
    """(1 + step)/(10 + step), capped at `limit`: the average would otherwise remember the random
    initial weights, so its memory starts short (0.1 at step 0, 0.9 at step 80) and grows."""
    return min(limit, (1 + step) / (10 + step))

def train_classifier(cfg, seed, run_dir, train, scored, hw, train_id):
    """Train one seed; returns its result, or None when paused. `scored` ({"test": (x, y)}, plus "valid",
    the held-out split recipes are chosen on, with --train-on train) only ever goes to evaluate()."""
    (x_train, y_train), ckpt_path = train, os.path.join(run_dir, "ckpt.pt")
    torch.manual_seed(seed)
    # channels_last (NHWC) is the layout both oneDNN (CPU) and cuDNN (GPU) convolve fastest
    model = DigitSumNet(cfg.arch).to(hw.device, memory_format=torch.channels_last)
    ema = copy.deepcopy(model).requires_grad_(False)
    groups = [{"params": [p for p in model.parameters() if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in model.parameters() if p.ndim < 2], "weight_decay": 0.0}]  # BN: none
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.99), fused=hw.device.type == "cuda")
    scaler = grad_scaler(hw)
    objects = dict(model=model, ema=ema, opt=opt, scaler=scaler)  # what checkpoints save, resumes restore
    run = resume_from(ckpt_path, "classify", cfg, objects, train_id, step=0, seconds=0.0, result=None,
                      curves={k: [] for k in ("step", "train_loss", "train_acc", "test_loss", "test_acc")})
    if run["result"]:
        print(f"run seed {seed}: already finished in {ckpt_path}")
        return run["result"]
    start, curves, eval_model = run["step"], run["curves"], ema if cfg.ema_decay > 0 else model
    background = x_train.min().item()  # the normalised value of an empty pixel
    subset = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(seed))[:cfg.eval_train]
    subset = subset.to(hw.device)  # the same train images at every evaluation
    stop_at, t0 = stop_point(cfg.pause_at, start, cfg.steps), time.time()
    checkpoint = lambda step, result=None: save_checkpoint(ckpt_path, "classify", cfg, objects, step=step, seed=seed,
        curves=curves, result=result, data_id=train_id, seconds=run["seconds"] + time.time() - t0)
    log = Progress(start, cfg.steps, stop_at, "loss", "acc")
    for step in range(start, stop_at):
        seed_step(seed, step)
        lr = set_lr(opt, get_lr(step, cfg, cfg.warmup_steps))
        idx = batch_indices(step, len(x_train), cfg.batch_size, seed, hw.device)
        # rotation, zoom and elastic fall linearly to 0: varied digits early, a fitted reader late
        xb, yb = augment_digits(x_train[idx], cfg, background, 1 - step / cfg.steps), y_train[idx]
        model.train()
        with autocast(hw):
            out = model(xb)
        loss = F.cross_entropy(out.float(), yb, label_smoothing=cfg.label_smoothing)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        ema_update(ema, model, ema_decay(cfg.ema_decay, step))
        log.add(loss, (out.argmax(1) == yb).float().mean())
        done = step + 1
        if done % cfg.log_every == 0 or done == stop_at:
            log.line(done, lr=f"{lr:.1e}")
        if done % cfg.eval_every == 0 or done == cfg.steps:
            with log.aside():  # the evaluation's time is not a training step's
                scores = (*evaluate(eval_model, x_train[subset], y_train[subset]),
                          *evaluate(eval_model, *scored["test"]))
                for key, value in zip(curves, (done, *scores)):
                    curves[key].append(value)
                print(f"eval {done:5d}/{cfg.steps} | train loss {scores[0]:.4f} acc {scores[1]:.4f} | "
                      f"test loss {scores[2]:.4f} acc {scores[3]:.4f}", flush=True)
                checkpoint(done)
        stop_if_asked(done, checkpoint, ckpt_path, cfg)
    if stop_at < cfg.steps:
        checkpoint(stop_at)
        return paused(stop_at, cfg)
    result = dict(seed=seed, steps=stop_at, tta=cfg.tta, curves=curves)
    for split, (x, y) in {"train": (x_train, y_train), **scored}.items():  # every image
        result[f"{split}_loss"], result[f"{split}_acc"] = evaluate(eval_model, x, y, tta=cfg.tta)
    result["seconds"] = run["seconds"] + time.time() - t0
    checkpoint(stop_at, result)
    return result

def classify(cfg):
    """`python mm.py classify`: train cfg.runs seeds; a table, metrics.json and accuracy.png."""
    check_numbers(cfg, below={"ema_decay": 1, "label_smoothing": 1, "zoom": 1})
    n_params = count_params(DigitSumNet(cfg.arch))
    print(f"classify | digit CNN {cfg.arch}")
    enforce_budget("Number of parameters", n_params, CLASSIFY_PARAM_LIMIT, False, cfg.allow_penalty)
    enforce_budget("Number of optimisation steps", cfg.steps, CLASSIFY_STEP_LIMIT, True, cfg.allow_penalty)
    print(f"> Work per step: {cfg.batch_size} images ({3 * cfg.batch_size} digits); "
          f"{cfg.steps * cfg.batch_size:,} images seen per run, {cfg.runs} run(s)")
    run_dirs = [os.path.join(cfg.out, f"run{r}") for r in range(cfg.runs)]
    hw = pick_hardware(cfg, cfg.runs * cfg.steps * cfg.batch_size * CPU_SECONDS["classify"])
    load = lambda split: data.load_test("addnist", cfg.data_dir or None) if split == "test" else \
        data.load_split("addnist", split, cfg.data_dir or None)
    train = [np.concatenate(a) for a in zip(*map(load, cfg.train_on.split("+")))]
    train_id, train = data_id(*train), [torch.from_numpy(a).to(hw.device) for a in train]
    # With --train-on train the valid split is held out: recipes are chosen on it, test scored once
    held = ("valid", "test") if cfg.train_on == "train" else ("test",)
    scored = {split: [torch.from_numpy(a).to(hw.device) for a in load(split)] for split in held}
    print(f"AddNIST {cfg.train_on} {tuple(train[0].shape)}, test {tuple(scored['test'][0].shape)}")
    claim_folder(cfg, "classify", len(train[0]), {os.path.join(d, "ckpt.pt"): cfg for d in run_dirs})
    results = []
    for r, run_dir in enumerate(run_dirs):
        print(f"--- run {r + 1}/{cfg.runs} (seed {cfg.seed + r})")
        results.append(train_classifier(cfg, cfg.seed + r, run_dir, train, scored, hw, train_id))
        if results[-1] is None:  # paused
            return None
    metrics = {"command": "classify", "params": n_params, "steps": results[0]["steps"], "runs": len(results),
               "device": str(hw.device), "mixed_precision": hw.precision, "config": asdict(cfg)}
    for key in (f"{split}_{what}" for split in ("train", *held) for what in ("loss", "acc")):
        metrics[f"{key}_mean"], metrics[f"{key}_std"] = mean_std([r[key] for r in results])
    metrics["per_run"] = results
    rows = [{"seed": r["seed"], "steps": r["steps"], "train loss": f"{r['train_loss']:.4f}",
             **{f"{s} acc %": f"{100 * r[s + '_acc']:.2f}" for s in ("train", *held)}, "time": fmt_time(r["seconds"])}
            for r in results]
    print_table(rows + [{"seed": f"mean ± std (n={len(results)})", "steps": "", **classify_row(metrics), "time": ""}])
    save_json(os.path.join(cfg.out, "metrics.json"), metrics)
    plot_accuracy(os.path.join(cfg.out, "accuracy.png"), results)
    print(f"wrote {cfg.out}/config.json, metrics.json, accuracy.png, run*/ckpt.pt")
    return metrics

def classify_row(m):
    """The summary of a classify record as text, mean ± std over its runs: its table's last row and
    the report's row."""
    splits = [s for s in ("train", "valid", "test") if f"{s}_acc_mean" in m]
    return {"train loss": "{train_loss_mean:.4f} ± {train_loss_std:.4f}".format(**m),
            **{f"{s} acc %": percent((m[f"{s}_acc_mean"], m[f"{s}_acc_std"])) for s in splits}}

# ---------------------------------------------------------------------------------------------
# Diffusion: Karras et al. 2022, "Elucidating the design space of diffusion-based generative models"
#
# The noisy image is x + σ n. The network F is wrapped so that D(x; σ) = c_skip x + c_out F(c_in x;
# c_noise) has unit-variance inputs and targets at every σ (EDM, Table 1); training draws ln σ ~
# N(P_mean, P_std²); sampling integrates the probability-flow ODE with Heun's method (Algorithm 1).
# Class labels dropped at random give classifier-free guidance (Ho & Salimans 2022).

@dataclass
class GenerateConfig(RunConfig):
    out: str = "runs/generate"  # results: samples, interpolations, neighbours, metrics, checkpoint
    ckpt: str = ""  # checkpoint to load (empty: OUT/ckpt.pt)
    dataset: str = "cifar100"  # cifar100 | cifar10: what the model learns, and whose test split FID compares with
    steps: int = 50_000  # at most 50,000; each tenth a checkpoint and, from 2,000, progress_STEP.png
    allow_penalty: bool = False  # train over a budget anyway and print the coursework penalty
    sample_only: bool = False  # skip training: regenerate every output from --ckpt (or OUT/ckpt.pt)
    widths: str = "32,64,80"  # U-Net channels at 32, 16 and 8 px, multiples of 8 (997,123 params)
    blocks: int = 1  # residual blocks per level, down and up
    emb_dim: int = 128  # width of the noise-level + class embedding (a multiple of 4)
    dropout: float = 0.0  # dropout inside residual blocks
    batch_size: int = 256  # images per step
    noise_draws: int = 2  # noisy copies of each image per step, each with its own noise level (work x this)
    lr: float = 4e-3  # peak Adam learning rate
    warmup_fraction: float = 0.02  # linear warm-up over this fraction of --steps, then cosine decay to 0
    ema_length: float = 0.04  # σ_rel of the power-function EMA samples come from, a fraction of the run (0 = off)
    sigma_data: float = 0.5  # standard deviation of the data, for the preconditioning
    p_mean: float = -0.4  # mean of ln σ during training
    p_std: float = 1.4  # standard deviation of ln σ during training
    p_uncond: float = 0.1  # probability of dropping the label (trains the unconditional model too)
    flip: bool = True  # random horizontal flips of the training images (--no-flip where a mirror changes meaning)
    sampler_steps: int = 18  # Heun steps (NFE = 2 steps - 1, doubled when guidance != 1)
    guidance: float = 3.5  # classifier-free guidance scale w (1: unguided, half the sampler's work)
    fid_samples: int = 10_000  # samples drawn for FID and samples.npz (at least the grid's 64)
    sample_batch: int = 1000  # samples per sampler call

GRID_MIN_STEPS = 2_000  # progress grids only in runs this long: its 9 grids then cost ~10 % of a batch-64 run

def edm_scalings(sigma, sigma_data):
    """c_skip, c_out, c_in, c_noise of EDM Table 1.  sigma (B,) -> four (B,)"""
    c_skip = sigma_data ** 2 / (sigma ** 2 + sigma_data ** 2)  # how much of the noisy input to keep
    c_out = sigma * sigma_data / (sigma ** 2 + sigma_data ** 2).sqrt()  # scale of the correction
    c_in = 1 / (sigma ** 2 + sigma_data ** 2).sqrt()  # makes the network's input unit-variance
    return c_skip, c_out, c_in, sigma.log() / 4  # c_noise: the noise level as the network sees it

def edm_sigmas(n, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """Sampling noise levels σ_0 > ... > σ_{n-1}, then σ_n = 0 (EDM Eq. 5).  -> (n + 1,)"""
    ramp = torch.arange(n, dtype=torch.float64) / max(n - 1, 1)
    s = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)])

def group_norm(c):
    return nn.GroupNorm(min(8, c // 4), c)  # 8 groups, but at least 4 channels per group

def zero_init(layer):  # a residual branch that starts at zero leaves its block the identity
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer

class ResBlock(nn.Module):
    """GroupNorm, SiLU, conv, scale-and-shift by the embedding (Dhariwal & Nichol 2021), GroupNorm,
    SiLU, dropout, conv (zero-initialised, so every block starts as the identity); plus the input (a
    1x1 conv when the width changes)."""
    def __init__(self, cin, cout, emb_dim, dropout):
        super().__init__()
        self.norm1, self.conv1 = group_norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.film = nn.Linear(emb_dim, 2 * cout)  # (scale, shift) per channel
        self.norm2, self.drop = group_norm(cout), nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
    def forward(self, x, emb):  # x (B, cin, H, W), emb (B, emb_dim) -> (B, cout, H, W)
        scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(self.conv1(F.silu(self.norm1(x)))) * (1 + scale) + shift
        return self.conv2(self.drop(F.silu(h))) + self.skip(x)

class SelfAttention(nn.Module):
    """Multi-head self-attention over the pixels of a small map; residual, output zero at init."""
    def __init__(self, c, heads=4):
        super().__init__()
        self.norm, self.heads = group_norm(c), heads
        self.qkv, self.proj = nn.Conv2d(c, 3 * c, 1), zero_init(nn.Conv2d(c, c, 1))
    def forward(self, x):  # (B, C, H, W) -> same
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W)  # NHWC-safe
        q, k, v = qkv.transpose(3, 4).unbind(1)  # each (B, heads, HW, C/heads)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, HW, C/heads)
        return x + self.proj(out.transpose(2, 3).reshape(B, C, H, W))

class UNet(nn.Module):
    """D(x; σ, class) for 32x32 images: EDM preconditioning around a U-Net with levels at 32, 16, 8
    pixels, `blocks` residual blocks per level down and up (skips concatenated), self-attention in the
    middle and at the decoder's lowest level. Embedding: Fourier features of c_noise through an MLP,
    plus a learned class embedding (index n_classes is "no class", for classifier-free guidance)."""
    def __init__(self, widths, blocks, emb_dim, n_classes, dropout=0.0, sigma_data=0.5):
        super().__init__()
        self.sigma_data, self.n_classes = sigma_data, n_classes
        # Fixed random Fourier frequencies (Tancik et al. 2020) for c_noise = ln(σ)/4, about -2..1.5
        # in training: a std of 4 cycles per unit resolves noise levels a few percent apart.
        self.register_buffer("freqs", torch.randn(emb_dim // 4) * 4)
        self.noise_mlp = nn.Sequential(nn.Linear(emb_dim // 2, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_embed = nn.Embedding(n_classes + 1, emb_dim)
        self.stem, c = nn.Conv2d(3, widths[0], 3, padding=1), widths[0]
        block = lambda cin, cout: ResBlock(cin, cout, emb_dim, dropout)
        self.down, self.up = nn.ModuleList(), nn.ModuleList()
        for w in widths:  # encoder: blocks per level, a skip saved after each level
            self.down.append(nn.ModuleList(block(c if i == 0 else w, w) for i in range(blocks)))
            c = w
        self.mid1, self.mid_attn = block(c, c), SelfAttention(c)
        self.mid2, self.low_attn = block(c, c), SelfAttention(c)
        for w in reversed(widths):  # decoder: a level's first block takes the concatenated skip
            self.up.append(nn.ModuleList(block(c + w if i == 0 else w, w) for i in range(blocks)))
            c = w
        self.out_norm, self.out = group_norm(c), zero_init(nn.Conv2d(c, 3, 3, padding=1))
    def forward(self, x, sigma, class_emb):
        """x (B, 3, 32, 32) noisy images, sigma (B,), class_emb (B, emb_dim) -> D(x; σ) (B, 3, 32, 32)"""
        c_skip, c_out, c_in, c_noise = (s[:, None, None, None] for s in edm_scalings(sigma, self.sigma_data))
        angles = c_noise.flatten()[:, None].float() * self.freqs[None] * 2 * math.pi  # (B, E/4)
        emb = F.silu(self.noise_mlp(torch.cat([angles.cos(), angles.sin()], 1)) + class_emb)
        h, skips = self.stem(c_in * x), []
        for level, blocks in enumerate(self.down):
            for block in blocks:
                h = block(h, emb)
            skips.append(h)
            h = F.avg_pool2d(h, 2) if level < len(self.down) - 1 else h
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for level, blocks in enumerate(self.up):
            h = torch.cat([h, skips.pop()], 1)
            for block in blocks:
                h = block(h, emb)
            h = self.low_attn(h) if level == 0 else h
            h = F.interpolate(h, scale_factor=2, mode="nearest") if level < len(self.up) - 1 else h
        return c_skip * x + c_out * self.out(F.silu(self.out_norm(h)))

def make_unet(cfg):
    widths = [int(w) if w.strip().isdigit() else 0 for w in cfg.widths.split(",")]
    if any(w < 8 or w % 8 for w in widths) or cfg.emb_dim % 4:
        raise UserError(f"--widths {cfg.widths} --emb-dim {cfg.emb_dim}: every width must be a positive "
                        f"multiple of 8 (group norm, attention heads), the embedding a multiple of 4")
    return UNet(widths, cfg.blocks, cfg.emb_dim, data.CIFAR[cfg.dataset]["classes"], cfg.dropout, cfg.sigma_data)

def edm_loss(net, x, labels, cfg):
    """EDM Eq. 2 with λ(σ) = (σ² + σ_d²)/(σ σ_d)²: the weighted denoising error at ln σ ~ N(P_mean,
    P_std²). Labels become "no class" with probability p_uncond, training the unconditional model
    that classifier-free guidance needs inside the same network. Each image is noised noise_draws
    times (independent σ, noise and label drop): the step's gradient varies less, its images stay few."""
    x, labels = x.repeat(cfg.noise_draws, 1, 1, 1), labels.repeat(cfg.noise_draws)  # (N B, 3, 32, 32)
    sigma = (torch.randn(len(x), device=x.device) * cfg.p_std + cfg.p_mean).exp()  # (N B,)
    drop = torch.rand(len(x), device=x.device) < cfg.p_uncond
    labels = torch.where(drop, torch.full_like(labels, net.n_classes), labels)
    noisy = x + sigma[:, None, None, None] * torch.randn_like(x)  # forward process: x + σ n
    weight = (sigma ** 2 + cfg.sigma_data ** 2) / (sigma * cfg.sigma_data) ** 2
    denoised = net(noisy, sigma, net.class_embed(labels))
    return (weight[:, None, None, None] * (denoised.float() - x) ** 2).mean()

@torch.no_grad()
def edm_heun_sampler(net, z, class_emb, steps, guidance=1.0, hw=None):
    """EDM Algorithm 1 (deterministic, S_churn = 0): Heun's method on the probability-flow ODE
    dx/dσ = (x - D(x; σ))/σ from σ_0 = 80 to 0. z (B, 3, 32, 32) ~ N(0, I); NFE = 2 steps - 1 (twice that
    guided). Classifier-free guidance (Ho & Salimans 2022) denoises with D_u + w (D_c - D_u); w = 1 is
    the plain conditional model. hw: the precision the network runs in (None: float32 on z's device)."""
    hw, null = hw or Hardware(z.device, "fp32"), net.class_embed(torch.full((len(z),), net.n_classes, device=z.device))
    def denoise(x, sigma):  # float64 (B, 3, 32, 32) -> float64 D(x; σ)
        s, x = torch.full((len(x),), sigma, device=x.device, dtype=torch.float32), x.float()
        with autocast(hw):
            if guidance == 1:
                return net(x, s, class_emb).double()
            cond, uncond = net(torch.cat([x, x]), torch.cat([s, s]), torch.cat([class_emb, null])).float().chunk(2)
        return (uncond + guidance * (cond - uncond)).double()
    sigmas = edm_sigmas(steps).tolist()
    x = z.double() * sigmas[0]  # float64: the update stays exact however the net runs
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        d = (x - denoise(x, s)) / s
        x_next = x + (s_next - s) * d  # Euler step
        if s_next > 0:  # second-order correction (Heun), skipped on the last step to σ = 0
            x_next = x + (s_next - s) * (d + (x_next - denoise(x_next, s_next)) / s_next) / 2
        x = x_next
    return x.float()

def nfe(cfg):
    """Network evaluations per sample: Heun's 2 per step but the last, two passes each when guided."""
    return (2 * cfg.sampler_steps - 1) * (1 if cfg.guidance == 1 else 2)

def to_uint8(x):
    """[-1, 1] floats -> uint8 images, as saved and as FID sees them."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)

def slerp(a, b, t):
    """Spherical interpolation of noise tensors (Shoemake 1985): keeps a Gaussian sample's norm."""
    omega = torch.acos((a.flatten() @ b.flatten() / (a.norm() * b.norm())).clamp(-1, 1))
    return (1 - t) * a + t * b if omega.abs() < 1e-6 else \
        (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)

def power_ema_decay(sigma_rel, step):
    """The power-function EMA of Karras et al. 2024 (EDM2, Sec. 3.1): after t = step + 1 updates the
    decay is (1 - 1/t)^(γ+1), so the average spans the same fraction of the run however long it is.
    γ solves σ_rel² = (γ+1) / ((γ+2)² (γ+3)) (EDM2 Eq. 3), a cubic; σ_rel 0.04 (γ 22.0) ends a
    50,000-step run at a decay of 0.99954, close to a plain EMA of 0.9995."""
    if sigma_rel == 0:
        return 0.0
    gamma = np.roots([1, 7, 16 - sigma_rel ** -2, 12 - sigma_rel ** -2]).real.max()
    return (1 - 1 / (step + 1)) ** (gamma + 1)

def train_generator(cfg, objects, x_train, y_train, hw, ckpt_path, run):
    """The budgeted loop from run["step"]; returns the run record at the end (None when paused).
    objects: the model, its EMA, the optimiser and the scaler."""
    net, ema, opt, scaler = (objects[k] for k in ("model", "ema", "opt", "scaler"))
    curve, stop_at, t0 = run["curve"], stop_point(cfg.pause_at, run["step"], cfg.steps), time.time()
    checkpoint = lambda step: save_checkpoint(ckpt_path, "generate", cfg, objects, step=step, curve=curve,
                                              data_id=run["data_id"], seconds=run["seconds"] + time.time() - t0)
    log = Progress(run["step"], cfg.steps, stop_at, "loss")
    for step in range(run["step"], stop_at):
        seed_step(cfg.seed, step)  # noise levels, noise, dropout, flips
        lr = set_lr(opt, get_lr(step, cfg, round(cfg.warmup_fraction * cfg.steps)))
        idx = batch_indices(step, len(x_train), cfg.batch_size, cfg.seed, hw.device)
        xb = x_train[idx].float() / 127.5 - 1  # uint8 -> [-1, 1]  (B, 3, 32, 32)
        flip = torch.rand(len(xb), device=hw.device) < (0.5 if cfg.flip else 0.0)  # same stream either way
        xb = torch.where(flip[:, None, None, None], xb.flip(3), xb)  # horizontal flips
        net.train()
        with autocast(hw):
            loss = edm_loss(net, xb, y_train[idx], cfg)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)  # clip the true gradients, not the fp16-scaled ones
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        ema_update(ema, net, power_ema_decay(cfg.ema_length, step))
        log.add(loss)
        done = step + 1
        if done % cfg.log_every == 0 or done == stop_at:
            curve["step"].append(done)
            curve["loss"] += log.line(done, lr=f"{lr:.1e}")
        if done % max(1, cfg.steps // 10) == 0 and done < cfg.steps:  # every tenth of the run
            with log.aside():
                checkpoint(done)  # first: a Ctrl-C while the grid is drawn keeps these steps
                if cfg.steps >= GRID_MIN_STEPS:  # a grid to watch the run by
                    grid = sample_images(ema.eval(), torch.arange(64) % ema.n_classes, cfg, hw, cfg.seed)
                    save_grid(os.path.join(cfg.out, f"progress_{done:05d}.png"), grid, 8,
                              f"EMA samples after {done:,} steps")
        stop_if_asked(done, checkpoint, ckpt_path, cfg)
    checkpoint(stop_at)
    if stop_at < cfg.steps:
        return paused(stop_at, cfg)
    return dict(step=stop_at, curve=curve, seconds=run["seconds"] + time.time() - t0)

def sample_images(net, labels, cfg, hw, seed):
    """Samples for the class labels from fresh, seeded noise z: (N,) -> uint8 (N, 3, 32, 32)."""
    g, out, t0 = torch.Generator().manual_seed(seed), [], time.time()
    for i in range(0, len(labels), cfg.sample_batch):
        lab = labels[i:i + cfg.sample_batch].to(hw.device)
        z = torch.randn(len(lab), 3, 32, 32, generator=g).to(hw.device)
        out.append(to_uint8(edm_heun_sampler(net, z, net.class_embed(lab), cfg.sampler_steps, cfg.guidance, hw)).cpu())
        done, rate = i + len(lab), (i + len(lab)) / (time.time() - t0)
        print(f"sampling {done}/{len(labels)} | {rate:.1f} img/s | eta {fmt_time((len(labels) - done) / rate)}",
              file=sys.stderr, flush=True)
        if STOP:  # Ctrl-C: the samples drawn so far are not worth keeping, the checkpoint is
            raise UserError("interrupted while sampling; the last checkpoint stands: --resume continues its "
                            "training, --sample-only draws the samples again")
    return torch.cat(out)

def interpolations(net, cfg, hw, seed, pairs=8, frames=10):
    """Per pair: slerp the noise, lerp the class embedding, run the deterministic sampler. Frames 0 and
    -1 are exactly the two endpoint samples.  -> uint8 (pairs * frames, 3, 32, 32), the two classes"""
    g = torch.Generator().manual_seed(seed + 1)
    za, zb = torch.randn(pairs, 3, 32, 32, generator=g), torch.randn(pairs, 3, 32, 32, generator=g)
    la, lb = (torch.randint(0, net.n_classes, (pairs,), generator=g) for _ in range(2))
    ea, eb = net.class_embed(la.to(hw.device)), net.class_embed(lb.to(hw.device))
    ts = torch.linspace(0, 1, frames).tolist()
    z = torch.stack([slerp(za[p], zb[p], t) for p in range(pairs) for t in ts]).to(hw.device)
    emb = torch.stack([(1 - t) * ea[p] + t * eb[p] for p in range(pairs) for t in ts])
    return to_uint8(edm_heun_sampler(net, z, emb, cfg.sampler_steps, cfg.guidance, hw)).cpu(), (la, lb)

def generate(cfg):
    """`python mm.py generate`: set up (fresh, or from the checkpoint) -> train -> samples and figures ->
    scores. Every count reported (steps, seconds) comes from the checkpoint that made the samples."""
    check_numbers(cfg, below={"ema_length": 0.28, "warmup_fraction": 1, "dropout": 1, "p_uncond": 1})
    t_start, ckpt_path = time.time(), cfg.ckpt or os.path.join(cfg.out, "ckpt.pt")
    sample_seed = cfg.seed  # --sample-only --seed S draws another set from the same network
    if cfg.sample_only:  # the network and its training record come from the checkpoint
        if not os.path.exists(ckpt_path):
            raise UserError(f"no checkpoint at {ckpt_path}; train first, or point --ckpt at one")
        trained_with = load_checkpoint(ckpt_path, "generate", cfg, adopt=True)["config"].items()
        cfg = replace(cfg, **{k: v for k, v in trained_with if k not in RESUME_FREE})
    n_params = count_params(make_unet(cfg))
    print(f"generate | U-Net widths {cfg.widths}, {cfg.blocks} block(s) per level")
    enforce_budget("Number of parameters", n_params, GENERATE_PARAM_LIMIT, False, cfg.allow_penalty)
    enforce_budget("Number of optimisation steps", cfg.steps, GENERATE_STEP_LIMIT, True, cfg.allow_penalty)
    hw = pick_hardware(cfg, (0 if cfg.sample_only else cfg.steps * cfg.batch_size * cfg.noise_draws) *
                       CPU_SECONDS["generate"] + max(cfg.fid_samples, 64) * nfe(cfg) * CPU_SECONDS["sampler"])
    train = data.load_split(cfg.dataset, "train", cfg.data_dir or None)
    train_id, train = data_id(*train), [torch.from_numpy(a).to(hw.device) for a in train]
    claim_folder(cfg, "generate", len(train[0]))
    torch.manual_seed(cfg.seed)  # the initial weights (and Fourier frequencies) depend on the seed alone
    net = make_unet(cfg).to(hw.device, memory_format=torch.channels_last)
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=(0.9, 0.99), fused=hw.device.type == "cuda")
    objects = dict(model=net, ema=ema, opt=opt, scaler=grad_scaler(hw))
    run = resume_from(ckpt_path, "generate", cfg, objects, train_id, step=0, curve={"step": [], "loss": []},
                      seconds=0.0)
    if not cfg.sample_only:
        print(f"> Work per step: {cfg.batch_size} images x {cfg.noise_draws} noise levels; "
              f"{cfg.steps * cfg.batch_size:,} images seen; "
              f"{cfg.dataset} train {tuple(train[0].shape)}")
        run = train_generator(cfg, objects, *train, hw, ckpt_path, run)
        if run is None:  # paused
            return None
    labels, t0 = torch.arange(max(cfg.fid_samples, 64)) % net.n_classes, time.time()  # classes cycled
    images = sample_images(ema.eval(), labels, cfg, hw, sample_seed)  # (N, 3, 32, 32) uint8
    sample_seconds, out = time.time() - t0, lambda name: os.path.join(cfg.out, name)
    save_grid(out("samples.png"), images[:64], 8, "the first 64 samples (classes 0..63)")
    np.savez(out("samples.npz"), images=images.numpy(), labels=labels.numpy())
    frames, classes = interpolations(ema, cfg, hw, sample_seed)
    save_grid(out("interpolations.png"), frames, 10, "8 pairs: slerp of noise, lerp of class")
    line_plot(out("loss.png"), [Line("training loss", run["curve"]["step"], run["curve"]["loss"], PALETTE[0])],
              f"generator training loss (mean over each {cfg.log_every} steps)", "step", "EDM loss (Eq. 2)")
    metrics = dict(command="generate", params=n_params, steps=run["step"],
                   sampler="EDM Heun (Karras et al. 2022, Alg. 1)",
                   sampler_steps=cfg.sampler_steps, nfe=nfe(cfg), guidance=cfg.guidance, fid_samples=len(images),
                   sample_seed=sample_seed,
                   sample_seconds=sample_seconds, interpolation_classes=[c.tolist() for c in classes],
                   loss_curve=run["curve"], train_seconds=run["seconds"], checkpoint=ckpt_path,
                   device=str(hw.device), mixed_precision=hw.precision, config=asdict(cfg))
    save_json(out("metrics.json"), metrics)  # the samples' record survives a failure below
    x_test = data.load_test(cfg.dataset, cfg.data_dir or None)[0]  # the test split only ever scores
    metrics.update(fid.score_samples(images, train[0], x_test, hw.device, cfg.data_dir or None, cfg.dataset))
    metrics["wall_seconds"] = time.time() - t_start  # this call: setup, training, sampling, scoring
    save_json(out("metrics.json"), metrics)
    near = metrics["neighbours"]  # the first 8 samples, then the 8 nearest to a training image
    nearest = lambda j, mirrored: train[0][j].flip(2).cpu() if mirrored else train[0][j].cpu()  # (3, 32, 32)
    save_grid(out("neighbours.png"), torch.cat([torch.stack([images[s]] + [nearest(j, m) for j, m in zip(
        near["pixel_index"][row], near["mirrored"][row])]) for row, s in enumerate(near["sample_index"])]), 4,
              "sample | 3 nearest training images (or mirrored)", gap_after=1)
    print(f"\n{generate_row(metrics)}; the quality panel:")
    fid.print_panel(metrics)
    print(f"wrote {cfg.out}/samples.png, interpolations.png, neighbours.png, loss.png, samples.npz, config.json, "
          f"metrics.json" + ("" if cfg.sample_only else f"; checkpoint {ckpt_path}"))
    return metrics

def generate_row(m):
    """The summary of a generate record in one line: the command's last words and the report's."""
    fid_text = "null" if m.get("fid") is None else f"{m['fid']:.2f}"
    return (f"{m['params']:,} parameters, {m['steps']:,} steps; {m['sampler']}, {m['sampler_steps']} steps (NFE "
            f"{m['nfe']}), guidance {m['guidance']}: FID {fid_text} on {m['fid_samples']:,} samples")

# ---------------------------------------------------------------------------------------------
# Depth study: a plain 38-layer CNN fails to train, gradient flow shows why, BN and residuals fix it

@dataclass
class GradflowConfig(RunConfig):
    out: str = "runs/gradflow"  # results: a sub-folder per configuration and seed, metrics.json
    dataset: str = "cifar100"  # cifar100 | cifar10
    depth: int = 38  # 8 (0 processing blocks per stage) or 38 (5 per stage); 3 stages of 32 filters
    bn: bool = False  # BatchNorm after every conv, before its activation
    residual: bool = False  # identity skip around every processing block (He et al. 2016)
    compare: bool = False  # run the five reference configurations, then the comparison table
    epochs: int = 100  # passes over the 47,500 training images
    batch_size: int = 100  # images per step
    lr: float = 1e-3  # Adam learning rate at the start; cosine annealing per epoch down to min_lr
    min_lr: float = 2e-5  # cosine floor: min_lr + (lr - min_lr)(1 + cos(pi e / epochs)) / 2
    val_size: int = 2_500  # training images held out for validation (seeded permutation)
    runs: int = 1  # independent runs with seeds seed, seed+1, ...

class Block(nn.Module):
    """conv -> (BN) -> leaky ReLU -> [2x2 average pool] -> conv -> (BN) -> [+ input] -> leaky ReLU,
    at constant width. A processing block keeps H and W; with residual its input is added before the
    last activation (He et al. 2016, Fig. 2): if both convs output zero it passes its input through,
    so gradients reach early layers undiminished. A reduction block (reduce) halves H and W."""
    def __init__(self, c, bn, residual=False, reduce=False):
        super().__init__()  # the coursework framework: convs with a bias in reduction blocks only
        norm = lambda: nn.BatchNorm2d(c) if bn else nn.Identity()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=reduce), norm()
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=reduce), norm()
        self.residual, self.reduce = residual, reduce
    def forward(self, x):  # (B, c, H, W) -> same, or (B, c, H/2, W/2) when reducing
        h = F.leaky_relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(F.avg_pool2d(h, 2) if self.reduce else h))
        return F.leaky_relu(h + x if self.residual else h)

class VGG(nn.Module):
    """Entry conv/BN/leaky ReLU, 3 stages of (blocks_per_stage processing blocks + 1 reduction
    block), global average pool, linear. depth 8: no processing blocks (7 convs + 1 linear, 59,716
    parameters); depth 38: 5 per stage (37 convs + 1 linear, 336,196 parameters)."""
    def __init__(self, depth=38, bn=False, residual=False, filters=32, n_classes=100, stages=3):
        super().__init__()
        per_stage = (depth - 2 - 2 * stages) // (2 * stages)  # depth = 2 + stages (2 per + 2)
        if 1 + stages * (2 * per_stage + 2) + 1 != depth or per_stage < 0:
            raise UserError(f"--depth {depth} cannot be built of {stages} stages (use 8, 14, 20, ... 38)")
        self.entry = nn.Sequential(nn.Conv2d(3, filters, 3, padding=1, bias=False), nn.BatchNorm2d(filters),
                                   nn.LeakyReLU())
        self.stages = nn.ModuleList(  # blocks named b1..bN and red: 'stages.0.b2.conv1.weight'
            nn.Sequential(OrderedDict([*((f"b{i + 1}", Block(filters, bn, residual)) for i in range(per_stage)),
                                       ("red", Block(filters, bn, reduce=True))])) for _ in range(stages))
        self.fc = nn.Linear(filters, n_classes)
    def forward(self, x):  # (B, 3, 32, 32) -> (B, n_classes)
        for stage in (self.entry, *self.stages):
            x = stage(x)
        return self.fc(x.mean((2, 3)))  # global average pool

def layer_name(param_name):
    """'stages.1.red.conv2.weight' -> 's2.red.c2', 'entry.0.weight' -> 'entry': plot labels."""
    p = param_name.split(".")
    return p[0] if p[0] != "stages" else f"s{int(p[1]) + 1}.{p[2]}.{p[3].replace('conv', 'c')}"

def gradient_flow(model):
    """{layer: mean |dL/dW|} over every weight tensor (conv kernels and the linear matrix; biases
    and BN scales are left out), in forward order."""
    return {name: p.grad.abs().mean().item() for name, p in model.named_parameters()
            if p.grad is not None and p.ndim > 1}

def crop_flip(x, pad=4):
    """Random 32x32 crop of the zero-padded image and a random horizontal flip, per image."""
    B, C, H, W = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))  # (B, C, H + 2 pad, W + 2 pad)
    dy, dx = (torch.randint(0, 2 * pad + 1, (B,), device=x.device) for _ in range(2))
    rows = (dy[:, None] + torch.arange(H, device=x.device))[:, None, :, None]  # (B, 1, H, 1)
    cols = (dx[:, None] + torch.arange(W, device=x.device))[:, None, None, :]  # (B, 1, 1, W)
    image, channel = torch.arange(B, device=x.device), torch.arange(C, device=x.device)
    out = xp[image[:, None, None, None], channel[None, :, None, None], rows, cols]
    flip = torch.rand(B, device=x.device) < 0.5  # CIFAR objects are left-right symmetric in meaning
    return torch.where(flip[:, None, None, None], out.flip(3), out)

Comparison = namedtuple("Comparison", "name depth bn residual lr known_train_acc known_val_acc")
COMPARISONS = [  # the five reference configurations and their published train / val accuracy (%)
    Comparison("VGG_08", 8, False, False, 1e-3, 51.6, 46.8),
    Comparison("VGG_38", 38, False, False, 1e-3, 1.0, 1.0),
    Comparison("VGG_38 + residual", 38, False, True, 1e-3, 61.5, 52.3),
    Comparison("VGG_38 + BN + residual", 38, True, True, 1e-3, 63.0, 53.8),
    Comparison("VGG_38 + BN (lr 1e-2)", 38, True, False, 1e-2, 52.3, 46.7),
]

def run_folder(out, name):
    """OUT/<configuration>: 'VGG_38 + BN (lr 1e-2)' -> OUT/VGG_38_BN_lr_1e_2 (report reads it)."""
    return os.path.join(out, re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_"))

def train_vgg(cfg, seed, run_dir, splits, hw, train_id):
    """Train one configuration for cfg.epochs; returns its result (the best-validation weights
    scored on test), or None when paused. The lr follows cosine annealing per epoch (Loshchilov &
    Hutter 2017) as the coursework's CosineAnnealingLR steps it; epoch = step // steps per epoch."""
    (x_tr, y_tr), (x_val, y_val), test = splits
    torch.manual_seed(seed)
    model = VGG(cfg.depth, cfg.bn, cfg.residual, n_classes=data.CIFAR[cfg.dataset]["classes"])
    model = model.to(hw.device, memory_format=torch.channels_last)
    opt, scaler = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=hw.device.type == "cuda"), grad_scaler(hw)
    objects = dict(model=model, opt=opt, scaler=scaler)  # what checkpoints save, resumes restore
    per_epoch, ckpt_path = len(x_tr) // cfg.batch_size, os.path.join(run_dir, "ckpt.pt")
    run = resume_from(ckpt_path, "gradflow", cfg, objects, train_id, step=0, flows=[], best={"val_acc": -1.0},
                      epoch_sums=[0.0, 0.0], seconds=0.0, result=None,
                      curves={k: [] for k in ("epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc")})
    if run["result"]:
        print(f"{run_dir}: already finished")
        return run["result"]
    curves, flows, best, t0 = run["curves"], run["flows"], run["best"], time.time()
    steps = cfg.epochs * per_epoch
    stop_at = stop_point(cfg.pause_at, run["step"], steps)
    loss_sum, correct = (torch.tensor(v, device=hw.device) for v in run["epoch_sums"])  # the epoch so far
    checkpoint = lambda step, result=None: save_checkpoint(ckpt_path, "gradflow", cfg, objects, step=step,
        curves=curves, flows=flows, best=best, epoch_sums=[loss_sum.item(), correct.item()], result=result,
        data_id=train_id, seconds=run["seconds"] + time.time() - t0)
    log = Progress(run["step"], steps, stop_at, "loss")
    for step in range(run["step"], stop_at):
        epoch, i = divmod(step, per_epoch)
        lr = set_lr(opt, cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * epoch / cfg.epochs)))
        seed_step(seed, step)
        idx = batch_indices(step, len(x_tr), cfg.batch_size, seed, hw.device)
        xb, yb = crop_flip(x_tr[idx]), y_tr[idx]
        model.train()
        with autocast(hw):
            out = model(xb).float()
        loss = F.cross_entropy(out, yb)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if i == per_epoch - 1:  # the gradient flow after the last batch of the epoch
            scaler.unscale_(opt)  # true gradients, not fp16-scaled ones
            flows.append(gradient_flow(model))
        scaler.step(opt)
        scaler.update()
        loss_sum += loss.detach()
        correct += (out.argmax(1) == yb).sum()
        log.add(loss)
        done = step + 1
        if done % cfg.log_every == 0:
            log.line(done, epoch=epoch + 1, lr=f"{lr:.1e}")
        if i == per_epoch - 1:
            with log.aside():  # the epoch's evaluation and checkpoint are not a training step's time
                train_loss, train_acc = loss_sum.item() / per_epoch, correct.item() / (per_epoch * cfg.batch_size)
                loss_sum.zero_()
                correct.zero_()
                val_loss, val_acc = evaluate(model, x_val, y_val)
                for key, value in zip(curves, (epoch + 1, lr, train_loss, train_acc, val_loss, val_acc)):
                    curves[key].append(value)
                if val_acc > best["val_acc"]:  # keep the best-validation weights, for the test
                    best = {"val_acc": val_acc, "epoch": epoch + 1, "train_acc": train_acc,
                            "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
                print(f"epoch {epoch + 1:3d}/{cfg.epochs} | train loss {train_loss:.4f} acc {train_acc:.4f} | val loss "
                      f"{val_loss:.4f} acc {val_acc:.4f} | grad entry {flows[-1]['entry.0.weight']:.2e}", flush=True)
                checkpoint(done)
        stop_if_asked(done, checkpoint, ckpt_path, cfg)
    if stop_at < steps:
        checkpoint(stop_at)
        return paused(stop_at, cfg)
    model.load_state_dict(best["state"])
    test_loss, test_acc = evaluate(model, *test)
    result = dict(seed=seed, params=count_params(model), epochs=cfg.epochs, best_epoch=best["epoch"],
                  **{key: curves[key][-1] for key in ("train_loss", "train_acc", "val_loss", "val_acc")},
                  best_val_acc=best["val_acc"], test_acc=test_acc, test_loss=test_loss,
                  seconds=run["seconds"] + time.time() - t0, curves=curves, grad_flow=flows)
    checkpoint(stop_at, result)
    plot_run(run_dir, result)
    return result

def load_cifar_splits(cfg, device):
    """CIFAR on the device, normalised per channel: train/val by a seeded permutation; test. And the
    training split's data_id."""
    x, y = data.load_split(cfg.dataset, "train", cfg.data_dir or None)
    xt, yt = data.load_test(cfg.dataset, cfg.data_dir or None)  # evaluation only
    train_id = data_id(x, y)
    if not cfg.val_size < len(x):
        raise UserError(f"--val-size must be between 1 and {len(x) - 1}")
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))  # one split for all
    x = torch.from_numpy(x).to(device).float() / 255
    mean, std = x.mean((0, 2, 3), keepdim=True), x.std((0, 2, 3), keepdim=True)  # of train + val
    norm = lambda a: ((a - mean) / std).contiguous(memory_format=torch.channels_last)
    y, tr, va = torch.from_numpy(y).to(device), perm[cfg.val_size:].to(device), perm[:cfg.val_size].to(device)
    test = (norm(torch.from_numpy(xt).to(device).float() / 255), torch.from_numpy(yt).to(device))
    return ((norm(x[tr]), y[tr]), (norm(x[va]), y[va]), test), train_id

def gradflow(cfg):
    """`python mm.py gradflow`: train one configuration (or --compare all five); gradient flow."""
    check_numbers(cfg)
    VGG(cfg.depth)  # refuses a depth that cannot be built, before any work
    name = f"VGG_{cfg.depth:02d}" + " + BN" * cfg.bn + " + residual" * cfg.residual
    configs = COMPARISONS if cfg.compare else [Comparison(name, cfg.depth, cfg.bn, cfg.residual, cfg.lr, 0, 0)]
    plan = [(c, replace(cfg, depth=c.depth, bn=c.bn, residual=c.residual, lr=c.lr),
             [os.path.join(run_folder(cfg.out, c.name), f"seed{cfg.seed + r}") for r in range(cfg.runs)])
            for c in configs]  # (configuration, its config, the run folders of its seeds)
    epochs_images = cfg.runs * cfg.epochs * (50_000 - cfg.val_size)  # CIFAR: 50,000 training images
    hw = pick_hardware(cfg, epochs_images * sum(c.depth - 1 for c in configs) * CPU_SECONDS["gradflow"])
    (splits, train_id), classes = load_cifar_splits(cfg, hw.device), data.CIFAR[cfg.dataset]["classes"]
    print(f"gradflow | {cfg.dataset} train {len(splits[0][0])}, val {len(splits[1][0])}, test {len(splits[2][0])}"
          f" | {cfg.epochs} epochs of {len(splits[0][0]) // cfg.batch_size} steps")
    claim_folder(cfg, "gradflow", len(splits[0][0]), {os.path.join(d, "ckpt.pt"): c for _, c, ds in plan for d in ds})
    rows = []
    for config, run_cfg, run_dirs in plan:
        print(f"=== {config.name}: > Number of parameters "
              f"{count_params(VGG(config.depth, config.bn, config.residual, n_classes=classes))}")
        results = []
        for r, run_dir in enumerate(run_dirs):
            results.append(train_vgg(run_cfg, cfg.seed + r, run_dir, splits, hw, train_id))
            if results[-1] is None:  # paused
                return None
            save_json(os.path.join(run_dir, "metrics.json"), results[-1])
        row = {"name": config.name, "params": results[0]["params"], "epochs": results[0]["epochs"],
               "lr": config.lr, "runs": len(results),
               "known_train_val": [config.known_train_acc, config.known_val_acc]
               if cfg.compare and cfg.dataset == "cifar100" else None}  # published on CIFAR-100
        for key in ("train_loss", "train_acc", "val_loss", "val_acc", "best_val_acc", "test_acc"):
            row[f"{key}_mean"], row[f"{key}_std"] = mean_std([r[key] for r in results])
        rows.append(row)
    print(f"\nthe last epoch's figures, test of the best-validation weights, mean ± std over {cfg.runs} seed(s); "
          f"known = published train / val %")
    print_table([depth_row(row) for row in rows])
    save_json(os.path.join(cfg.out, "metrics.json"), {"command": "gradflow", "config": asdict(cfg), "table": rows,
                                                      "device": str(hw.device), "mixed_precision": hw.precision})
    print(f"wrote {cfg.out}/config.json, metrics.json and per run gradflow.png, curves.png, metrics.json")
    return rows

def depth_row(row):
    """A configuration's summary as text, mean ± std over seeds: for the command and the report."""
    text = lambda key, f="{:.3f} ± {:.3f}": f.format(row[f"{key}_mean"], row[f"{key}_std"])
    return {"configuration": row["name"], "lr": f"{row['lr']:.0e}", "params": f"{row['params']:,}",
            "train loss": text("train_loss"), "train acc %": percent((row["train_acc_mean"], row["train_acc_std"])),
            "val loss": text("val_loss"), "val acc %": percent((row["val_acc_mean"], row["val_acc_std"])),
            "test acc %": percent((row["test_acc_mean"], row["test_acc_std"])),
            "known": "{} / {}".format(*row["known_train_val"]) if row["known_train_val"] else "-"}

# ---------------------------------------------------------------------------------------------
# Run plumbing the three loops share: hardware, per-step seeds, lr, EMA, progress lines, exact
# resume, pause and Ctrl-C. Each piece is called visibly from the loops above.

POSITIVE = {"steps", "epochs", "batch_size", "lr", "runs", "eval_every", "eval_train", "log_every",
            "blocks", "emb_dim", "sigma_data", "p_std", "sampler_steps", "fid_samples", "sample_batch",
            "noise_draws", "val_size", "repeats"}  # every other number (but p_mean, a log) must not be negative

def check_numbers(cfg, below=None):
    """Before any work, one line for the first number out of range: those in POSITIVE must be
    positive, the others not negative, and those in `below` ({name: bound}) under their bound."""
    below = below or {}
    for name, value in asdict(cfg).items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if name in below and not 0 <= value < below[name]:
            raise UserError(f"--{name.replace('_', '-')} must lie in [0, {below[name]}), got {value}")
        if (value < 0 and name != "p_mean") or (name in POSITIVE and value == 0) or (name == "seed" and value > 1e9):
            rule = "positive" if name in POSITIVE else "at most 1e9" if name == "seed" else "at least 0"
            raise UserError(f"--{name.replace('_', '-')} must be {rule}, got {value}")

def budget_penalty(value, limit, inclusive):
    """Coursework penalty in marks: 5 per 10 % (or part of it) over the limit (at it, if strict)."""
    over = value - limit
    if over < 0 or (over == 0 and inclusive):
        return 0
    return 5 * max(1, -(-over * 10 // limit))  # ceil(over / (10 % of limit)), in integers

def enforce_budget(name, value, limit, inclusive, allow_penalty):
    """Print the count against its limit; refuse it when over, unless the penalty is accepted."""
    rule = f"at most {limit:,}" if inclusive else f"under {limit:,}"
    print(f"> {name} {value} (budget: {rule})")
    penalty = budget_penalty(value, limit, inclusive)
    if penalty and not allow_penalty:
        raise UserError(f"{name.lower()} {value:,} breaks the budget ({rule}); reduce it, or pass "
                        f"--allow-penalty to accept the coursework penalty of -{penalty} marks")
    if penalty:
        print(f"! over budget: {name.lower()} {value:,} costs -{penalty} marks (coursework rules)")

def count_params(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

Hardware = namedtuple("Hardware", "device precision")  # torch.device and "fp32" | "bf16" | "fp16"

# Seconds one training image (generate: one noisy copy; gradflow: per conv layer) and one sampler evaluation
# take on 2 CPU cores, measured alone at the defaults: what --device auto says before it trains on a CPU
CPU_SECONDS = {"classify": 0.0040, "generate": 0.0067, "gradflow": 0.00031, "sampler": 0.0055}

def pick_hardware(cfg, cpu_seconds=0.0):
    """Device, mixed precision and determinism, printed once; on a CPU reached by --device auto, the time
    the run would take there (cpu_seconds, from CPU_SECONDS). bf16 autocast where the GPU has fast bf16
    (Ampere and newer), fp16 with a GradScaler on older GPUs (T4, V100), fp32 on the CPU (its bf16
    convolutions are slow). Deterministic kernels make a seeded GPU run repeat (the CPU always does): every
    op of the step loops and samplers has one (test_mm checks them against PyTorch's list), and strict mode
    makes attention's backward take its deterministic path and any op without one raise, not differ."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu")
    device = torch.device("cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu")
    precision = cfg.precision if cfg.precision != "auto" else "fp32" if device.type == "cpu" else \
        "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    if device.type == "cuda":
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cfg.deterministic, not cfg.deterministic
        workspace = os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # repeatable cuBLAS matmuls
        if cfg.deterministic and workspace not in (":4096:8", ":16:8"):  # cuBLAS would raise at the first matmul
            raise UserError(f"CUBLAS_WORKSPACE_CONFIG={workspace} leaves cuBLAS non-deterministic; unset it or "
                            f"set it to :4096:8, or pass --no-deterministic")
        torch.use_deterministic_algorithms(cfg.deterministic)
    elif cfg.device == "auto" and cpu_seconds:
        print(f"no CUDA GPU: running on the CPU, about {fmt_time(cpu_seconds)} on 2 cores (estimated from "
              f"measured steps; a GPU takes minutes)")
    print(f"device {device} | precision {precision} | deterministic {cfg.deterministic or device.type == 'cpu'}")
    return Hardware(device, precision)

def autocast(hw):
    """Mixed precision for the forward pass (fp32: off); losses and scores are always float32."""
    return contextlib.nullcontext() if hw.precision == "fp32" else \
        torch.autocast(hw.device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[hw.precision])

def grad_scaler(hw):
    """fp16 gradients underflow without loss scaling; bf16 and fp32 need none (a no-op scaler)."""
    return torch.amp.GradScaler(hw.device.type, enabled=hw.precision == "fp16")

STEP_SEED_STRIDE = 1_000_003  # a prime above any step count: seed * stride + step never collides

def seed_step(seed, step):
    """All randomness of a step (augmentation, noise, dropout) from (seed, step): exact resume."""
    torch.manual_seed(seed * STEP_SEED_STRIDE + step)

@functools.lru_cache(maxsize=2)
def epoch_order(n, seed, epoch, device):
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * STEP_SEED_STRIDE + epoch))
    return order.to(device)

def batch_indices(step, n, batch_size, seed, device):
    """The step's batch of the n training images, from (seed, step) alone, so that a resumed run
    draws the batches of an unbroken one; the ragged end of each epoch's permutation is dropped."""
    epoch, i = divmod(step, n // batch_size)
    return epoch_order(n, seed, epoch, device)[i * batch_size:(i + 1) * batch_size]

def get_lr(step, cfg, warmup):
    """Linear warm-up to cfg.lr over `warmup` steps, then cosine decay to 0 at cfg.steps."""
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, cfg.steps - warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

def set_lr(opt, lr):
    for group in opt.param_groups:
        group["lr"] = lr
    return lr

@torch.no_grad()
def ema_update(ema, model, decay):
    """ema <- decay ema + (1 - decay) model over weights and BN statistics (Polyak averaging), as
    one fused _foreach_lerp_ (a kernel launch per group, not per tensor); integer buffers copied."""
    pairs = list(zip(ema.state_dict().values(), model.state_dict().values()))
    floats = [(e, m) for e, m in pairs if e.dtype.is_floating_point]
    torch._foreach_lerp_([e for e, _ in floats], [m for _, m in floats], 1 - decay)
    for e, m in pairs:
        if not e.dtype.is_floating_point:
            e.copy_(m)

class Progress:
    """A loop's log lines: `step  100/10000 | loss 0.4321 | lr 1.0e-03 | 3.2 ms/step | eta 0:31`. The
    named per-step values are summed on the device (no host sync per step); a line shows their means
    over exactly the steps since the last line, and ms/step over those steps' own time: what runs in
    aside() (evaluations, checkpoints, grids) counts for neither. The ETA covers the steps to `end`."""
    def __init__(self, done, total, end, *names):
        self.total, self.end, self.names, self.last = total, end, names, done
        self.sums, self.t0 = 0, time.time()
    def add(self, *values):  # one step's 0-d tensors, in the order of `names`
        self.sums = self.sums + torch.stack(values).detach().float()
    @contextlib.contextmanager
    def aside(self):
        t0 = time.time()
        yield
        self.t0 += time.time() - t0
    def line(self, done, **text):
        """Print the line for the steps up to `done`; -> the means, in the order of `names`."""
        means = [total / (done - self.last) for total in self.sums.tolist()]  # float32 sums, float64 means
        ms = 1000 * (time.time() - self.t0) / (done - self.last)
        shown = [f"{k} {v:.4f}" for k, v in zip(self.names, means)] + [f"{k} {v}" for k, v in text.items()]
        print(f"step {done:{len(str(self.total))}d}/{self.total} | {' | '.join(shown)} | {ms:.1f} ms/step | "
              f"eta {fmt_time(ms * (self.end - done) / 1000)}", flush=True)
        self.last, self.sums, self.t0 = done, 0, time.time()
        return means

STOP = []  # the first Ctrl-C (or SIGTERM) lands here; the loops check it after every step

def on_signal(signum, frame):
    if STOP:  # a second Ctrl-C aborts at once, without a new checkpoint
        raise KeyboardInterrupt
    STOP.append(signum)
    print("\nstopping after this step (Ctrl-C again to abort without saving)", flush=True)

def stop_if_asked(done, checkpoint, ckpt_path, cfg):
    """After every step: once Ctrl-C has been pressed, checkpoint the steps taken and end in one line."""
    if STOP:
        checkpoint(done)
        raise UserError(f"interrupted after step {done:,}; checkpoint saved in {ckpt_path}, continue with "
                        f"--resume --out {cfg.out}")

def stop_point(pause_at, done, total):
    """Where this call stops: --pause-at if given, else the end. A pause at or before the checkpoint
    is refused: it would rewrite the checkpoint's counter below the steps its weights have taken."""
    if pause_at and pause_at <= done:
        raise UserError(f"--pause-at {pause_at:,} is not after the checkpoint's step {done:,}; pass a "
                        f"later step, or leave it out to run to the end")
    return min(pause_at or total, total)

def paused(done, cfg):
    print(f"paused after step {done:,} as asked (--pause-at); continue with --resume --out {cfg.out}")

# What a --resume may change: where files go, how often to print, hardware, and generate's sampling
# (it acts after training). Every other field shapes the trajectory: a checkpoint continues only
# with the values it was trained with.
RESUME_FREE = {"data_dir", "out", "allow_penalty", "runs", "compare", "eval_every", "log_every", "device",
               "precision", "deterministic", "resume", "sample_only", "pause_at", "ckpt",
               "sampler_steps", "guidance", "fid_samples", "sample_batch"}

def save_checkpoint(path, command, cfg, objects, **record):
    """The objects' states, the config and the run's record, saved atomically (a .tmp renamed into
    place): an interrupted write never clobbers the last checkpoint."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    states = {name: obj.state_dict() for name, obj in objects.items()}
    torch.save(dict(command=command, config=asdict(cfg), **states, **record), path + ".tmp")
    os.replace(path + ".tmp", path)

def load_checkpoint(path, command, cfg, adopt=False, data_id=None):
    """A checkpoint of `command`, loaded to the CPU, under one rule: its config has exactly cfg's
    fields outside RESUME_FREE (a flag added or removed since changes what the run means) with cfg's
    values (or the run would continue on another schedule than its record says), and it was trained on
    the training split whose data_id is given; adopt: any values (--sample-only takes them). One line
    names what breaks it."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain data only
    except Exception as e:  # truncated, empty, not a torch file, or holding arbitrary objects
        ck = f"({type(e).__name__}) "
    if not isinstance(ck, dict) or ck.get("command") != command:
        raise UserError(f"{path} is not a checkpoint of `mm.py {command}` {ck if isinstance(ck, str) else ''}"
                        f"; point at one it wrote, or start a new run")
    trained, today, flag = ck["config"], asdict(cfg), lambda k: "--" + k.replace("_", "-")
    odd = sorted(k for k in set(trained) ^ set(today) if k not in RESUME_FREE)
    if odd:
        raise UserError(f"{path} was written by another mm.py: " + ", ".join(
            f"{flag(k)} {trained[k]} is no flag of this one" if k in trained else f"it has no {flag(k)}" for k in odd)
            + "; rerun it with the mm.py that wrote it (git log), or start a new --out")
    differ = [] if adopt else [k for k in today if k not in RESUME_FREE and trained[k] != today[k]]
    if differ:
        flags = lambda values: " ".join(f"{flag(k)} {values[k]}" for k in differ)
        raise UserError(f"{path} was trained with {flags(trained)}, not {flags(today)}; resume with "
                        f"the values it was trained with, or start a new --out")
    if data_id and ck.get("data_id") != data_id:
        raise UserError(f"{path} was trained on another training set than --data-dir "
                        f"{data.data_root(cfg.data_dir or None)} holds; point it at the data the run was trained on, "
                        f"or start a new --out")
    return ck

def resume_from(path, command, cfg, objects, data_id, **fresh):
    """The run's record: `fresh` (with data_id, the training split's fingerprint), or the checkpoint's, with
    the objects' states restored. A run trained without fp16 saved an empty scaler state: an fp16 resume
    (a T4 continuing a CPU or A100 run) starts its scaler fresh instead of failing."""
    if not os.path.exists(path):
        return dict(fresh, data_id=data_id)
    ck = load_checkpoint(path, command, cfg, data_id=data_id)
    if not ck.get("result"):
        for name, obj in objects.items():
            if ck.get(name):
                obj.load_state_dict(ck[name])
        print(f"resuming {path} from step {ck['step']:,}")
    return ck

def data_id(*arrays):
    """The training split's fingerprint (md5 of its images and labels): a checkpoint continues on it alone."""
    return "-".join(fid.digest(a) for a in arrays)

def recorded_command(folder, expected=None):
    """The command whose record `folder` holds (its config.json, metrics.json or bench.json names it), or
    None for a folder with none. A record naming no command, or another than `expected`, is refused."""
    for name in ("config.json", "metrics.json", "bench.json"):
        if os.path.isfile(path := os.path.join(folder, name)):
            try:
                command = json.load(open(path)).get("command")
            except (ValueError, AttributeError):
                command = None
            if command not in COMMANDS:
                raise UserError(f"{path} was not written by this mm.py (an older one, or another program); "
                                f"use the mm.py that wrote it (git log), or choose another folder")
            if expected and command != expected:
                raise UserError(f"{folder} holds a run of `mm.py {command}`, not of {expected}; choose another folder")
            return command
    return None

def claim_folder(cfg, command, n_train=None, checkpoints=None):
    """Before any write, one line for what is wrong: cfg.out holds another command's record; for a training
    command (n_train given), the batch is larger than the training set, or the folder holds a run (a
    checkpoint below it) without --resume, or a checkpoint to continue ({path: its config}) was trained with
    other values. --resume on a folder with no run starts one, and says so: one command serves the first
    run and every re-run. Then the folder is made, and a new run's config.json written (--sample-only
    writes beside the run it samples, and keeps its config.json)."""
    recorded_command(cfg.out, command)
    new_run = n_train is not None and not getattr(cfg, "sample_only", False)
    if new_run:
        if n_train < cfg.batch_size:
            raise UserError(f"--batch-size {cfg.batch_size} is larger than the {n_train:,} training images")
        has_run = bool(glob.glob(os.path.join(glob.escape(cfg.out), "**", "ckpt.pt"), recursive=True))
        if has_run and not cfg.resume:
            raise UserError(f"{cfg.out} already holds a run; pass --resume to continue it or choose another --out")
        if cfg.resume and not has_run:
            print(f"--resume: {cfg.out} holds no checkpoint yet; starting the run")
        for path, run_cfg in (checkpoints or {}).items():
            if os.path.exists(path):
                load_checkpoint(path, command, run_cfg)
        new_run = not has_run
    try:
        os.makedirs(cfg.out, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write results under {cfg.out} ({e.strerror or e}); choose another --out") from None
    if new_run:
        save_json(os.path.join(cfg.out, "config.json"), dict(command=command, **asdict(cfg)))

def save_json(path, obj):
    """Write JSON atomically (a .tmp renamed into place): a reader never sees half a file."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)

def mean_std(values):
    """Mean and sample standard deviation (n - 1; 0 for one value), as the coursework reports."""
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0

def percent(mean_and_std):
    return "{:.2f} ± {:.2f}".format(*(100 * v for v in mean_and_std))

def print_table(rows):
    """Equal-keyed dicts (values already text) -> an aligned table under its header."""
    widths = [max(len(k), *(len(str(r[k])) for r in rows)) for k in rows[0]]
    for r in [dict(zip(rows[0], rows[0]))] + rows:
        print("  ".join(str(v).rjust(w) for v, w in zip(r.values(), widths)))

# ---------------------------------------------------------------------------------------------
# Figures: line charts and image grids as PNG, drawn with Pillow; each chart's numbers in a CSV

PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75)]
Line = namedtuple("Line", "label xs ys colour band", defaults=(None,))  # band: (lows, highs)

def nice_ticks(lo, hi, count=5, integer=False):
    """Round ticks spanning [lo, hi]: steps of 1, 2, 2.5 or 5 times a power of ten (whole for integers)."""
    if hi <= lo:
        lo, hi = lo - 0.5 * (abs(lo) or 1.0), hi + 0.5 * (abs(hi) or 1.0)
    raw = max((hi - lo) / count, 1.0) if integer else (hi - lo) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw * 0.999 and not (integer and m == 2.5))
    first, last = math.floor(lo / step + 1e-9) * step, math.ceil(hi / step - 1e-9) * step
    return [first + i * step for i in range(round((last - first) / step) + 1)], step

def tick_text(value, step):
    """A tick label with the decimals its step needs (a step of 2.5e-k needs one more than 1e-k)."""
    power = math.floor(math.log10(step) + 1e-9)
    return f"{value:.{max(0, -power) + (round(step / 10 ** power, 1) == 2.5)}f}"

def line_plot(path, lines, title, xlabel, ylabel, size=(975, 600), logy=False, percent=False, xlabels=None):
    """Lines -> a chart PNG (a 3.25-inch paper column at 300 dpi by default) and their numbers in a
    CSV. The legend has its own panel, so it never covers a curve; percent plots 100 y; logy plots
    log10 y with a label per decade; xlabels [(x, text)] replaces the x ticks with rotated names."""
    W, H = size
    font = ImageFont.load_default(size=max(12, W // 40))
    fy = (lambda y: math.log10(max(y, 1e-30))) if logy else (lambda y: 100 * y if percent else y)
    legend = dict((line.label, line.colour) for line in lines)  # one legend row per label
    legend_w = max(font.getlength(label) for label in legend) + 50
    right, top = legend_w + 20, 30 + font.size * 2
    bottom = font.size * 3 + 10 if xlabels is None else max(font.getlength(t) for _, t in xlabels) + font.size * 2 + 20
    ys = [fy(y) for line in lines for y in line.ys + (line.band[0] + line.band[1] if line.band else [])]
    xs = [x for line in lines for x in line.xs]
    y_ticks, y_step = nice_ticks(min(ys), max(ys), integer=logy)  # log10 y: whole decades
    y_text = (lambda v: f"1e{round(v)}") if logy else (lambda v: tick_text(v, y_step))
    x_ticks, x_step = ([min(xs), max(max(xs), min(xs) + 1)], 1) if xlabels else \
        nice_ticks(min(xs), max(xs), integer=all(float(x).is_integer() for x in xs))
    x0, x1, y0, y1 = x_ticks[0], x_ticks[-1], y_ticks[0], max(y_ticks[-1], y_ticks[0] + 1e-12)
    left = 16 + max(font.getlength(y_text(v)) for v in y_ticks)  # room for the widest tick label
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    px = lambda x, y: (left + (x - x0) / (x1 - x0) * (W - left - right),
                       H - bottom - (y - y0) / (y1 - y0) * (H - top - bottom))  # data -> pixels
    for v in y_ticks:  # horizontal grid lines with their labels
        d.line([left, px(x0, v)[1], W - right, px(x0, v)[1]], fill=(225, 225, 225))
        d.text((left - 6, px(x0, v)[1]), y_text(v), fill="black", font=font, anchor="rm")
    for v in [] if xlabels else x_ticks:
        d.text((px(v, y0)[0], H - bottom + 6), tick_text(v, x_step), fill="black", font=font, anchor="ma")
    for x, text in xlabels or []:  # one rotated label per named position
        tile = Image.new("RGB", (int(font.getlength(text)) + 2, font.size + 4), "white")
        ImageDraw.Draw(tile).text((1, 1), text, fill="black", font=font)
        tile = tile.rotate(90, expand=True)
        img.paste(tile, (int(px(x, y0)[0] - tile.width / 2), int(H - bottom + 4)))
    for line in (line for line in lines if line.band and len(line.xs) > 1):  # bands under the lines
        lows, highs = ([px(x, fy(v)) for x, v in zip(line.xs, band)] for band in line.band)
        d.polygon(highs + lows[::-1], fill=tuple(int(255 - 0.25 * (255 - c)) for c in line.colour))
    for line in lines:
        points = [px(x, fy(y)) for x, y in zip(line.xs, line.ys)]
        d.line(points, fill=line.colour, width=max(2, W // 300))
        d.ellipse([points[-1][0] - 4, points[-1][1] - 4, points[-1][0] + 4, points[-1][1] + 4], fill=line.colour)
    d.rectangle([left, top, W - right, H - bottom], outline="black")
    for i, (label, colour) in enumerate(legend.items()):  # the legend, right of the data
        y = top + font.size * (0.7 + 1.4 * i)
        d.line([W - legend_w - 5, y, W - legend_w + 25, y], fill=colour, width=4)
        d.text((W - legend_w + 32, y), label, fill="black", font=font, anchor="lm")
    d.text(((left + W - right) / 2, 4), title, fill="black", font=font, anchor="ma")
    d.text(((left + W - right) / 2, H - font.size - 6), xlabel, fill="black", font=font, anchor="ma")
    d.text((8, font.size + 10), ylabel + (" (%)" if percent else ""), fill="black", font=font, anchor="la")
    img.save(path, dpi=(300, 300))
    with open(os.path.splitext(path)[0] + ".csv", "w", newline="") as f:  # the numbers behind the figure
        rows = csv.writer(f, lineterminator="\n")  # quotes a label with a comma ("train, seed 0")
        rows.writerow(["label", "x", "y", "band_low", "band_high"])
        for line in lines:
            lows, highs = line.band or ([""] * len(line.xs),) * 2
            rows.writerows(zip([line.label] * len(line.xs), line.xs, line.ys, lows, highs))

GRID_TITLE = 24  # pixels of the title bar above an image grid

def save_grid(path, images, nrow, title, scale=2, pad=2, gap_after=None):
    """uint8 (N, 3, H, W) -> a PNG grid, nrow images a row, each scaled up `scale` times, under a
    title bar; gap_after=k sets the first k columns apart (the query column of neighbours.png)."""
    n, _, h, w = images.shape
    gap = 0 if gap_after is None else 8
    canvas = Image.new("RGB", (nrow * (w * scale + pad) + pad + gap,
                               math.ceil(n / nrow) * (h * scale + pad) + pad + GRID_TITLE), "white")
    font = ImageFont.load_default(size=14)
    while font.getlength(title) > canvas.width - 2 * pad and font.size > 8:  # the title fits
        font = ImageFont.load_default(size=font.size - 1)
    ImageDraw.Draw(canvas).text((pad, GRID_TITLE // 2), title, fill="black", font=font, anchor="lm")
    for i, img in enumerate(images.cpu()):
        tile = Image.fromarray(img.permute(1, 2, 0).numpy()).resize((w * scale, h * scale), Image.NEAREST)
        x = pad + (i % nrow) * (w * scale + pad) + (gap if gap_after is not None and i % nrow >= gap_after else 0)
        canvas.paste(tile, (x, GRID_TITLE + pad + (i // nrow) * (h * scale + pad)))
    canvas.save(path)

def plot_accuracy(path, results):
    """Train and test accuracy over steps: one colour per run, labelled by its seed."""
    lines = [Line(f"{split}, seed {r['seed']}", r["curves"]["step"], r["curves"][f"{split}_acc"],
                  tuple(v // (1 + (split == "test")) for v in PALETTE[i % len(PALETTE)]))
             for i, r in enumerate(results) for split in ("train", "test")]
    line_plot(path, lines, f"AddNIST accuracy ({len(results)} run(s))", "step", "accuracy", percent=True)

def plot_run(run_dir, result):
    """gradflow.png (mean |grad| per layer, a line per chosen epoch) and curves.png (accuracy per epoch)."""
    flows, names, c = result["grad_flow"], list(result["grad_flow"][0]), result["curves"]
    chosen = sorted({0, len(flows) // 4, len(flows) // 2, 3 * len(flows) // 4, len(flows) - 1})
    lines = [Line(f"epoch {e + 1}", list(range(len(names))), [flows[e][k] for k in names],
                  PALETTE[i % len(PALETTE)]) for i, e in enumerate(chosen)]
    line_plot(os.path.join(run_dir, "gradflow.png"), lines, "gradient flow: mean |dL/dW| per layer", "layer",
              "mean |grad|", size=(1400, 700), logy=True, xlabels=list(enumerate(map(layer_name, names))))
    line_plot(os.path.join(run_dir, "curves.png"), [Line("train", c["epoch"], c["train_acc"], PALETTE[0]),
                                                    Line("val", c["epoch"], c["val_acc"], PALETTE[1])],
              "accuracy per epoch", "epoch", "accuracy", percent=True)

# ---------------------------------------------------------------------------------------------
# Report: the coursework papers' tables and figures from finished runs (report.md, report.tex)

@dataclass
class ReportConfig:
    classify: str = ""  # a finished classify run folder (empty: leave the classifier out)
    generate: str = ""  # a finished generate run folder (empty: leave the generator out)
    gradflow: str = ""  # a finished gradflow run folder, e.g. from --compare (empty: leave it out)
    scaling: str = ""  # a folder of finished runs at other budgets (+ real.json: real images)
    out: str = "runs/report"  # for report.md, report.tex, the figures (PNG, 300 dpi) and CSVs

TEX = {"\\": r"\textbackslash{}", "%": r"\%", "_": r"\_", "&": r"\&", "#": r"\#", "$": r"\$", "{": r"\{",
       "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"$\pm$", "≤": r"$\le$",
       "<": r"$<$", "σ": r"$\sigma$", "–": r"\textendash{}"}

def tex(text):
    """Escape LaTeX's specials in one pass (an escape is never escaped again); -{}- keeps a flag's
    two hyphens from becoming an en dash."""
    return re.sub(r"-(?=-)", "-{}", "".join(TEX.get(ch, ch) for ch in str(text)))

class Report:
    """Markdown and LaTeX side by side: lines, headings, booktabs tables and captioned figures."""
    def __init__(self, out):
        self.out, self.md, self.tex = out, [], []
    def line(self, text, heading=False):
        self.md += [f"## {text}" if heading else text, ""]
        self.tex += [rf"\subsection*{{{tex(text)}}}" if heading else tex(text), ""]
    def table(self, caption, rows):
        keys = list(rows[0])
        self.md += [f"**{caption}**", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        self.md += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows] + [""]
        env, width = ("table*", r"\textwidth") if len(keys) > 5 else ("table", r"\columnwidth")
        self.tex += [rf"\begin{{{env}}}[t]", r"\centering", rf"\caption{{{tex(caption)}}}",
                     rf"\resizebox{{\ifdim\width>{width} {width}\else\width\fi}}{{!}}{{%",  # never grown
                     r"\begin{tabular}{l" + "r" * (len(keys) - 1) + "}", r"\toprule",
                     " & ".join(map(tex, keys)) + r" \\", r"\midrule",
                     *(" & ".join(tex(r[k]) for k in keys) + r" \\" for r in rows),
                     r"\bottomrule", r"\end{tabular}}", rf"\end{{{env}}}", ""]
    def figure(self, name, caption):
        self.md += [f"![{caption}]({name})", "", f"*{caption}*", ""]
        size = r"width=\columnwidth,height=0.45\textheight,keepaspectratio"  # tall grids stay on the page
        self.tex += [r"\begin{figure}[t]", r"\centering", rf"\includegraphics[{size}]{{{name}}}",
                     rf"\caption{{{tex(caption)}}}", r"\end{figure}", ""]

def penalty_line(params, param_limit, steps, step_limit):
    marks = budget_penalty(params, param_limit, False) + budget_penalty(steps, step_limit, True)
    return f"penalty: {marks} marks (parameters {params:,} < {param_limit:,}; steps {steps:,} ≤ {step_limit:,})"

def band_line(label, colour, curves, x_key, key):
    """A Line of the mean of curves[run][key] across runs, shaded ± one std, at the x values every
    run was evaluated at (a run evaluated more often adds nothing the others lack)."""
    xs = sorted(set.intersection(*(set(c[x_key]) for c in curves)))
    values = np.array([[dict(zip(c[x_key], c[key]))[x] for x in xs] for c in curves], dtype=np.float64)
    mean, std = values.mean(0), values.std(0, ddof=1) if len(values) > 1 else np.zeros(len(xs))
    return Line(label, xs, mean.tolist(), colour, ((mean - std).tolist(), (mean + std).tolist()))

def report_classifier(rep, m):
    rep.line("Classifier (AddNIST)", heading=True)
    rep.line(penalty_line(m["params"], CLASSIFY_PARAM_LIMIT, m["steps"], CLASSIFY_STEP_LIMIT))
    rep.table(f"Classifier: final figures, mean ± std over {m['runs']} seed(s)", [
        {"parameters": f"{m['params']:,}", "steps": f"{m['steps']:,}", **classify_row(m)}])
    curves = [r["curves"] for r in m["per_run"]]
    line_plot(os.path.join(rep.out, "classifier_accuracy.png"),
              [band_line(f"{split} (mean ± std)", colour, curves, "step", f"{split}_acc")
               for split, colour in (("train", PALETTE[0]), ("test", PALETTE[1]))],
              f"AddNIST accuracy, {m['runs']} seed(s)", "step", "accuracy", percent=True)
    rep.figure("classifier_accuracy.png", f"Train and test accuracy over training: mean across "
                                          f"{m['runs']} seed(s), shaded ± one standard deviation.")

# What may differ between the runs of one curve; every other field (and guidance) is the recipe, which is one
CURVE_FREE = {"data_dir", "out", "allow_penalty", "log_every", "device", "precision", "deterministic", "resume",
              "sample_only", "pause_at", "ckpt", "sample_batch", "seed", "steps"}

def scaling_points(folder):
    """{command: {(steps, size): {seed: figures}}} from the finished runs in the sub-folders of `folder`: a
    classify run's results (size: its parameters); a generate run's reader.json row that scored its samples
    (reader_row), or else its quality panel (size: its batch). The generate runs must share one recipe, and
    each (steps, seed) be one run: a mix or a duplicate is refused, never averaged or overwritten."""
    points, seen = {}, {}
    for path in sorted(glob.glob(os.path.join(glob.escape(folder), "*", "metrics.json"))):
        m, run = json.load(open(path)), os.path.dirname(path)
        command = recorded_command(run)
        if command == "classify":
            for r in m["per_run"]:
                points.setdefault(command, {}).setdefault((m["steps"], m["params"]), {})[r["seed"]] = r
        elif command == "generate":
            recipe = {k: v for k, v in m["config"].items() if k not in CURVE_FREE}
            first, first_recipe = seen.setdefault("recipe", (run, recipe))
            differ = [f"--{k.replace('_', '-')} {first_recipe.get(k)} / {recipe.get(k)}"
                      for k in sorted(set(recipe) | set(first_recipe)) if recipe.get(k) != first_recipe.get(k)]
            if differ:
                raise UserError(f"--scaling {folder} mixes generate recipes: {first} and {run} differ in "
                                f"{', '.join(differ)}; give each recipe a folder of its own")
            twin = seen.setdefault((m["steps"], m["config"]["seed"]), run)
            if twin != run:
                raise UserError(f"--scaling {folder}: {twin} and {run} are both seed {m['config']['seed']} at "
                                f"{m['steps']:,} steps; keep one")
            points.setdefault(command, {}).setdefault((m["steps"], m["config"]["batch_size"]), {})[
                m["config"]["seed"]] = reader_row(run, m)
    if not points:
        raise UserError(f"--scaling {folder}: no sub-folder holds a finished classify or generate run (metrics.json)")
    return points

def reader_row(run, m):
    """The last row of run/reader.json that scored the samples `m` records (same steps, guidance and pixel
    copy rate; a stand-in reader's figures), else the record itself: a score is never paired with others."""
    path = os.path.join(run, "reader.json")
    rows = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
    own = (m["steps"], m["guidance"], m.get("pixel_copy_rate"))
    return next((r for r in reversed(rows) if (r.get("steps"), r.get("guidance"), r.get("pixel_copy")) == own), m)

def mean_lines(chosen, keys):
    """chosen [(x, {seed: figures})], keys [(label, key, scale)] -> log10 x, and a Line per key: the mean over
    seeds of scale * figures[key], shaded ± one std."""
    xs, lines = [math.log10(x) for x, _ in chosen], []
    for i, (label, key, scale) in enumerate(keys):
        mean, std = scale * np.array([mean_std([r[key] for r in runs.values()]) for _, runs in chosen]).T
        lines.append(Line(label, xs, mean.tolist(), PALETTE[i], ((mean - std).tolist(), (mean + std).tolist())))
    return xs, lines

def report_scaling(rep, points):
    """The coursework's scaling questions from complete runs (each with its own schedule): test
    accuracy and the train - test gap against steps (at the commonest width) and against parameters
    (at the commonest step count), seeds pooled per point, log x, the budget limits marked."""
    rep.line("Classifier scaling: steps and parameters", heading=True)
    rep.table("Complete runs at other budgets: test accuracy and train - test gap, mean ± std over seeds, and "
              "the marks the coursework deducts past a limit", [
        {"steps": f"{steps:,}", "parameters": f"{params:,}", "seeds": len(runs),
         "test acc %": percent(mean_std([r["test_acc"] for r in runs.values()])),
         "gap (points)": percent(mean_std([r["train_acc"] - r["test_acc"] for r in runs.values()])),
         "penalty": -(budget_penalty(params, CLASSIFY_PARAM_LIMIT, False) +
                      budget_penalty(steps, CLASSIFY_STEP_LIMIT, True))}
        for (steps, params), runs in sorted(points.items(), key=lambda p: p[0][::-1])])  # by width, then steps
    for axis, limit in (("steps", CLASSIFY_STEP_LIMIT), ("parameters", CLASSIFY_PARAM_LIMIT)):
        held = 1 if axis == "steps" else 0  # the other coordinate, held at its commonest value
        common = max(set(p[held] for p in points), key=lambda v: sum(p[held] == v for p in points))
        chosen = sorted((p[1 - held], runs) for p, runs in points.items() if p[held] == common)
        if len(chosen) < 2:
            continue
        xs, lines = mean_lines(chosen, [("train", "train_acc", 1), ("test", "test_acc", 1)])
        lines.append(Line(f"limit {limit}", [math.log10(limit)] * 2, [min(lines[1].band[0]), max(lines[0].band[1])],
                          (150, 150, 150)))
        line_plot(os.path.join(rep.out, f"scaling_{axis}.png"), lines, f"AddNIST accuracy against {axis}",
                  f"{axis} (log scale; log10 in the CSV)", "accuracy", percent=True,
                  xlabels=[(x, f"{v:,}") for x, (v, _) in zip(xs, chosen)])  # the limit named in the legend
        rep.figure(f"scaling_{axis}.png", f"Train and test accuracy of complete runs against {axis} (mean ± std "
                                          f"over seeds; the gap is the distance between the lines); grey: the limit.")

# reader.json's figures, as fractions: the digit reader's, then the photo reader's (its rows name their "kind")
READER = [("both digits right", "both", 0.01), ("precision", "precision", 1), ("recall", "recall", 1),
          ("coverage", "coverage", 1), ("reader FD", "reader_fd", 1)]
PHOTO_READER = [("class right", "class", 0.01), ("class and decile right", "both", 0.01), *READER[1:]]
PANEL = [("precision", "precision", 1), ("recall", "recall", 1), ("coverage", "coverage", 1), ("FID", "fid", 1)]

def report_generator_scaling(rep, points, real):
    """Generator quality against steps (one recipe): realism and diversity, then the Fréchet distance, mean ±
    std over seeds, log x; the real images' figures (`real`, if given) as pale lines."""
    rep.line("Generator quality against steps", heading=True)
    chosen, batch = sorted((steps, runs) for (steps, _), runs in points.items()), next(iter(points))[1]
    rows = [r for _, runs in chosen for r in runs.values()]
    keys = PANEL if not all("reader_fd" in r for r in rows) else PHOTO_READER if "kind" in rows[0] else READER
    text = lambda key, scale, runs: "{:.3f} ± {:.3f}".format(*(scale * v for v in mean_std([r[key] for r in runs])))
    rep.table(f"Generator: complete runs at batch {batch} (each with its own schedule), mean ± std over seeds", [
        {"steps": f"{steps:,}", "seeds": len(runs), **{label: text(key, scale, runs.values())
                                                       for label, key, scale in keys}} for steps, runs in chosen]
        + ([{"steps": real.get("run", "real images"), "seeds": "", **{label: f"{scale * real[key]:.3f}"
                                                          for label, key, scale in keys}}] if real else []))
    for name, group in (("quality", keys[:-1]), ("fd", keys[-1:])):
        what, (xs, lines) = "realism and diversity" if name == "quality" else group[0][0], mean_lines(chosen, group)
        lines += [Line(f"real {label}", [xs[0], xs[-1]], [scale * real[key]] * 2, tuple((c + 255) // 2 for c in
                       PALETTE[i])) for i, (label, key, scale) in enumerate(group)] if real else []
        line_plot(os.path.join(rep.out, f"generator_{name}.png"), lines, f"generator {what} against steps (batch "
                  f"{batch})", "steps (log scale; log10 in the CSV)", "fraction" if name == "quality" else "distance",
                  xlabels=[(x, f"{v:,}") for x, (v, _) in zip(xs, chosen)])
        rep.figure(f"generator_{name}.png", f"Generator {what} of complete runs against steps (mean ± std over "
                                            f"seeds); pale: real images, scored alike.")

def report_generator(rep, m, folder):
    rep.line(f"Generator ({m['config']['dataset']})", heading=True)
    rep.line(penalty_line(m["params"], GENERATE_PARAM_LIMIT, m["steps"], GENERATE_STEP_LIMIT))
    rep.line(generate_row(m) + " (against the CIFAR-100 test split)")
    rep.table("Generator: the quality panel (realism, diversity, uniqueness)", [
        {"metric": k, "value": "null" if m.get(k) is None else f"{m[k]:.4g}"} for k in fid.PANEL_MEANING if k in m])
    for name, caption in (("samples.png", "64 samples, the first of the run (not cherry-picked)."),
                          ("interpolations.png", "Interpolations between 8 pairs of samples."),
                          ("neighbours.png", "The first 8 samples, then the 8 nearest to a training image, "
                                             "each with its 3 nearest training images (pixel L2).")):
        if os.path.exists(os.path.join(folder, name)):
            Image.open(os.path.join(folder, name)).save(os.path.join(rep.out, "generator_" + name), dpi=(300, 300))
            rep.figure("generator_" + name, caption)

def report_depth_study(rep, m, folder):
    rep.line(f"Depth study ({m['config']['dataset']})", heading=True)
    runs = {row["name"]: [json.load(open(path)) for path in sorted(glob.glob(os.path.join(
        glob.escape(run_folder(folder, row["name"])), "seed*", "metrics.json")))] for row in m["table"]}
    rep.table(f"Depth study: the final epoch's figures, and test accuracy of the best-validation epoch's "
              f"weights; mean ± std over {m['table'][0]['runs']} seed(s); known = published train / val %",
              [depth_row(row) for row in m["table"]])
    lines = [band_line(f"{name}, {split}", tuple(v // (1 + (split == "val")) for v in PALETTE[i % len(PALETTE)]),
                       [r["curves"] for r in per], "epoch", f"{split}_acc")
             for i, (name, per) in enumerate(runs.items()) for split in ("train", "val")]
    line_plot(os.path.join(rep.out, "depth_accuracy.png"), lines, "accuracy per epoch", "epoch", "accuracy",
              size=(1400, 700), percent=True)
    rep.figure("depth_accuracy.png", "Train and validation accuracy of every configuration (mean ± std).")
    flows = {name: list(per[0]["grad_flow"][-1].values()) for name, per in runs.items()}  # first seed, last epoch
    lines = [Line(name, [j / max(1, len(f) - 1) for j in range(len(f))], f, PALETTE[i % len(PALETTE)])
             for i, (name, f) in enumerate(flows.items())]  # by relative depth
    line_plot(os.path.join(rep.out, "depth_gradflow.png"), lines, "gradient flow at the last epoch",
              "relative depth of the layer (0 = entry, 1 = classifier)", "mean |dL/dW|", size=(1400, 700), logy=True)
    rep.figure("depth_gradflow.png", "Mean absolute gradient of every weight layer at the last epoch, entry to "
                                     "classifier: the plain 38-layer network's vanishes towards its entry.")

def report(cfg):
    """`python mm.py report`: report.md and report.tex with the tables and figures papers need."""
    named = {c: getattr(cfg, c) for c in ("classify", "generate", "gradflow") if getattr(cfg, c)}
    if not named and not cfg.scaling:
        raise UserError("name at least one finished run: --classify, --generate, --gradflow or --scaling DIR")
    for command, folder in [*named.items(), ("report", cfg.out)]:  # refused before any write
        recorded_command(folder, command)
    found = {c: json.load(open(os.path.join(d, "metrics.json"))) for c, d in named.items()
             if os.path.isfile(os.path.join(d, "metrics.json"))}
    for command in set(named) - set(found):
        print(f"{command}: {named[command]} has no metrics.json (an unfinished run); left out")
    if cfg.scaling:  # refused before any write
        found.update({f"{c}_scaling": p for c, p in scaling_points(cfg.scaling).items()})
    real = os.path.join(cfg.scaling, "real.json")  # real test images' figures
    real = json.load(open(real)) if cfg.scaling and os.path.isfile(real) else None
    if not found:
        raise UserError("none of the named runs has finished (no metrics.json); nothing to report")
    claim_folder(cfg, "report")
    rep = Report(cfg.out)
    sections = dict(classify=lambda m: report_classifier(rep, m), classify_scaling=lambda m: report_scaling(rep, m),
                    generate_scaling=lambda m: report_generator_scaling(rep, m, real),
                    generate=lambda m: report_generator(rep, m, cfg.generate),
                    gradflow=lambda m: report_depth_study(rep, m, cfg.gradflow))
    for name in [name for name in sections if name in found]:  # in order, if finished
        try:
            sections[name](found[name])
        except KeyError as e:  # a record written before mm.py reported that figure
            raise UserError(f"the {name} record has no {e}: it was written by an older mm.py; report it with "
                            f"that one (git log), or run it again with this one") from None
    with open(os.path.join(cfg.out, "report.md"), "w") as f:
        f.write("# Results\n\n" + "\n".join(rep.md))
    with open(os.path.join(cfg.out, "report.tex"), "w") as f:  # \input{report} in a paper
        f.write("% generated by `python mm.py report`; needs \\usepackage{booktabs,graphicx}\n" + "\n".join(rep.tex))
    print(f"wrote {cfg.out}/report.md, report.tex and the figures (PNG at 300 dpi, their numbers in CSVs)")
    return rep

# ---------------------------------------------------------------------------------------------
# Bench: each command's training step, the sampler and the Inception features on this device

@dataclass
class BenchConfig:
    out: str = "runs/bench"  # folder for bench.json
    repeats: int = 10  # timed repetitions of each measurement, after 3 untimed warm-up ones
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 on Ampere+ GPUs, fp16 on older ones, fp32 on CPU) | fp32 | bf16 | fp16
    deterministic: bool = True  # GPU: deterministic kernels (--no-deterministic: cuDNN's fastest)

def time_call(fn, hw, repeats):
    """Seconds per call: 3 untimed calls absorb compilation and cuDNN's search, then `repeats` timed ones."""
    sync = torch.cuda.synchronize if hw.device.type == "cuda" else (lambda: None)
    for i in range(3 + repeats):
        if i == 3:
            sync()
            t0 = time.perf_counter()
        fn()
    sync()
    return (time.perf_counter() - t0) / repeats

def train_step(model, loss_fn, hw):
    """One optimiser step of `model` on fixed data: the loops' update without their bookkeeping."""
    model.to(hw.device, memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters())
    def step():
        with autocast(hw):
            loss = loss_fn(model)
        opt.zero_grad(set_to_none=True)
        loss.float().backward()
        opt.step()
    return step

def bench(cfg):
    """`python mm.py bench`: time default training steps, the sampler and Inception; bench.json."""
    check_numbers(cfg)
    claim_folder(cfg, "bench")
    hw = pick_hardware(cfg)
    dev, c, g, v = hw.device, ClassifyConfig(), GenerateConfig(), GradflowConfig()
    torch.manual_seed(0)
    batch = lambda n, side, classes: (torch.randn(n, 3, side, side, device=dev),
                                      torch.randint(0, classes, (n,), device=dev))
    (x, y), (xg, yg), (xv, yv) = batch(c.batch_size, 28, 20), batch(g.batch_size, 32, 100), batch(100, 32, 100)
    unet, n_sample, n_fid = make_unet(g), *((1000, 200) if dev.type == "cuda" else (8, 10))  # a CPU is slow
    z, labels = torch.randn(n_sample, 3, 32, 32, device=dev), torch.arange(n_sample, device=dev) % 100
    inception = fid.FIDInceptionV3().eval().to(dev)  # random weights: the same work
    images = torch.randint(0, 256, (n_fid, 3, 32, 32), dtype=torch.uint8)
    rows = [("classify", f"train step, batch {c.batch_size}", c.steps, 1, train_step(DigitSumNet(c.arch), lambda m:
             F.cross_entropy(m(augment_digits(x, c, -0.42)).float(), y), hw)),
            ("generate", f"train step, batch {g.batch_size} x {g.noise_draws} noise levels", g.steps, 1,
             train_step(unet, lambda m: edm_loss(m, xg, yg, g), hw)),
            ("gradflow", "VGG_38 train step, batch 100", v.epochs * 475, 1,
             train_step(VGG(38), lambda m: F.cross_entropy(m(xv).float(), yv), hw)),
            ("generate", f"sampler, NFE {nfe(g)}, {n_sample} images", g.fid_samples, n_sample,
             lambda: edm_heun_sampler(unet.eval(), z, unet.class_embed(labels), g.sampler_steps, g.guidance, hw)),
            ("fid", f"Inception features, {n_fid} images", 2 * g.fid_samples, n_fid,
             lambda: fid.inception_features(images, inception, quiet=True))]
    rows = [dict(command=command, what=what, count=count,
                 seconds_each=time_call(fn, hw, cfg.repeats if n == 1 else max(1, cfg.repeats // 5)) / n)
            for command, what, count, n, fn in rows]
    print(f"\nspeed on {dev} ({torch.cuda.get_device_name() if dev.type == 'cuda' else 'CPU'}), {hw.precision}")
    print_table([{"command": r["command"], "what": r["what"], "ms each": f"{1000 * r['seconds_each']:.1f}",
                  "per second": f"{1 / r['seconds_each']:,.1f}", "count": f"{r['count']:,}",
                  "time for the count": fmt_time(r["seconds_each"] * r["count"])} for r in rows])
    save_json(os.path.join(cfg.out, "bench.json"), {"command": "bench", "device": str(dev), "rows": rows,
                                                    "mixed_precision": hw.precision, "torch": torch.__version__})
    print(f"wrote {cfg.out}/bench.json (count: the steps of a full run, or the samples / images FID needs)")

# ---------------------------------------------------------------------------------------------
# Command line: argparse subcommands built from the config dataclasses, so --help lists every knob

CHOICES = {"train_on": ("train", "train+valid"), "depth": (8, 38), "dataset": tuple(data.CIFAR),
           "device": ("auto", "cpu", "cuda"), "precision": ("auto", "fp32", "bf16", "fp16")}
COMMANDS = {"classify": (ClassifyConfig, classify, "train the AddNIST classifier under its budget"),
            "generate": (GenerateConfig, generate, "train the CIFAR-100 diffusion model under its budget, score it"),
            "gradflow": (GradflowConfig, gradflow, "depth study: VGG_08 vs VGG_38 on CIFAR-100, gradient flow"),
            "report": (ReportConfig, report, "report.md and report.tex from the folders of finished runs"),
            "bench": (BenchConfig, bench, "time each command's training step, the sampler and Inception")}

def field_help(cls):
    """{field: its trailing comment}, from the dataclass sources: help and code never drift."""
    source = "".join(inspect.getsource(c) for c in cls.__mro__ if c is not object)
    return dict(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.+)$", source, flags=re.M))

def main(argv=None):
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    shared = {f.name for f in fields(RunConfig)}  # listed after each command's own flags
    for name, (cls, _, text) in COMMANDS.items():
        command, helps = sub.add_parser(name, help=text, description=text), field_help(cls)
        for f in sorted(fields(cls), key=lambda f: f.name in shared):  # a --flag per field: type, default, comment
            flag, shown = "--" + f.name.replace("_", "-"), "empty" if f.default == "" else "%(default)s"
            if f.type is bool:
                command.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                                     help=f"{helps[f.name]} (default: {'on' if f.default else 'off'})")
            else:
                command.add_argument(flag, type=f.type, default=f.default, choices=CHOICES.get(f.name),
                                     metavar=f.name.upper(),
                                     help=f"{helps[f.name]} (default: {shown})")
    args = vars(parser.parse_args(argv))
    cls, run_command, _ = COMMANDS[args.pop("command")]
    for s in (signal.SIGINT, signal.SIGTERM):  # the first asks the loop to stop at a step boundary
        signal.signal(s, on_signal)
    try:
        run_command(cls(**args))
    except UserError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:  # a second Ctrl-C: no new checkpoint, the last complete one stands
        sys.exit("error: aborted by a second Ctrl-C; the last checkpoint written stands (--resume continues it)")

if __name__ == "__main__":
    main()
