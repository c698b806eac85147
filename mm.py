"""Minimal Mastery: small-budget vision in one readable module.

    pip install -r requirements.txt
    python mm.py classify                  # AddNIST classifier: < 100,000 parameters, <= 10,000 steps
    python mm.py classify --runs 5         # five seeds, then a mean ± std table
    python mm.py classify --help           # every knob, with its default
    python mm.py generate                  # CIFAR-100 diffusion: < 1,000,000 parameters, <= 50,000 steps
    python mm.py gradflow --compare        # depth study: why VGG_38 fails, and BN / residual fixes
    python mm.py bench                     # ms per training step, sampler and Inception img/s on this device
    python mm.py report --classify runs/classify --generate runs/generate --gradflow runs/gradflow

Reading order: configs -> training utilities (the run plumbing every command shares) -> classifier ->
classifier training -> diffusion -> diffusion training -> depth study -> speed benchmark -> report -> figures
-> CLI.
"""
import argparse
import contextlib
import inspect
import json
import math
import os
import re
import signal
import sys
import tempfile
import time
from collections import OrderedDict, namedtuple
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

import data
import fid
from data import UserError, fmt_time

# ---------------------------------------------------------------------------------------------
# Configs: one dataclass per command; the trailing comment on each field is its --help text.
# Beside each, the range of every number (checked once, before any work) and the fields a resumed run
# may change (all others change the trajectory, so a checkpoint must have been trained with them).

CLASSIFY_PARAM_LIMIT = 100_000  # classifier: fewer than this many parameters (coursework rule)
CLASSIFY_STEP_LIMIT = 10_000  # classifier: at most this many optimisation steps (coursework rule)
GENERATE_PARAM_LIMIT = 1_000_000  # generator: fewer than this many trained parameters (coursework rule)
GENERATE_STEP_LIMIT = 50_000  # generator: at most this many optimisation steps (coursework rule)


@dataclass
class ClassifyConfig:
    # data and output
    data_dir: str = ""  # dataset cache root (empty: $MM_DATA, else ./data)
    out: str = "runs/classify"  # results folder: config.json, metrics.json, accuracy.png, run*/ckpt.pt
    # budget
    steps: int = 10_000  # optimisation steps per run (budget: at most 10,000)
    allow_penalty: bool = False  # train over a budget anyway and print the coursework penalty
    # model
    model: str = "digits"  # digits: a shared digit CNN per channel, sum by convolution | plain: one CNN on all 3
    arch: str = "32,M,48,M,64,96"  # 3x3 conv/BN/ReLU widths; M = 2x2 max pool, S48 = stride-2 conv, R64 = residual pair
    head: str = "gap"  # gap: global average pool + linear | flatten: the whole final map + linear (more params)
    dropout: float = 0.0  # dropout before the digit head's linear layer
    # optimisation
    batch_size: int = 128  # AddNIST images per step (3 digits each); README ablation: 64 vs 128 vs 256
    lr: float = 2e-3  # peak AdamW learning rate
    weight_decay: float = 5e-2  # AdamW decoupled weight decay on conv/linear weights
    warmup: int = 300  # steps of linear warm-up, then cosine decay to 0
    ema: float = 0.999  # decay of the evaluated weight average (0 = raw weights); warm-up reaches 0.999 at step 8,990
    label_smoothing: float = 0.05  # training loss only (true sum: 1 - 0.05 + 0.05/20); reported losses are plain CE
    train_on: str = "train+valid"  # train+valid (60,000 images) | train (45,000); the test split is never trained on
    # augmentation, drawn independently for every digit (channel); no flips, they change digits
    shift: int = 2  # max translation, whole pixels (a pure shift then resamples exactly, no blur)
    rotate: float = 10.0  # max rotation, degrees
    zoom: float = 0.1  # max relative zoom in or out
    elastic: float = 1.5  # std of a smooth random displacement field, pixels (elastic distortion; 0 = off)
    aug_decay: bool = True  # rotation, zoom and elastic strength fall linearly to 0 over training (shifts stay)
    # runs, evaluation, hardware
    runs: int = 1  # independent runs with seeds seed, seed+1, ...
    seed: int = 0  # seed of the first run
    eval_every: int = 500  # steps between evaluations (train subset + full test set)
    eval_train: int = 10_000  # train images scored at each periodic evaluation (all of them at the end)
    tta: bool = True  # final figures average the image and its 4 one-pixel shifts (no params, no steps)
    log_every: int = 100  # steps between progress lines
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 on GPUs with fast bf16, fp16 on older GPUs, fp32 on CPU) | fp32 | bf16 | fp16
    deterministic: bool = True  # GPU: deterministic kernels, so seeded runs repeat (--no-deterministic: faster)
    resume: bool = False  # continue the runs checkpointed in --out instead of refusing to overwrite them
    pause_at: int = 0  # stop cleanly (checkpointed) once this many steps are done; 0 = run to the end


CLASSIFY_BOUNDS = {"steps": "[1, inf)", "dropout": "[0, 1)", "batch_size": "[1, inf)", "lr": "(0, inf)",
                   "weight_decay": "[0, inf)", "warmup": "[0, inf)", "ema": "[0, 1)", "label_smoothing": "[0, 1)",
                   "shift": "[0, 13]", "rotate": "[0, 180]", "zoom": "[0, 1)", "elastic": "[0, inf)",
                   "runs": "[1, inf)", "seed": "[0, 1e9]", "eval_every": "[1, inf)", "eval_train": "[1, inf)",
                   "log_every": "[1, inf)", "pause_at": "[0, inf)"}


@dataclass
class GradflowConfig:
    # data and output
    data_dir: str = ""  # dataset cache root (empty: $MM_DATA, else ./data)
    out: str = "runs/gradflow"  # results folder: one sub-folder per configuration and seed, plus metrics.json
    # the network (the coursework's VGG framework)
    depth: int = 38  # 8 (0 processing blocks per stage) or 38 (5 per stage); 3 stages of 32 filters
    bn: bool = False  # BatchNorm after every conv, before its activation
    residual: bool = False  # identity skip around every processing block (He et al. 2016)
    compare: bool = False  # run the five reference configurations in turn and print the comparison table
    # optimisation
    epochs: int = 100  # passes over the 47,500 training images
    batch_size: int = 100  # images per step
    lr: float = 1e-3  # Adam learning rate at the start; cosine annealing per epoch down to min_lr
    min_lr: float = 2e-5  # cosine floor, as CosineAnnealingLR: min_lr + (lr - min_lr)(1 + cos(pi e/epochs))/2
    val_size: int = 2_500  # training images held out for validation (seeded permutation)
    # runs, hardware
    runs: int = 1  # independent runs with seeds seed, seed+1, ...
    seed: int = 0  # seed of the first run
    log_every: int = 100  # steps between progress lines
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 on GPUs with fast bf16, fp16 on older GPUs, fp32 on CPU) | fp32 | bf16 | fp16
    deterministic: bool = True  # GPU: deterministic kernels, so seeded runs repeat (--no-deterministic: faster)
    resume: bool = False  # continue the runs checkpointed in --out instead of refusing to overwrite them
    pause_at: int = 0  # stop cleanly (checkpointed) once this many epochs are done; 0 = run to the end


GRADFLOW_BOUNDS = {"epochs": "[1, inf)", "batch_size": "[1, inf)", "lr": "(0, inf)", "min_lr": "[0, inf)",
                   "val_size": "[1, inf)", "runs": "[1, inf)", "seed": "[0, 1e9]", "log_every": "[1, inf)",
                   "pause_at": "[0, inf)"}


@dataclass
class GenerateConfig:
    # data and output
    data_dir: str = ""  # dataset cache root (empty: $MM_DATA, else ./data)
    out: str = "runs/generate"  # results folder: samples, interpolations, neighbours, metrics, checkpoint (README)
    # budget
    steps: int = 50_000  # optimisation steps (budget: at most 50,000)
    allow_penalty: bool = False  # train over a budget anyway and print the coursework penalty
    # network (EDM-preconditioned U-Net)
    widths: str = "32,64,80"  # channels at the 32, 16 and 8 pixel levels, multiples of 8 (997,123 parameters in all)
    blocks: int = 1  # residual blocks per level, down and up
    emb_dim: int = 128  # width of the noise-level + class embedding every block uses (a multiple of 4)
    dropout: float = 0.1  # dropout inside residual blocks
    # training (Karras et al. 2022)
    batch_size: int = 256  # images per step
    lr: float = 1e-3  # peak Adam learning rate
    warmup: int = 1000  # steps of linear warm-up, then cosine decay to 0
    ema: float = 0.9995  # decay of the weight average that samples are drawn from
    sigma_data: float = 0.5  # standard deviation of the data, for the preconditioning
    p_mean: float = -1.2  # mean of ln σ during training
    p_std: float = 1.2  # standard deviation of ln σ during training
    p_uncond: float = 0.1  # probability of dropping the class label (trains the unconditional model too)
    flip: bool = True  # random horizontal flips (right for CIFAR objects; --no-flip for the digit stand-in)
    # sampling
    sampler_steps: int = 18  # Heun steps (NFE = 2 steps - 1, doubled when guidance != 1)
    guidance: float = 1.0  # classifier-free guidance scale w (1 = plain conditional)
    fid_samples: int = 10_000  # samples drawn for FID and samples.npz (at least 64 are drawn, for the grid)
    sample_batch: int = 1000  # samples per sampler call
    sample_every: int = 5000  # steps between progress.png grids (and checkpoints)
    log_every: int = 100  # steps between progress lines
    # runs, hardware
    seed: int = 0  # seeds batches, noise and samples
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 on GPUs with fast bf16, fp16 on older GPUs, fp32 on CPU) | fp32 | bf16 | fp16
    deterministic: bool = True  # GPU: deterministic kernels, so seeded runs repeat (--no-deterministic: faster)
    compile: str = "auto"  # torch.compile the training forward: auto (on for CUDA) | on | off
    resume: bool = False  # continue the run checkpointed in --out
    sample_only: bool = False  # skip training: regenerate every output from --ckpt (or OUT/ckpt.pt)
    pause_at: int = 0  # stop cleanly (checkpointed) once this many steps are done; 0 = run to the end
    ckpt: str = ""  # checkpoint to load (empty: OUT/ckpt.pt)


GENERATE_BOUNDS = {"steps": "[1, inf)", "blocks": "[1, 8]", "emb_dim": "[4, 4096]", "dropout": "[0, 1)",
                   "batch_size": "[1, inf)", "lr": "(0, inf)", "warmup": "[0, inf)", "ema": "[0, 1)",
                   "sigma_data": "(0, inf)", "p_std": "(0, inf)", "p_uncond": "[0, 1]", "sampler_steps": "[1, 1000]",
                   "guidance": "[0, inf)", "fid_samples": "[2, inf)", "sample_batch": "[1, inf)",
                   "sample_every": "[1, inf)", "log_every": "[1, inf)", "seed": "[0, 1e9]", "pause_at": "[0, inf)"}

# Fields that a --resume may change: where files go, how often to print, hardware. Every other field
# shapes the trajectory (or the record of it), so a checkpoint is only continued with the values it was
# trained with. generate's sampling knobs only act after training, so --sample-only may change them too.
RESUME_FREE = {
    "classify": {"data_dir", "out", "allow_penalty", "runs", "eval_every", "log_every", "device", "precision",
                 "deterministic", "resume", "pause_at"},
    "gradflow": {"data_dir", "out", "compare", "runs", "log_every", "device", "precision", "deterministic",
                 "resume", "pause_at"},
    "generate": {"data_dir", "out", "allow_penalty", "sampler_steps", "guidance", "fid_samples", "sample_batch",
                 "sample_every", "log_every", "device", "precision", "deterministic", "compile", "resume",
                 "sample_only", "pause_at", "ckpt"},
}
CHOICES = {"model": ("digits", "plain"), "head": ("gap", "flatten"), "train_on": ("train", "train+valid"),
           "device": ("auto", "cpu", "cuda"), "depth": (8, 38), "precision": ("auto", "fp32", "bf16", "fp16"),
           "compile": ("auto", "on", "off")}

# ---------------------------------------------------------------------------------------------
# Training utilities: the run plumbing every command shares. Each helper is called visibly from the
# loops below (nanoGPT's loop is the model): check the config and the run folder, seed each step, set
# the lr, print progress, stop or pause at a checkpoint, print the results table.

def check_bounds(cfg, bounds):
    """One-line error for the first field outside its interval, e.g. "[0, 1)" (brackets: bound included)."""
    for name, interval in bounds.items():
        value = getattr(cfg, name)
        lo_text, hi_text = interval[1:-1].split(",")
        lo, hi = float(lo_text), float(hi_text)
        above = value >= lo if interval[0] == "[" else value > lo
        below = value <= hi if interval[-1] == "]" else value < hi
        if not (above and below):
            raise UserError(f"--{name.replace('_', '-')} must lie in {interval}, got {value}")


def budget_penalty(value, limit, inclusive):
    """Coursework penalty in marks: 5 for every 10 % (or part of it) over the limit, 5 at the limit if strict."""
    over = value - limit
    if over < 0 or (over == 0 and inclusive):
        return 0
    return 5 * max(1, -(-over * 10 // limit))  # ceil(over / (10 % of limit)), in integers


def enforce_budget(name, value, limit, inclusive, allow_penalty):
    """Print the count against its limit; refuse it when over unless the user accepts the penalty."""
    rule = f"at most {limit:,}" if inclusive else f"under {limit:,}"
    print(f"> {name} {value} (budget: {rule})")
    penalty = budget_penalty(value, limit, inclusive)
    if penalty and not allow_penalty:
        raise UserError(f"{name.lower()} {value:,} breaks the budget ({rule}); reduce it, "
                        f"or pass --allow-penalty to accept the coursework penalty of -{penalty} marks")
    if penalty:
        print(f"! over budget: {name.lower()} {value:,} costs -{penalty} marks under the coursework rules")
    return penalty


def count_params(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


Hardware = namedtuple("Hardware", "device precision")  # torch.device and "fp32" | "bf16" | "fp16"


def pick_hardware(cfg):
    """Device, mixed precision and determinism for a run, printed once.

    bf16 autocast where the GPU has fast bf16 (Ampere and newer); older GPUs (T4, V100) get fp16 with a
    GradScaler; the CPU trains in fp32 (bf16 convolutions are slow there). Deterministic kernels make a
    seeded GPU run repeat exactly (the CPU always does); --no-deterministic lets cuDNN pick faster ones.
    """
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu")
    device = torch.device("cuda" if cfg.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    precision = cfg.precision
    if precision == "auto" and device.type == "cuda":
        precision = "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    elif precision == "auto":
        precision = "fp32"
    if device.type == "cuda":
        torch.backends.cudnn.deterministic = cfg.deterministic
        torch.backends.cudnn.benchmark = not cfg.deterministic
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs this for repeatable matmuls
        torch.use_deterministic_algorithms(cfg.deterministic, warn_only=True)  # warn, never fail, on the rest
    print(f"device {device} | precision {precision} | deterministic {cfg.deterministic or device.type == 'cpu'}")
    return Hardware(device, precision)


def autocast(hw):
    """Mixed precision for the forward pass (fp32: off). Losses and scores are always computed in float32."""
    if hw.precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(hw.device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[hw.precision])


def grad_scaler(hw):
    """fp16 gradients underflow without loss scaling; bf16 and fp32 need none (then the scaler is a no-op)."""
    return torch.amp.GradScaler(hw.device.type, enabled=hw.precision == "fp16")


def mean_std(values):
    """Mean and sample standard deviation (n-1; 0 for a single value), as the coursework reports."""
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def save_json(path, obj):
    """Write JSON atomically (a .tmp file renamed into place): a reader never sees half a file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


LAST_CHECKPOINT = {}  # path and step of the newest checkpoint written, for the message of an abort


def save_checkpoint(path, state):
    """Atomic save: an interrupted write never clobbers the previous checkpoint."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)
    LAST_CHECKPOINT.update(path=path, step=state.get("step", state.get("epoch")))


def load_checkpoint(path, command, cfg=None):
    """A checkpoint of `command`, loaded to the CPU (the caller moves what it needs), checked against cfg.

    Every config field outside RESUME_FREE must equal the one it was trained with, or the resumed run
    would follow another schedule than its record says; the differing flags are named in the error.
    """
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain data only
    except Exception as e:  # truncated, empty, not a torch file, or holding arbitrary objects
        raise UserError(f"{path} is not a checkpoint of `mm.py {command}` ({type(e).__name__}); "
                        f"point at one it wrote, or start a new run") from None
    if not isinstance(ck, dict) or ck.get("command") != command:
        raise UserError(f"{path} is not a checkpoint of `mm.py {command}`; point at one it wrote, or start a new run")
    if cfg is not None:
        # a field newer than the checkpoint was not there when it trained: it ran with that field's default
        trained = {**asdict(type(cfg)()), **ck["config"]}
        differ = [k for k in asdict(cfg) if k not in RESUME_FREE[command] and trained[k] != getattr(cfg, k)]
        if differ:
            flags = lambda values: " ".join(f"--{k.replace('_', '-')} {values[k]}" for k in differ)
            raise UserError(f"{path} was trained with {flags(trained)}, not {flags(asdict(cfg))}; resume with the "
                            f"values it was trained with, or start a new --out")
    return ck


def check_out(out, has_run, resume=False):
    """Before any work: --out must be writable, and hold a run exactly when --resume asks to continue one.

    Nothing is created here (a refused call leaves no trace); a probe file is made and removed in the
    nearest folder that exists.
    """
    folder = os.path.abspath(out)
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    try:
        if not os.path.isdir(folder):
            raise NotADirectoryError(f"{folder} is a file")
        os.close(os.open(probe := os.path.join(folder, f".mm-write-test-{os.getpid()}"), os.O_CREAT | os.O_WRONLY))
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write results under --out {out} ({e.strerror or e}); choose a folder you can "
                        f"write to") from None
    if has_run and not resume:
        raise UserError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    if resume and not has_run:
        raise UserError(f"--resume: {out} holds no checkpoint to continue; leave out --resume to start a run")


def holds_checkpoint(folder):
    return any("ckpt.pt" in files for _, _, files in os.walk(folder))


STEP_SEED_STRIDE = 1_000_003  # a prime above any step count: (seed, step) -> seed * stride + step never collides


def seed_step(seed, step):
    """All randomness of a step (augmentation, noise, dropout) from (seed, step) alone: exact resume."""
    torch.manual_seed(seed * STEP_SEED_STRIDE + step)


def get_lr(step, cfg):
    """Linear warm-up to cfg.lr, then cosine decay to 0 at cfg.steps."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def set_lr(opt, lr):
    for group in opt.param_groups:
        group["lr"] = lr
    return lr


class EpochSampler:
    """Batch indices for any step, from (seed, epoch) alone: a resumed run draws exactly the same batches."""

    def __init__(self, n, batch_size, seed, device):
        if n < batch_size:
            raise UserError(f"--batch-size {batch_size} is larger than the {n} training images")
        self.n, self.batch_size, self.seed, self.device = n, batch_size, seed, device
        self.per_epoch, self.epoch, self.perm = n // batch_size, -1, None  # drop the ragged last batch

    def __call__(self, step):
        epoch, i = divmod(step, self.per_epoch)
        if epoch != self.epoch:
            g = torch.Generator().manual_seed(self.seed * STEP_SEED_STRIDE + epoch)
            self.epoch, self.perm = epoch, torch.randperm(self.n, generator=g).to(self.device)
        return self.perm[i * self.batch_size:(i + 1) * self.batch_size]


def ema_decay(limit, step):
    """(1 + step)/(10 + step), capped at `limit`: early on, the average would mostly remember the random
    initial weights, so its memory starts short (0.1 at step 0, 0.9 at step 80) and grows to the limit."""
    return min(limit, (1 + step) / (10 + step))


def describe_ema(limit, steps):
    """One line saying which decay the EMA really reaches in a run of `steps` steps. The warm-up reaches
    decay d at step (10d - 1)/(1 - d): 0.999 at step 8,990, 0.9995 only at step 17,990. So in a
    10,000-step run a limit above 0.9991 is never reached, and the line says so rather than let the
    flag look as if it averaged longer. An EMA with decay d remembers about 1/(1 - d) steps."""
    if limit == 0:
        return "EMA off (--ema 0): the raw weights are evaluated"
    last = ema_decay(limit, steps - 1)
    if last < limit:
        return (f"EMA decay {limit} is not reached in {steps:,} steps: the warm-up (1+t)/(10+t) ends at "
                f"{last:.6g}, a memory of about {1 / (1 - last):,.0f} steps")
    reached = next(t for t in range(steps) if ema_decay(limit, t) >= limit)
    return (f"EMA decay {limit}, reached at step {reached:,} by the warm-up (1+t)/(10+t): a memory of about "
            f"{1 / (1 - limit):,.0f} steps")


@torch.no_grad()
def ema_update(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, over weights and BN statistics (Polyak averaging).

    One fused _foreach_lerp_ over all float tensors (one kernel launch per group, not per tensor);
    integer buffers (BN's batch counter) are copied.
    """
    ema_floats, model_floats = [], []
    for e, m in zip(ema.state_dict().values(), model.state_dict().values()):
        if e.dtype.is_floating_point:
            ema_floats.append(e)
            model_floats.append(m)
        else:
            e.copy_(m)
    torch._foreach_lerp_(ema_floats, model_floats, 1 - decay)


def stop_point(pause_at, done, total, unit="step"):
    """Where this call stops: --pause-at if given, else the end. A pause at or before the checkpoint is
    refused: it would rewrite the checkpoint's counter below the steps its weights have taken."""
    if pause_at and pause_at <= done:
        raise UserError(f"--pause-at {pause_at:,} is not after the checkpoint's {unit} {done:,}; pass a later "
                        f"{unit}, or leave it out to run to the end")
    return min(pause_at or total, total)


def interrupted(done, ckpt_path, cfg, unit="step"):
    return UserError(f"interrupted after {unit} {done:,}; checkpoint saved in {ckpt_path}, continue with "
                     f"--resume --out {cfg.out}")


class StopFlag:
    """First Ctrl-C (or SIGTERM) asks the loop to stop at the next step boundary; a second one aborts.

    The loops check `stop` after every step and leave through a checkpoint (gradflow's are per epoch).
    """

    def __enter__(self):
        self.stop = False
        self.old = {s: signal.signal(s, self.handler) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def handler(self, signum, frame):
        if self.stop:
            raise KeyboardInterrupt
        self.stop = True
        print("\nstopping after this step (Ctrl-C again to abort without saving)", flush=True)

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)


class Progress:
    """The progress line: `step   100/10000 | loss 0.4321 | lr 1.0e-03 | 3.2 ms/step | eta 0:31`.

    ms/step is measured over the steps since the previous line, or since `restart` (called after an
    evaluation, so that its time is not counted as training); the ETA covers the steps left to `end`.
    """

    def __init__(self, total, end, done):
        self.total, self.end, self.width = total, end, len(str(total))
        self.restart(done)

    def restart(self, done):
        self.t, self.done = time.time(), done

    def line(self, done, **values):
        ms = 1000 * (time.time() - self.t) / max(1, done - self.done)
        shown = "".join(f" | {name.replace('_', ' ')} {value}" for name, value in values.items())
        print(f"step {done:{self.width}d}/{self.total}{shown} | {ms:.1f} ms/step | "
              f"eta {fmt_time(ms * (self.end - done) / 1000)}", flush=True)
        self.restart(done)


def print_table(rows):
    """Rows of equal-keyed dicts (values already formatted as text) -> an aligned table under its header."""
    keys = list(rows[0])
    widths = [max(len(k), *(len(str(r[k])) for r in rows)) for k in keys]
    print("  ".join(k.rjust(w) for k, w in zip(keys, widths)))
    for r in rows:
        print("  ".join(str(r[k]).rjust(w) for k, w in zip(keys, widths)))


def percent(mean_and_std):
    return "{:.2f} ± {:.2f}".format(*(100 * v for v in mean_and_std))


TTA_SHIFTS = ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1))  # (dy, dx) pixel shifts scored by --tta


@torch.no_grad()
def score_batches(model, x, y, tta=False, batch_size=1000):
    """Summed cross-entropy (float64) and count of correct answers over all of (x, y), as device tensors.

    Scored in float32 whatever the training precision, so a reported accuracy does not depend on the GPU.
    With tta, the class probabilities are averaged over the image and its four one-pixel shifts.
    MNIST digits sit inside a blank 4-pixel border, so torch.roll shifts them without wrapping ink.
    """
    model.eval()
    loss = torch.zeros((), dtype=torch.float64, device=x.device)  # summed in float64, as Python floats were
    correct = torch.zeros((), dtype=torch.int64, device=x.device)
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        views = [torch.roll(xb, s, dims=(2, 3)) for s in TTA_SHIFTS] if tta else [xb]
        logp = torch.stack([model(v).float().log_softmax(1) for v in views])  # (views, B, classes)
        logp = torch.logsumexp(logp, 0) - math.log(len(views))  # log of the mean probability
        loss += F.nll_loss(logp, yb, reduction="sum").double()
        correct += (logp.argmax(1) == yb).sum()
    return loss, correct


def evaluate(model, x, y, tta=False, batch_size=1000):
    """Mean cross-entropy and accuracy of `model` in eval mode over (x, y): one host sync per evaluation."""
    loss, correct = score_batches(model, x, y, tta, batch_size)
    return loss.item() / len(x), correct.item() / len(x)


# ---------------------------------------------------------------------------------------------
# Classifier: a shared digit CNN whose three digit distributions are combined into a sum distribution

class ResidualPair(nn.Module):
    """x + BN(conv(ReLU(BN(conv(x))))), then ReLU: the basic block of He et al. 2016 at a fixed width."""

    def __init__(self, width):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True), nn.Conv2d(width, width, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(width))

    def forward(self, x):
        return F.relu(x + self.body(x))


def conv_trunk(arch, in_ch, n_out, dropout=0.0, size=28, head="gap"):
    """VGG-style spec '32,M,64' -> 3x3 conv/BN/ReLU layers and 2x2 max pools, then a head: global average
    pool + linear (head="gap"), or flatten the final (channels, side, side) map + linear (head="flatten").

    Tokens: a width w is a 3x3 conv to w channels; M halves the map with a 2x2 max pool; Sw is a stride-2
    3x3 conv to w channels (a learned downsampling); Rw is a residual pair of convs at the current width w.
    `size` is the input's side; it is tracked to size the flatten head and to refuse a spec that shrinks
    the map below one pixel.
    """
    layers, channels = [], in_ch
    for token in arch.upper().replace(" ", "").split(","):
        kind, width = (token[0], token[1:]) if token[:1] in ("S", "R") else ("C", token)
        if token == "M":
            size //= 2  # a 2x2 pool floors: 7 -> 3
        elif kind == "S":
            size = (size - 1) // 2 + 1  # a stride-2 3x3 conv with padding 1 rounds up: 7 -> 4
        if size < 1:
            raise UserError(f"--arch {arch}: its downsamplings shrink the 28x28 input below 1 pixel")
        if token == "M":
            layers.append(nn.MaxPool2d(2))
        elif not (width.isdigit() and 0 < int(width) <= 4096) or (kind == "R" and int(width) != channels):
            raise UserError(f"--arch {arch}: {token!r} is not a width 1..4096, M, Sw or Rw (Rw needs w = the width "
                            f"before it), e.g. 32,M,64,R64,M,96")
        elif kind == "R":
            layers.append(ResidualPair(channels))
        else:
            stride = 2 if kind == "S" else 1
            layers += [nn.Conv2d(channels, int(width), 3, stride, padding=1, bias=False), nn.BatchNorm2d(int(width)),
                       nn.ReLU(inplace=True)]
            channels = int(width)
    pool = [nn.AdaptiveAvgPool2d(1)] if head == "gap" else []  # (N, C, s, s) -> (N, C, 1, 1)
    features = channels if head == "gap" else channels * size * size
    drop = [nn.Dropout(dropout)] if dropout > 0 else []
    return nn.Sequential(*layers, *pool, nn.Flatten(), *drop, nn.Linear(features, n_out))


# SUM_MASK[k, i] = 0 where the digit triple i = (a, b, c) (flattened) sums to k + 1, else -inf.  (20, 1000)
TRIPLE_SUMS = (torch.arange(10)[:, None, None] + torch.arange(10)[None, :, None] + torch.arange(10)).flatten()
SUM_MASK = torch.where(TRIPLE_SUMS[None, :] == torch.arange(1, 21)[:, None], 0.0, -math.inf)


def sum_log_probs(digit_logits, mask=SUM_MASK):
    """log P(r + g + b = s) for s = 1..20 from per-channel digit logits (B, 3, 10) -> (B, 20).

    The channels are independent digits, so P(sum = s) = sum over a+b+c=s of p_r(a) p_g(b) p_b(c):
    a discrete convolution of the three distributions, done in log space (logsumexp) for stability.
    Only sums 1..20 are AddNIST classes (label = sum - 1); cross-entropy over these 20 renormalises
    away the impossible sums 0 and 21..27.
    """
    lp = digit_logits.float().log_softmax(-1)  # (B, 3, 10)
    joint = lp[:, 0, :, None, None] + lp[:, 1, None, :, None] + lp[:, 2, None, None, :]  # (B, 10, 10, 10)
    return torch.logsumexp(joint.flatten(1)[:, None, :] + mask.to(joint.device), dim=-1)  # (B, 20)


class DigitSumNet(nn.Module):
    """One digit network shared by the three channels; outputs log P(sum) over the 20 AddNIST classes."""

    def __init__(self, arch, dropout=0.0, head="gap"):
        super().__init__()
        self.digit = conv_trunk(arch, in_ch=1, n_out=10, dropout=dropout, head=head)
        self.register_buffer("sum_mask", SUM_MASK.clone(), persistent=False)  # follows .to(device), not saved

    def forward(self, x):  # (B, 3, 28, 28) -> (B, 20)
        B = x.shape[0]
        logits = self.digit(x.reshape(B * 3, 1, *x.shape[2:]))  # every digit through the same weights
        return sum_log_probs(logits.view(B, 3, 10), self.sum_mask)


def make_classifier(cfg):
    if cfg.model == "digits":
        return DigitSumNet(cfg.arch, cfg.dropout, cfg.head)
    # the plain baseline: one CNN sees all three digits at once
    return conv_trunk(cfg.arch, in_ch=3, n_out=20, dropout=cfg.dropout, head=cfg.head)


def augment_digits(x, cfg, background, strength=1.0):
    """Random rotation, zoom, shift and elastic distortion of every digit (channel) on its own.

    (B, 3, H, W) -> same. One warp per digit through grid_sample, in a single batched call: an affine
    map plus, optionally, a smooth random displacement field, the elastic distortion that Simard et al.
    (2003, "Best practices for CNNs applied to visual document analysis") found to help most on MNIST.
    Their field is Gaussian-smoothed noise; ours is 5x5 noise upsampled bilinearly, which is smooth
    in the same way and cheaper. The empty canvas of the normalised data is `background`, not 0, so it
    is subtracted before warping and added back after. `strength` scales rotation, zoom and elastic
    (not the whole-pixel shifts), for a schedule that is strong early and weak late.
    """
    B, C, H, W = x.shape
    n = B * C
    u = lambda: torch.rand(n, device=x.device) * 2 - 1  # uniform in [-1, 1], one per digit
    angle = u() * math.radians(cfg.rotate * strength)
    scale = 1 + u() * cfg.zoom * strength
    shift = lambda: torch.randint(-cfg.shift, cfg.shift + 1, (n,), device=x.device)  # whole pixels
    tx, ty = shift() * 2 / W, shift() * 2 / H  # pixels -> [-1, 1] grid units
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)  # (n, 2, 3)
    grid = F.affine_grid(theta, (n, 1, H, W), align_corners=False)  # (n, H, W, 2), x then y, in [-1, 1]
    if cfg.elastic > 0:
        field = torch.randn(n, 2, 5, 5, device=x.device) * (cfg.elastic * strength)  # coarse displacements, px
        field = F.interpolate(field, size=(H, W), mode="bilinear", align_corners=True)  # (n, 2, H, W)
        field_x, field_y = field[:, 0] * (2 / W), field[:, 1] * (2 / H)  # pixels -> grid units (scalars: no copy)
        grid = grid + torch.stack([field_x, field_y], -1)
    out = F.grid_sample(x.reshape(n, 1, H, W) - background, grid, align_corners=False)  # zeros outside
    return out.view(B, C, H, W) + background


# ---------------------------------------------------------------------------------------------
# Classifier training: the budgeted loop, with periodic evaluation, checkpoints and exact resume

def train_classifier(cfg, seed, run_dir, train, test, hw):
    """Train one seed; returns its result dict (None when paused). `test` is only ever passed to evaluate()."""
    x_train, y_train = train
    torch.manual_seed(seed)
    # channels_last (NHWC) is the layout both oneDNN (CPU) and cuDNN (GPU) convolve fastest.
    model = make_classifier(cfg).to(hw.device, memory_format=torch.channels_last)
    ema = make_classifier(cfg).to(hw.device, memory_format=torch.channels_last).requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    decay_params = [p for p in model.parameters() if p.ndim >= 2]  # conv and linear weights
    other_params = [p for p in model.parameters() if p.ndim < 2]  # BN affine, biases: no decay
    opt = torch.optim.AdamW([{"params": decay_params, "weight_decay": cfg.weight_decay},
                             {"params": other_params, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.99),
                            fused=hw.device.type == "cuda")
    scaler = grad_scaler(hw)
    curves = {"step": [], "train_loss": [], "train_acc": [], "test_loss": [], "test_acc": []}
    start, seconds_before, ckpt_path = 0, 0.0, os.path.join(run_dir, "ckpt.pt")
    if os.path.exists(ckpt_path):  # classify() has refused it unless --resume
        ck = load_checkpoint(ckpt_path, "classify", cfg)
        if ck["result"]:
            print(f"run seed {seed}: already finished in {ckpt_path}")
            return ck["result"]
        model.load_state_dict(ck["model"])
        ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["opt"])  # Adam's step counters stay on the CPU, as torch keeps them
        scaler.load_state_dict(ck["scaler"])
        start, curves, seconds_before = ck["step"], ck["curves"], ck["seconds"]
        print(f"resuming seed {seed} from step {start:,} ({ckpt_path})")
    eval_model = ema if cfg.ema > 0 else model
    background = x_train.min().item()  # the normalised value of an empty pixel
    sample = EpochSampler(len(x_train), cfg.batch_size, seed, hw.device)
    eval_subset = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(seed))[:cfg.eval_train]
    eval_subset = eval_subset.to(hw.device)
    stop_at = stop_point(cfg.pause_at, start, cfg.steps)
    t0 = time.time()

    def checkpoint(step, result=None):
        save_checkpoint(ckpt_path, {"command": "classify", "model": model.state_dict(), "ema": ema.state_dict(),
                                    "opt": opt.state_dict(), "scaler": scaler.state_dict(), "step": step,
                                    "seed": seed, "config": asdict(cfg), "curves": curves, "result": result,
                                    "seconds": seconds_before + time.time() - t0})

    progress = Progress(cfg.steps, stop_at, start)
    window = torch.zeros(2, device=hw.device)  # summed (loss, accuracy) since the last line: no sync per step
    with StopFlag() as flag:
        for step in range(start, stop_at):
            seed_step(seed, step)
            lr = set_lr(opt, get_lr(step, cfg))
            idx = sample(step)
            strength = 1 - step / cfg.steps if cfg.aug_decay else 1.0
            xb, yb = augment_digits(x_train[idx], cfg, background, strength), y_train[idx]
            model.train()
            with autocast(hw):
                out = model(xb)
            loss = F.cross_entropy(out.float(), yb, label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            ema_update(ema, model, ema_decay(cfg.ema, step))
            window += torch.stack([loss.detach(), (out.argmax(1) == yb).float().mean()])
            done = step + 1
            if done % cfg.log_every == 0 or done == stop_at:
                loss_mean, acc_mean = (window / (done - progress.done)).tolist()
                progress.line(done, loss=f"{loss_mean:.4f}", acc=f"{acc_mean:.3f}", lr=f"{lr:.1e}")
                window.zero_()
            if done % cfg.eval_every == 0 or done == cfg.steps:
                train_loss, train_acc = evaluate(eval_model, x_train[eval_subset], y_train[eval_subset])
                test_loss, test_acc = evaluate(eval_model, *test)
                for key, value in zip(curves, (done, train_loss, train_acc, test_loss, test_acc)):
                    curves[key].append(value)
                print(f"eval {done:5d}/{cfg.steps} | train loss {train_loss:.4f} acc {train_acc:.4f} "
                      f"| test loss {test_loss:.4f} acc {test_acc:.4f}", flush=True)
                checkpoint(done)
                progress.restart(done)
            if flag.stop:
                checkpoint(done)
                raise interrupted(done, ckpt_path, cfg)
    if stop_at < cfg.steps:
        checkpoint(stop_at)
        print(f"paused after step {stop_at:,} as asked (--pause-at); continue with --resume --out {cfg.out}")
        return None
    # The final figures use every train image, with test-time augmentation if asked; the single-view
    # test accuracy is kept beside it so the two can be compared.
    train_loss, train_acc = evaluate(eval_model, x_train, y_train, tta=cfg.tta)
    test_loss, test_acc = evaluate(eval_model, *test, tta=cfg.tta)
    test_acc_single = evaluate(eval_model, *test)[1] if cfg.tta else test_acc
    result = {"seed": seed, "steps": stop_at, "train_loss": train_loss, "train_acc": train_acc,
              "test_loss": test_loss, "test_acc": test_acc, "test_acc_single_view": test_acc_single,
              "tta": cfg.tta, "seconds": seconds_before + time.time() - t0, "curves": curves}
    checkpoint(stop_at, result)
    return result


def classify(cfg):
    """`python mm.py classify`: train cfg.runs seeds, print a table, write metrics.json and accuracy.png."""
    check_bounds(cfg, CLASSIFY_BOUNDS)
    n_params = count_params(make_classifier(cfg))
    print(f"classify | model {cfg.model} | arch {cfg.arch}")
    enforce_budget("Number of parameters", n_params, CLASSIFY_PARAM_LIMIT, False, cfg.allow_penalty)
    enforce_budget("Number of optimisation steps", cfg.steps, CLASSIFY_STEP_LIMIT, True, cfg.allow_penalty)
    print(f"> Work per step: {cfg.batch_size} images ({3 * cfg.batch_size} digits); "
          f"{cfg.steps * cfg.batch_size:,} images seen per run, {cfg.runs} run(s)")
    print(f"> {describe_ema(cfg.ema, cfg.steps)}")
    check_out(cfg.out, holds_checkpoint(cfg.out), cfg.resume)
    run_dirs = [os.path.join(cfg.out, f"run{r}") for r in range(cfg.runs)]
    for run_dir in run_dirs:  # a checkpoint that cannot be continued is refused before any work
        if os.path.exists(os.path.join(run_dir, "ckpt.pt")):
            load_checkpoint(os.path.join(run_dir, "ckpt.pt"), "classify", cfg)
    hw = pick_hardware(cfg)
    splits = [data.load_split("addnist", split, cfg.data_dir or None) for split in cfg.train_on.split("+")]
    to_device = lambda a: torch.from_numpy(a).to(hw.device)
    train = (to_device(np.concatenate([x for x, _ in splits])), to_device(np.concatenate([y for _, y in splits])))
    test = tuple(map(to_device, data.load_test("addnist", cfg.data_dir or None)))  # evaluation only
    print(f"AddNIST {cfg.train_on} {tuple(train[0].shape)}, test {tuple(test[0].shape)}")
    if not cfg.resume:  # the config a run started with; metrics.json records the one it finished with
        save_json(os.path.join(cfg.out, "config.json"), asdict(cfg))
    results = []
    for r in range(cfg.runs):
        print(f"--- run {r + 1}/{cfg.runs} (seed {cfg.seed + r})")
        result = train_classifier(cfg, cfg.seed + r, run_dirs[r], train, test, hw)
        if result is None:  # paused
            return None
        results.append(result)
    print_table([{"run": i, "seed": r["seed"], "steps": r["steps"], "train loss": f"{r['train_loss']:.4f}",
                  "train acc %": f"{100 * r['train_acc']:.2f}", "test acc %": f"{100 * r['test_acc']:.2f}",
                  "time": fmt_time(r["seconds"])} for i, r in enumerate(results)])
    metrics = {"params": n_params, "steps": results[0]["steps"], "runs": len(results), "device": str(hw.device),
               "mixed_precision": hw.precision, "config": asdict(cfg)}
    for key in ("train_loss", "train_acc", "test_acc", "test_loss", "test_acc_single_view"):
        metrics[f"{key}_mean"], metrics[f"{key}_std"] = mean_std([r[key] for r in results])
    metrics["per_run"] = results
    single = mean_std([r["test_acc_single_view"] for r in results])
    train_loss = metrics["train_loss_mean"], metrics["train_loss_std"]
    print(f"mean ± std (n={len(results)}): train loss {train_loss[0]:.4f} ± {train_loss[1]:.4f}"
          f" | train acc {percent(mean_std([r['train_acc'] for r in results]))} %"
          f" | test acc {percent(mean_std([r['test_acc'] for r in results]))} %"
          + (f" (single view {percent(single)} %)" if cfg.tta else ""))
    save_json(os.path.join(cfg.out, "metrics.json"), metrics)
    plot_accuracy(os.path.join(cfg.out, "accuracy.png"), results)
    print(f"wrote {cfg.out}/config.json, metrics.json, accuracy.png, run*/ckpt.pt")
    return metrics


# ---------------------------------------------------------------------------------------------
# Diffusion: EDM preconditioning and loss, a compact U-Net, the deterministic Heun sampler
#
# Karras et al. 2022, "Elucidating the design space of diffusion-based generative models" (EDM):
# the noisy image is x + σ n; the network F is wrapped so that D(x; σ) = c_skip x + c_out F(c_in x; c_noise)
# has unit-variance inputs and targets at every σ (Table 1), σ is drawn log-normally in training (ln σ ~
# N(P_mean, P_std²)), and sampling integrates the probability-flow ODE with Heun's method (Algorithm 1).
# Class conditioning with label dropout gives classifier-free guidance (Ho & Salimans 2022).

def edm_scalings(sigma, sigma_data):
    """c_skip, c_out, c_in, c_noise of Karras et al. 2022, Table 1 (EDM column).  sigma (B,) -> four (B,)."""
    c_skip = sigma_data ** 2 / (sigma ** 2 + sigma_data ** 2)  # how much of the noisy input to keep
    c_out = sigma * sigma_data / (sigma ** 2 + sigma_data ** 2).sqrt()  # scale of the network's correction
    c_in = 1 / (sigma ** 2 + sigma_data ** 2).sqrt()  # makes the network's input unit-variance
    c_noise = sigma.log() / 4  # the noise level as the network sees it
    return c_skip, c_out, c_in, c_noise


def edm_sigmas(n, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """Sampling noise levels σ_0 > ... > σ_{n-1}, then σ_n = 0 (Karras et al. 2022, Eq. 5).  -> (n + 1,)"""
    i = torch.arange(n, dtype=torch.float64)
    s = (sigma_max ** (1 / rho) + i / max(n - 1, 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)])


class ResBlock(nn.Module):
    """GroupNorm, SiLU, conv, then scale-and-shift by the embedding (Dhariwal & Nichol 2021), GroupNorm,
    SiLU, dropout, conv; plus the input (a 1x1 conv when the width changes). Every block uses the noise
    level and the class through `emb`."""

    def __init__(self, cin, cout, emb_dim, dropout):
        super().__init__()
        # 8 groups as in small U-Nets, but at least 4 channels per group so narrow layers still normalise
        self.norm1 = nn.GroupNorm(min(8, cin // 4), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.film = nn.Linear(emb_dim, 2 * cout)  # (scale, shift) per channel
        self.norm2 = nn.GroupNorm(min(8, cout // 4), cout)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity: stable early training
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):  # x (B, cin, H, W), emb (B, emb_dim) -> (B, cout, H, W)
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.conv2(self.drop(F.silu(self.norm2(h) * (1 + scale) + shift)))
        return h + self.skip(x)


class SelfAttention(nn.Module):
    """Multi-head self-attention over the pixels of a low-resolution map, residual, output zero-initialised."""

    def __init__(self, c, heads=4):
        super().__init__()
        self.norm, self.heads = nn.GroupNorm(min(8, c // 4), c), heads
        self.qkv, self.proj = nn.Conv2d(c, 3 * c, 1), nn.Conv2d(c, c, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x):  # (B, C, H, W) -> same
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W)  # reshape: NHWC-safe
        q, k, v = qkv.transpose(3, 4).unbind(1)  # each (B, heads, HW, C/heads)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, HW, C/heads)
        return x + self.proj(out.transpose(2, 3).reshape(B, C, H, W))


class UNet(nn.Module):
    """D(x; σ, class) for 32x32 images: EDM preconditioning around a small U-Net.

    Levels at 32, 16, 8 pixels with widths `widths`; `blocks` residual blocks per level on the way down
    and up (skip connections by concatenation); self-attention at the lowest level and in the middle.
    The embedding is Fourier features of c_noise through an MLP, plus a learned class embedding
    (index n_classes means "no class", for classifier-free guidance).
    """

    def __init__(self, widths=(32, 64, 96), blocks=1, emb_dim=128, n_classes=100, dropout=0.1, sigma_data=0.5):
        super().__init__()
        self.sigma_data, self.n_classes = sigma_data, n_classes
        # Fixed random Fourier frequencies (Tancik et al. 2020) for c_noise = ln(σ)/4, which spans about
        # -2..1.5 in training: a std of 4 cycles per unit resolves noise levels a few percent apart.
        self.register_buffer("freqs", torch.randn(emb_dim // 4) * 4, persistent=True)
        self.noise_mlp = nn.Sequential(nn.Linear(emb_dim // 2, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_embed = nn.Embedding(n_classes + 1, emb_dim)
        self.stem = nn.Conv2d(3, widths[0], 3, padding=1)
        self.down, self.up = nn.ModuleList(), nn.ModuleList()
        c = widths[0]
        for w in widths:  # encoder: blocks per level, skip saved after each level
            self.down.append(nn.ModuleList(ResBlock(c if i == 0 else w, w, emb_dim, dropout) for i in range(blocks)))
            c = w
        self.mid1, self.mid_attn = ResBlock(c, c, emb_dim, dropout), SelfAttention(c)
        self.mid2 = ResBlock(c, c, emb_dim, dropout)
        self.low_attn = SelfAttention(c)  # attention at the 8x8 level of the decoder
        for level, w in reversed(list(enumerate(widths))):  # decoder: first block takes the concatenated skip
            self.up.append(nn.ModuleList(ResBlock(c + w if i == 0 else w, w, emb_dim, dropout) for i in range(blocks)))
            c = w
        self.out_norm, self.out = nn.GroupNorm(min(8, c // 4), c), nn.Conv2d(c, 3, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def embed(self, c_noise, class_emb):  # (B,), (B, emb_dim) -> (B, emb_dim)
        angles = c_noise[:, None].float() * self.freqs[None] * 2 * math.pi
        return self.noise_mlp(torch.cat([angles.cos(), angles.sin()], 1)) + class_emb

    def forward(self, x, sigma, class_emb):
        """D(x; σ): x (B, 3, 32, 32) noisy images, sigma (B,), class_emb (B, emb_dim) -> denoised (B, 3, 32, 32)."""
        c_skip, c_out, c_in, c_noise = (s[:, None, None, None] for s in edm_scalings(sigma, self.sigma_data))
        emb = F.silu(self.embed(c_noise.flatten(), class_emb))
        h, skips = self.stem(c_in * x), []
        for level, blocks in enumerate(self.down):
            for block in blocks:
                h = block(h, emb)
            skips.append(h)
            if level < len(self.down) - 1:
                h = F.avg_pool2d(h, 2)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for i, blocks in enumerate(self.up):
            h = torch.cat([h, skips.pop()], 1)
            for block in blocks:
                h = block(h, emb)
            if i == 0:
                h = self.low_attn(h)
            if i < len(self.up) - 1:
                h = F.interpolate(h, scale_factor=2, mode="nearest")
        return c_skip * x + c_out * self.out(F.silu(self.out_norm(h)))


def make_unet(cfg):
    try:
        widths = tuple(int(w) for w in cfg.widths.split(","))
    except ValueError:
        raise UserError(f"--widths {cfg.widths}: give three whole numbers, e.g. 32,64,80") from None
    if len(widths) < 1 or any(w < 8 or w % 8 for w in widths) or cfg.emb_dim % 4:
        raise UserError(f"--widths {cfg.widths} --emb-dim {cfg.emb_dim}: every width must be a positive multiple of 8 "
                        f"(group norm, attention heads) and the embedding a multiple of 4 (Fourier features)")
    return UNet(widths, cfg.blocks, cfg.emb_dim, dropout=cfg.dropout, sigma_data=cfg.sigma_data)


def edm_loss(net, x, labels, cfg):
    """Karras et al. 2022, Eq. 2 with λ(σ) = (σ² + σ_d²)/(σ σ_d)²: the weighted denoising error at
    ln σ ~ N(P_mean, P_std²).

    Labels are replaced by the "no class" index with probability p_uncond, training the unconditional
    model that classifier-free guidance needs inside the same network.
    """
    sigma = (torch.randn(len(x), device=x.device) * cfg.p_std + cfg.p_mean).exp()  # (B,)
    drop = torch.rand(len(x), device=x.device) < cfg.p_uncond
    labels = torch.where(drop, torch.full_like(labels, net.n_classes), labels)
    noisy = x + sigma[:, None, None, None] * torch.randn_like(x)  # the forward process: x_σ = x + σ n
    weight = (sigma ** 2 + cfg.sigma_data ** 2) / (sigma * cfg.sigma_data) ** 2
    denoised = net(noisy, sigma, net.class_embed(labels))
    return (weight[:, None, None, None] * (denoised.float() - x) ** 2).mean()


FP32 = None  # hw argument of the sampler meaning "no autocast" (tests and the CPU)


@torch.no_grad()
def guided_denoise(net, x, sigma, class_emb, guidance, hw=FP32):
    """Classifier-free guidance: D_u + w (D_c - D_u); w = 1 is the plain conditional model (one pass)."""
    s = torch.full((len(x),), sigma, device=x.device, dtype=torch.float32)
    with autocast(hw or Hardware(x.device, "fp32")):
        if guidance == 1:
            return net(x, s, class_emb).float()
        null = net.class_embed(torch.full((len(x),), net.n_classes, device=x.device))
        both = net(torch.cat([x, x]), torch.cat([s, s]), torch.cat([class_emb, null])).float()
    cond, uncond = both.chunk(2)
    return uncond + guidance * (cond - uncond)


@torch.no_grad()
def edm_heun_sampler(net, z, class_emb, steps, guidance=1.0, hw=FP32):
    """Karras et al. 2022, Algorithm 1 (deterministic: S_churn = 0): Heun's method on the probability-flow
    ODE dx/dσ = (x - D(x; σ))/σ from σ_0 = 80 to 0. z (B, 3, 32, 32) ~ N(0, I). NFE = 2 steps - 1."""
    sigmas = edm_sigmas(steps).tolist()
    x = z.double() * sigmas[0]  # float64 state: the solver's update stays exact however the net runs
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        d = (x - guided_denoise(net, x.float(), s, class_emb, guidance, hw).double()) / s
        x_next = x + (s_next - s) * d  # Euler step
        if s_next > 0:  # second-order correction (Heun), skipped on the last step to σ = 0
            d_next = (x_next - guided_denoise(net, x_next.float(), s_next, class_emb, guidance, hw).double()) / s_next
            x_next = x + (s_next - s) * (d + d_next) / 2
        x = x_next
    return x.float()


def to_uint8(x):
    """[-1, 1] floats -> uint8 images, as saved and as FID sees them."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def slerp(a, b, t):
    """Spherical interpolation between noise tensors (Shoemake 1985): keeps the norm a Gaussian sample has."""
    a_flat, b_flat = a.flatten(), b.flatten()
    omega = torch.acos((a_flat @ b_flat / (a_flat.norm() * b_flat.norm())).clamp(-1, 1))
    if omega.abs() < 1e-6:
        return (1 - t) * a + t * b
    return (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)


# ---------------------------------------------------------------------------------------------
# Diffusion training: set up, the budgeted loop, then samples and figures, then scores

Trained = namedtuple("Trained", "step curve seconds")  # where a generator's training stands


def setup_generator(cfg, hw, ckpt_path):
    """The U-Net, its EMA, the optimiser and grad scaler: fresh, or restored from the checkpoint."""
    torch.manual_seed(cfg.seed)  # the initial weights (and Fourier frequencies) depend on the seed alone
    net = make_unet(cfg).to(hw.device, memory_format=torch.channels_last)
    ema = make_unet(cfg).to(hw.device, memory_format=torch.channels_last).requires_grad_(False)
    ema.load_state_dict(net.state_dict())
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=(0.9, 0.99), fused=hw.device.type == "cuda")
    scaler = grad_scaler(hw)
    trained = Trained(0, {"step": [], "loss": []}, 0.0)
    if os.path.exists(ckpt_path) and (cfg.resume or cfg.sample_only):
        ck = load_checkpoint(ckpt_path, "generate", cfg)
        net.load_state_dict(ck["model"])
        ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["opt"])
        scaler.load_state_dict(ck["scaler"])
        trained = Trained(ck["step"], ck["curve"], ck["seconds"])
        print(f"loaded {ckpt_path} at step {trained.step:,}")
    return net, ema, opt, scaler, trained


def train_generator(cfg, net, ema, opt, scaler, x_train, y_train, hw, ckpt_path, trained):
    """The budgeted loop from trained.step; returns the Trained record at the end (None when paused)."""
    sample = EpochSampler(len(x_train), cfg.batch_size, cfg.seed, hw.device)
    curve, t0 = trained.curve, time.time()
    use_compile = cfg.compile == "on" or (cfg.compile == "auto" and hw.device.type == "cuda")
    if use_compile:
        torch._dynamo.config.suppress_errors = True  # a failed compile falls back to eager, with a warning
        print("compiling the training forward with torch.compile (the first steps are slow; falls back to eager)")
    forward = torch.compile(net) if use_compile else net  # shares net's parameters

    def checkpoint(step):
        save_checkpoint(ckpt_path, {"command": "generate", "model": net.state_dict(), "ema": ema.state_dict(),
                                    "opt": opt.state_dict(), "scaler": scaler.state_dict(), "step": step,
                                    "config": asdict(cfg), "curve": curve,
                                    "seconds": trained.seconds + time.time() - t0})

    stop_at = stop_point(cfg.pause_at, trained.step, cfg.steps)
    progress = Progress(cfg.steps, stop_at, trained.step)
    loss_sum = torch.zeros((), device=hw.device)  # summed since the last line: no host sync per step
    with StopFlag() as flag:
        for step in range(trained.step, stop_at):
            seed_step(cfg.seed, step)  # noise levels, noise, dropout, flips
            lr = set_lr(opt, get_lr(step, cfg))
            idx = sample(step)
            xb = x_train[idx].float() / 127.5 - 1  # uint8 -> [-1, 1]  (B, 3, 32, 32)
            flip = torch.rand(len(xb), device=hw.device) < (0.5 if cfg.flip else 0.0)  # drawn either way: same stream
            xb = torch.where(flip[:, None, None, None], xb.flip(3), xb)  # horizontal flips
            net.train()
            with autocast(hw):
                loss = edm_loss(forward, xb, y_train[idx], cfg)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)  # clip the true gradients, not the fp16-scaled ones
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            scaler.step(opt)
            scaler.update()
            ema_update(ema, net, ema_decay(cfg.ema, step))
            loss_sum += loss.detach()
            done = step + 1
            if done % cfg.log_every == 0 or done == stop_at:
                curve["step"].append(done)
                curve["loss"].append(loss_sum.item() / (done - progress.done))
                rate = cfg.batch_size * (done - progress.done) / (time.time() - progress.t)
                progress.line(done, loss=f"{curve['loss'][-1]:.4f}", lr=f"{lr:.1e}", img_per_s=f"{rate:.0f}")
                loss_sum.zero_()
            if done % cfg.sample_every == 0 and done < cfg.steps:  # a grid to watch the run by
                ema.eval()
                grid = sample_images(ema, torch.arange(64) % 100, cfg, hw, cfg.seed)
                save_grid(os.path.join(cfg.out, "progress.png"), grid, 8, f"EMA samples after {done:,} steps")
                checkpoint(done)
                progress.restart(done)
            if flag.stop:
                checkpoint(done)
                raise interrupted(done, ckpt_path, cfg)
    checkpoint(stop_at)
    if stop_at < cfg.steps:
        print(f"paused after step {stop_at:,} as asked (--pause-at); continue with --resume --out {cfg.out}")
        return None
    return Trained(stop_at, curve, trained.seconds + time.time() - t0)


def sample_images(net, labels, cfg, hw, seed):
    """Samples for the given class labels from fresh noise z (seeded): (N,) -> uint8 (N, 3, 32, 32)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    t0 = time.time()
    for i in range(0, len(labels), cfg.sample_batch):
        lab = labels[i:i + cfg.sample_batch].to(hw.device)
        z = torch.randn(len(lab), 3, 32, 32, generator=g).to(hw.device)
        x = edm_heun_sampler(net, z, net.class_embed(lab), cfg.sampler_steps, cfg.guidance, hw)
        out.append(to_uint8(x).cpu())
        done = i + len(lab)
        if len(labels) > cfg.sample_batch:
            rate = done / (time.time() - t0)
            print(f"\rsampling {done}/{len(labels)} | {rate:.0f} img/s | eta {fmt_time((len(labels) - done) / rate)}",
                  end="\n" if done == len(labels) else "", file=sys.stderr, flush=True)
    return torch.cat(out)


def interpolations(net, cfg, hw, seed, pairs=8, frames=10):
    """For each pair: slerp the noise and lerp the class embedding, then run the deterministic sampler.
    Frame 0 and frame -1 are exactly the two endpoint samples.  -> uint8 (pairs * frames, 3, 32, 32)"""
    g = torch.Generator().manual_seed(seed + 1)
    za, zb = torch.randn(pairs, 3, 32, 32, generator=g), torch.randn(pairs, 3, 32, 32, generator=g)
    la = torch.randint(0, net.n_classes, (pairs,), generator=g)
    lb = torch.randint(0, net.n_classes, (pairs,), generator=g)
    ea, eb = net.class_embed(la.to(hw.device)), net.class_embed(lb.to(hw.device))
    ts = torch.linspace(0, 1, frames).tolist()
    z = torch.stack([slerp(za[p], zb[p], t) for p in range(pairs) for t in ts]).to(hw.device)
    emb = torch.stack([(1 - t) * ea[p] + t * eb[p] for p in range(pairs) for t in ts])
    return to_uint8(edm_heun_sampler(net, z, emb, cfg.sampler_steps, cfg.guidance, hw)).cpu(), (la, lb)


def nearest_neighbours(samples, train_u8, k=3, sample_feats=None, train_feats=None):
    """Pixel-L2 (and, given Inception features, feature-L2) nearest training images of each sample.

    Distances come from fid.pairwise_distances in float64, the same ones the copy rate uses.
    """
    a = samples.double().flatten(1)  # (S, 3072)
    best_d, best_i = [], []
    for i in range(0, len(train_u8), 10_000):  # chunks keep the (S, chunk) distance matrix small
        chunk = train_u8[i:i + 10_000].double().flatten(1).to(a.device)
        dd, ii = fid.pairwise_distances(a, chunk).topk(k, dim=1, largest=False)
        best_d.append(dd)
        best_i.append(ii + i)
    d, idx = torch.cat(best_d, 1), torch.cat(best_i, 1)
    order = d.argsort(1)[:, :k]
    result = {"pixel_l2": d.gather(1, order).tolist(), "pixel_index": idx.gather(1, order).tolist()}
    if sample_feats is not None:
        fs, ft = (torch.from_numpy(np.asarray(f, np.float64)) for f in (sample_feats, train_feats))
        dd, ii = fid.pairwise_distances(fs, ft).topk(k, dim=1, largest=False)
        result.update(inception_l2=dd.tolist(), inception_index=ii.tolist())
    return result


def write_samples_and_figures(cfg, ema, hw):
    """The first 64 samples as a grid (not cherry-picked), all samples as .npz, and the interpolations."""
    labels = torch.arange(max(cfg.fid_samples, 64)) % 100  # classes cycled; at least the 64 of the grid
    t0 = time.time()
    images = sample_images(ema, labels, cfg, hw, cfg.seed)  # (N, 3, 32, 32) uint8
    sample_seconds = time.time() - t0
    save_grid(os.path.join(cfg.out, "samples.png"), images[:64], 8, "the first 64 samples (classes 0..63)")
    np.savez(os.path.join(cfg.out, "samples.npz"), images=images.numpy(), labels=labels.numpy())
    frames, (la, lb) = interpolations(ema, cfg, hw, cfg.seed)
    save_grid(os.path.join(cfg.out, "interpolations.png"), frames, 10, "8 pairs: slerp of noise, lerp of class")
    return images, {"fid_samples": len(images), "sample_seconds": sample_seconds,
                    "interpolation_classes": [la.tolist(), lb.tolist()]}


def score_samples(cfg, images, x_train, hw, metrics):
    """The quality panel against the test split (fid.quality_panel: realism, diversity), copy rates against
    the training set (uniqueness), and neighbours.png. Without the Inception weights (offline), the
    feature-based numbers are null with the reason; the pixel copy rate needs no network."""
    x_test, _ = data.load_test("cifar100", cfg.data_dir or None)  # the test split is used for scoring only
    sample_px = fid.nearest_distances(images, x_train, device=hw.device)  # (N,) pixel L2 to the nearest train image
    cache = data.data_root(cfg.data_dir or None)
    key = {"what": "test-to-train-pixel-l2", "test": fid.digest(x_test), "train": fid.digest(x_train.cpu().numpy())}
    test_px = fid.cached_array(key, cache, lambda: fid.nearest_distances(x_test, x_train, device=hw.device))
    metrics["pixel_copy"] = fid.copy_rate(sample_px, test_px)
    metrics["pixel_copy_rate"] = metrics["pixel_copy"]["copy_rate"]
    sample_feats, train_feats = None, None
    try:
        inception = fid.load_inception(hw.device, cfg.data_dir or None)
    except UserError as e:
        metrics["fid"], metrics["fid_unavailable"] = None, str(e)
        print(f"FID and the feature panel skipped: {e}")
    else:
        test_key = {"dataset": "cifar100", "split": "test"}
        test_feats = fid.cached_features(x_test, test_key, inception, cache)
        test_clean = fid.cached_features(x_test, test_key, inception, cache, clean=True)
        sample_feats = fid.inception_features(images, inception)
        sample_clean = fid.inception_features(images, inception, clean=True)
        metrics.update(fid.quality_panel(test_feats, sample_feats, test_clean, sample_clean, hw.device))
        metrics["fid_protocol"] = "pytorch-fid (Inception pool3, bilinear 299), samples vs the CIFAR-100 test split"
        train_feats = fid.cached_features(x_train.cpu(), {"dataset": "cifar100", "split": "train"}, inception, cache)
        metrics["inception_copy"] = fid.copy_rate(fid.nearest_distances(sample_feats, train_feats, device=hw.device),
                                                  fid.nearest_distances(test_feats, train_feats, device=hw.device))
        metrics["inception_copy_rate"] = metrics["inception_copy"]["copy_rate"]
    # neighbours.png: the first 8 samples, then the 8 nearest to a training image, so a copy cannot hide
    closest = [int(i) for i in np.argsort(sample_px)[:8]]
    shown = list(range(min(8, len(images)))) + closest
    found = nearest_neighbours(images[shown].to(hw.device), x_train, 3,
                               None if sample_feats is None else sample_feats[shown], train_feats)
    metrics["neighbours"] = {"sample_index": shown, **found}
    rows = [torch.stack([images[s]] + [x_train[j].cpu() for j in found["pixel_index"][row]])
            for row, s in enumerate(shown)]
    save_grid(os.path.join(cfg.out, "neighbours.png"), torch.cat(rows), 4, "", gap_after=1,
              header=("sample", "3 nearest training images"))


def generate(cfg):
    """`python mm.py generate`: train the class-conditional diffusion model, then write every output.

    Stages: set up (fresh or from the checkpoint) -> train -> samples and figures -> scores. Every count
    reported (steps, seconds) comes from the checkpoint that produced the samples.
    """
    check_bounds(cfg, GENERATE_BOUNDS)
    t_start = time.time()
    ckpt_path = cfg.ckpt or os.path.join(cfg.out, "ckpt.pt")
    if cfg.sample_only:  # the architecture and the training record come from the checkpoint
        if not os.path.exists(ckpt_path):
            raise UserError(f"no checkpoint at {ckpt_path}; train first, or point --ckpt at one")
        trained_config = load_checkpoint(ckpt_path, "generate")["config"]
        cfg = replace(cfg, **{k: v for k, v in trained_config.items() if k not in RESUME_FREE["generate"]})
    n_params = count_params(make_unet(cfg))
    print(f"generate | U-Net widths {cfg.widths}, {cfg.blocks} block(s) per level")
    enforce_budget("Number of parameters", n_params, GENERATE_PARAM_LIMIT, False, cfg.allow_penalty)
    print("  (every trained network counted: the U-Net with its embeddings; the EMA is an average of the same "
          "weights, not a second network)")
    enforce_budget("Number of optimisation steps", cfg.steps, GENERATE_STEP_LIMIT, True, cfg.allow_penalty)
    check_out(cfg.out, os.path.exists(ckpt_path) and not cfg.sample_only, cfg.resume)
    hw = pick_hardware(cfg)
    net, ema, opt, scaler, trained = setup_generator(cfg, hw, ckpt_path)
    x_train, y_train = (torch.from_numpy(a).to(hw.device) for a in data.load_split("cifar100", "train",
                                                                                   cfg.data_dir or None))
    if not (cfg.resume or cfg.sample_only):  # the config a run started with; metrics.json has the rest
        save_json(os.path.join(cfg.out, "config.json"), asdict(cfg))
    if not cfg.sample_only:
        print(f"> Work per step: {cfg.batch_size} images; {cfg.steps * cfg.batch_size:,} images seen; CIFAR-100 train "
              f"{tuple(x_train.shape)}")
        print(f"> {describe_ema(cfg.ema, cfg.steps)}")
        trained = train_generator(cfg, net, ema, opt, scaler, x_train, y_train, hw, ckpt_path, trained)
        if trained is None:  # paused
            return None
    ema.eval()
    nfe = (2 * cfg.sampler_steps - 1) * (1 if cfg.guidance == 1 else 2)
    images, sampled = write_samples_and_figures(cfg, ema, hw)
    metrics = {"params": n_params, "steps": trained.step, "sampler": "EDM Heun (Karras et al. 2022, Alg. 1)",
               "sampler_steps": cfg.sampler_steps, "nfe": nfe, "guidance": cfg.guidance, **sampled,
               "loss_curve": trained.curve, "train_seconds": trained.seconds, "checkpoint": ckpt_path,
               "device": str(hw.device), "mixed_precision": hw.precision, "config": asdict(cfg)}
    metrics_path = os.path.join(cfg.out, "metrics.json")
    save_json(metrics_path, metrics)  # written before scoring: the samples' record survives any failure there
    score_samples(cfg, images, x_train, hw, metrics)
    metrics["wall_seconds"] = time.time() - t_start  # this call: setup, any training, sampling, scoring
    save_json(metrics_path, metrics)
    fid_text = "null" if metrics["fid"] is None else f"{metrics['fid']:.2f}"
    print_table([{"params": f"{n_params:,}", "steps": f"{trained.step:,}", "sampler": f"Heun {cfg.sampler_steps}",
                  "NFE": nfe, "guidance": cfg.guidance, f"FID ({len(images):,} samples)": fid_text}])
    print(f"\nquality panel ({len(images):,} samples; realism, diversity, uniqueness):")
    fid.print_panel(metrics)
    print(f"wrote {cfg.out}/samples.png, interpolations.png, neighbours.png, samples.npz, config.json, metrics.json"
          + ("" if cfg.sample_only else f"; checkpoint {ckpt_path}"))
    return metrics


# ---------------------------------------------------------------------------------------------
# Depth study: a plain 38-layer CNN fails to train, gradient flow shows why, BN and residuals fix it

class ProcessingBlock(nn.Module):
    """conv -> (BN) -> leaky ReLU -> conv -> (BN) -> [+ input] -> leaky ReLU, at constant width.

    With residual, the input is added before the last activation (He et al. 2016, "Deep residual
    learning for image recognition", Fig. 2): if both convs output zero the block passes its
    (already non-negative-ish) input through, so gradients reach early layers undiminished.
    """

    def __init__(self, c, bn, residual):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)  # the coursework framework: no bias here
        self.bn1 = nn.BatchNorm2d(c) if bn else nn.Identity()
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c) if bn else nn.Identity()
        self.residual = residual

    def forward(self, x):  # (B, c, H, W) -> same
        h = self.bn2(self.conv2(F.leaky_relu(self.bn1(self.conv1(x)))))
        return F.leaky_relu(h + x if self.residual else h)


class ReductionBlock(nn.Module):
    """conv -> (BN) -> leaky ReLU -> 2x2 average pool -> conv -> (BN) -> leaky ReLU; halves H and W."""

    def __init__(self, c, bn):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)  # with bias, as in the coursework framework
        self.bn1 = nn.BatchNorm2d(c) if bn else nn.Identity()
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(c) if bn else nn.Identity()

    def forward(self, x):  # (B, c, H, W) -> (B, c, H/2, W/2)
        h = F.avg_pool2d(F.leaky_relu(self.bn1(self.conv1(x))), 2)
        return F.leaky_relu(self.bn2(self.conv2(h)))


class VGG(nn.Module):
    """Entry conv/BN/leaky ReLU, 3 stages of (blocks_per_stage processing blocks + 1 reduction block),
    global average pool, linear. depth 8 -> 0 blocks per stage (7 conv + 1 linear, 59,716 parameters);
    depth 38 -> 5 per stage (37 conv + 1 linear, 336,196 parameters)."""

    def __init__(self, depth=38, bn=False, residual=False, filters=32, n_classes=100, stages=3):
        super().__init__()
        per_stage = (depth - 2 - 2 * stages) // (2 * stages)  # depth = entry + stages*(2*blocks + 2) + fc
        if 1 + stages * (2 * per_stage + 2) + 1 != depth or per_stage < 0:
            raise UserError(f"--depth {depth} cannot be built from {stages} stages (use 8, 14, 20, ... 38)")
        self.entry = nn.Sequential(nn.Conv2d(3, filters, 3, padding=1, bias=False), nn.BatchNorm2d(filters),
                                   nn.LeakyReLU())
        self.stages = nn.ModuleList(  # blocks named b1..bN and red, so weights read 'stages.0.b2.conv1.weight'
            nn.Sequential(OrderedDict([*((f"b{i + 1}", ProcessingBlock(filters, bn, residual))
                                         for i in range(per_stage)),
                                       ("red", ReductionBlock(filters, bn))])) for _ in range(stages))
        self.fc = nn.Linear(filters, n_classes)

    def forward(self, x):  # (B, 3, 32, 32) -> (B, n_classes)
        x = self.entry(x)
        for stage in self.stages:
            x = stage(x)
        return self.fc(x.mean((2, 3)))  # global average pool


def layer_name(param_name):
    """'stages.1.red.conv2.weight' -> 's2.red.c2', 'entry.0.weight' -> 'entry': short plot labels."""
    parts = param_name.split(".")
    if parts[0] != "stages":
        return parts[0]
    return f"s{int(parts[1]) + 1}.{parts[2]}.{parts[3].replace('conv', 'c')}"


def gradient_flow(model):
    """{layer: mean |dL/dW|} over every weight tensor (biases and BN scales excluded), in forward order."""
    flow = {}
    for name, p in model.named_parameters():
        if p.grad is not None and p.ndim > 1:  # conv kernels (4-D) and the linear matrix (2-D)
            flow[name] = p.grad.abs().mean().item()
    return flow


def crop_flip(x, pad=4):
    """Random 32x32 crop of the zero-padded image and a random horizontal flip, per image, batched."""
    B, C, H, W = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))  # (B, C, H + 2 pad, W + 2 pad)
    dy, dx = (torch.randint(0, 2 * pad + 1, (B,), device=x.device) for _ in range(2))
    rows = (dy[:, None] + torch.arange(H, device=x.device))[:, None, :, None]  # (B, 1, H, 1)
    cols = (dx[:, None] + torch.arange(W, device=x.device))[:, None, None, :]  # (B, 1, 1, W)
    batch_index = torch.arange(B, device=x.device)[:, None, None, None]
    channel_index = torch.arange(C, device=x.device)[None, :, None, None]
    out = xp[batch_index, channel_index, rows, cols]
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
    """OUT/<configuration>, e.g. 'VGG_38 + BN (lr 1e-2)' -> OUT/VGG_38_BN_lr_1e_2; the report reads it back."""
    return os.path.join(out, re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_"))


def cosine_epoch_lr(epoch, cfg):
    """Cosine annealing per epoch (Loshchilov & Hutter 2017), as the coursework's CosineAnnealingLR steps it."""
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * epoch / cfg.epochs))


def train_vgg(cfg, seed, run_dir, splits, hw):
    """Train one configuration for cfg.epochs; returns its result (best-validation model scored on test),
    or None when paused."""
    (x_tr, y_tr), (x_val, y_val), test = splits
    torch.manual_seed(seed)
    model = VGG(cfg.depth, cfg.bn, cfg.residual).to(hw.device, memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=hw.device.type == "cuda")
    scaler = grad_scaler(hw)
    per_epoch = len(x_tr) // cfg.batch_size
    curves = {k: [] for k in ("epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc")}
    flows, best, start, seconds_before = [], {"val_acc": -1.0}, 0, 0.0
    ckpt_path = os.path.join(run_dir, "ckpt.pt")
    if os.path.exists(ckpt_path):  # gradflow() has refused it unless --resume
        ck = load_checkpoint(ckpt_path, "gradflow", cfg)
        if ck["result"]:
            print(f"{run_dir}: already finished")
            return ck["result"]
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        scaler.load_state_dict(ck["scaler"])
        start, curves, flows, best, seconds_before = ck["epoch"], ck["curves"], ck["flows"], ck["best"], ck["seconds"]
        print(f"resuming {run_dir} from epoch {start}")
    sample = EpochSampler(len(x_tr), cfg.batch_size, seed, hw.device)
    stop_epoch = stop_point(cfg.pause_at, start, cfg.epochs, "epoch")
    t0 = time.time()

    def checkpoint(epoch, result=None):
        save_checkpoint(ckpt_path, {"command": "gradflow", "model": model.state_dict(), "opt": opt.state_dict(),
                                    "scaler": scaler.state_dict(), "epoch": epoch, "config": asdict(cfg),
                                    "curves": curves, "flows": flows, "best": best, "result": result,
                                    "seconds": seconds_before + time.time() - t0})

    progress = Progress(cfg.epochs * per_epoch, stop_epoch * per_epoch, start * per_epoch)
    with StopFlag() as flag:
        for epoch in range(start, stop_epoch):
            lr = set_lr(opt, cosine_epoch_lr(epoch, cfg))
            model.train()
            loss_sum, correct = torch.zeros((), device=hw.device), torch.zeros((), device=hw.device)
            for i in range(per_epoch):
                step = epoch * per_epoch + i
                seed_step(seed, step)
                idx = sample(step)
                xb, yb = crop_flip(x_tr[idx]), y_tr[idx]
                with autocast(hw):
                    out = model(xb).float()
                loss = F.cross_entropy(out, yb)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if i == per_epoch - 1:  # gradient flow after the last batch of the epoch
                    scaler.unscale_(opt)  # true gradients, not fp16-scaled ones
                    flows.append(gradient_flow(model))
                scaler.step(opt)
                scaler.update()
                loss_sum += loss.detach()
                correct += (out.argmax(1) == yb).sum()
                if flag.stop and i < per_epoch - 1:  # checkpoints are per epoch: keep the last one intact
                    kept = (f"the checkpoint after epoch {epoch} in {ckpt_path} is kept" if epoch else
                            "no epoch had finished, so there is no checkpoint yet")
                    raise UserError(f"interrupted in epoch {epoch + 1}; {kept}, and --resume --out {cfg.out} "
                                    f"repeats epoch {epoch + 1}")
                if (step + 1) % cfg.log_every == 0:
                    progress.line(step + 1, epoch=epoch + 1, loss=f"{loss.item():.4f}", lr=f"{lr:.1e}")
            train_loss, train_acc = loss_sum.item() / per_epoch, correct.item() / (per_epoch * cfg.batch_size)
            val_loss, val_acc = evaluate(model, x_val, y_val)
            for key, value in zip(curves, (epoch + 1, lr, train_loss, train_acc, val_loss, val_acc)):
                curves[key].append(value)
            if val_acc > best["val_acc"]:  # keep the best-validation weights for the test evaluation
                best = {"val_acc": val_acc, "epoch": epoch + 1, "train_acc": train_acc,
                        "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
            print(f"epoch {epoch + 1:3d}/{cfg.epochs} | train loss {train_loss:.4f} acc {train_acc:.4f} "
                  f"| val loss {val_loss:.4f} acc {val_acc:.4f} | grad entry {flows[-1]['entry.0.weight']:.2e}",
                  flush=True)
            checkpoint(epoch + 1)
            progress.restart((epoch + 1) * per_epoch)
            if flag.stop:
                raise interrupted(epoch + 1, ckpt_path, cfg, unit="epoch")
    if stop_epoch < cfg.epochs:
        print(f"paused after epoch {stop_epoch} as asked (--pause-at); continue with --resume --out {cfg.out}")
        return None
    model.load_state_dict(best["state"])
    test_loss, test_acc = evaluate(model, *test)
    result = {"seed": seed, "params": count_params(model), "epochs": stop_epoch, "best_epoch": best["epoch"],
              "train_acc": curves["train_acc"][-1], "val_acc": curves["val_acc"][-1],
              "best_val_acc": best["val_acc"], "test_acc": test_acc, "test_loss": test_loss,
              "seconds": seconds_before + time.time() - t0, "curves": curves, "grad_flow": flows}
    checkpoint(stop_epoch, result)
    plot_run(run_dir, result)
    return result


def load_cifar_splits(cfg, device):
    """CIFAR-100 on the device, normalised per channel: train/val by a seeded permutation, and test."""
    x, y = data.load_split("cifar100", "train", cfg.data_dir or None)
    xt, yt = data.load_test("cifar100", cfg.data_dir or None)  # evaluation only
    if not 0 < cfg.val_size < len(x):
        raise UserError(f"--val-size must be between 1 and {len(x) - 1}")
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))  # the same split for every run
    x = torch.from_numpy(x).to(device).float() / 255
    mean, std = x.mean((0, 2, 3), keepdim=True), x.std((0, 2, 3), keepdim=True)  # statistics of train+val
    norm = lambda a: ((a - mean) / std).contiguous(memory_format=torch.channels_last)
    y = torch.from_numpy(y).to(device)
    tr, va = perm[cfg.val_size:].to(device), perm[:cfg.val_size].to(device)
    test = (norm(torch.from_numpy(xt).to(device).float() / 255), torch.from_numpy(yt).to(device))
    return (norm(x[tr]), y[tr]), (norm(x[va]), y[va]), test


def gradflow(cfg):
    """`python mm.py gradflow`: train one configuration (or --compare the five), with gradient-flow plots."""
    check_bounds(cfg, GRADFLOW_BOUNDS)
    VGG(cfg.depth)  # refuses a depth that cannot be built, before any work
    name = f"VGG_{cfg.depth:02d}" + " + BN" * cfg.bn + " + residual" * cfg.residual
    configs = COMPARISONS if cfg.compare else [Comparison(name, cfg.depth, cfg.bn, cfg.residual, cfg.lr, None, None)]
    check_out(cfg.out, holds_checkpoint(cfg.out), cfg.resume)
    plan = []  # (configuration, its config, the run folders of its seeds)
    for config in configs:
        run_cfg = replace(cfg, depth=config.depth, bn=config.bn, residual=config.residual, lr=config.lr)
        folder = run_folder(cfg.out, config.name)
        plan.append((config, run_cfg, [os.path.join(folder, f"seed{cfg.seed + r}") for r in range(cfg.runs)]))
        for run_dir in plan[-1][2]:  # a checkpoint that cannot be continued is refused before any work
            if os.path.exists(os.path.join(run_dir, "ckpt.pt")):
                load_checkpoint(os.path.join(run_dir, "ckpt.pt"), "gradflow", run_cfg)
    hw = pick_hardware(cfg)
    splits = load_cifar_splits(cfg, hw.device)
    print(f"gradflow | CIFAR-100 train {len(splits[0][0])}, val {len(splits[1][0])}, test {len(splits[2][0])} | "
          f"{cfg.epochs} epochs of {len(splits[0][0]) // cfg.batch_size} steps")
    if not cfg.resume:  # the config a run started with; metrics.json records the one it finished with
        save_json(os.path.join(cfg.out, "config.json"), asdict(cfg))
    rows = []
    for config, run_cfg, run_dirs in plan:
        n_params = count_params(VGG(config.depth, config.bn, config.residual))
        print(f"=== {config.name}: > Number of parameters {n_params}")
        results = []
        for r, run_dir in enumerate(run_dirs):
            result = train_vgg(run_cfg, cfg.seed + r, run_dir, splits, hw)
            if result is None:  # paused
                return None
            save_json(os.path.join(run_dir, "metrics.json"), result)
            results.append(result)
        row = {"name": config.name, "params": results[0]["params"], "epochs": results[0]["epochs"], "lr": config.lr,
               "known_train_val": None if config.known_train_acc is None else [config.known_train_acc,
                                                                                 config.known_val_acc],
               "runs": len(results)}
        for key in ("train_acc", "val_acc", "best_val_acc", "test_acc"):
            row[f"{key}_mean"], row[f"{key}_std"] = mean_std([r[key] for r in results])
        rows.append(row)
    print(f"\naccuracy % as mean ± std over {cfg.runs} seed(s) (sample std, 0 for one seed); known = published "
          f"train / val %")
    print_table([{"configuration": row["name"], "params": f"{row['params']:,}",
                  "train acc": percent((row["train_acc_mean"], row["train_acc_std"])),
                  "val acc": percent((row["val_acc_mean"], row["val_acc_std"])),
                  "test acc": percent((row["test_acc_mean"], row["test_acc_std"])),
                  "known": "{} / {}".format(*row["known_train_val"]) if row["known_train_val"] else "-"}
                 for row in rows])
    save_json(os.path.join(cfg.out, "metrics.json"), {"config": asdict(cfg), "device": str(hw.device),
                                                      "mixed_precision": hw.precision, "table": rows})
    print(f"wrote {cfg.out}/config.json, metrics.json and, per run, gradflow.png, curves.png, metrics.json, ckpt.pt")
    return rows

# ---------------------------------------------------------------------------------------------
# Speed benchmark: each command's training step, the sampler and the Inception features on this device

@dataclass
class BenchConfig:
    out: str = "runs/bench"  # folder for bench.json
    repeats: int = 10  # timed repetitions of each measurement, after 3 untimed warm-up ones
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 on GPUs with fast bf16, fp16 on older GPUs, fp32 on CPU) | fp32 | bf16 | fp16
    deterministic: bool = True  # GPU: deterministic cuDNN/cuBLAS kernels (--no-deterministic: what cuDNN finds fastest)
    compile: str = "auto"  # torch.compile the generator's training forward: auto (on for CUDA) | on | off


BENCH_BOUNDS = {"repeats": "[1, 1000]"}


def time_call(fn, hw, repeats):
    """Seconds per call of fn: 3 warm-up calls (they absorb compilation and cuDNN's search), then the mean
    of `repeats` timed calls, synchronised with the GPU at both ends."""
    for _ in range(3):
        fn()
    sync = torch.cuda.synchronize if hw.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - t0) / repeats


def bench(cfg):
    """`python mm.py bench`: time the default training steps, the sampler and Inception; write bench.json."""
    check_bounds(cfg, BENCH_BOUNDS)
    check_out(cfg.out, has_run=False)
    hw = pick_hardware(cfg)
    torch.manual_seed(0)
    rows = []

    def training_step(model, opt, loss_fn):  # the loops' update, without their bookkeeping
        def step():
            with autocast(hw):
                loss = loss_fn(model)
            opt.zero_grad(set_to_none=True)
            loss.float().backward()
            opt.step()
        return step

    c = ClassifyConfig()
    model = make_classifier(c).to(hw.device, memory_format=torch.channels_last)
    x = torch.randn(c.batch_size, 3, 28, 28, device=hw.device)
    y = torch.randint(0, 20, (c.batch_size,), device=hw.device)
    loss_fn = lambda m: F.cross_entropy(m(augment_digits(x, c, -0.42)).float(), y)
    seconds = time_call(training_step(model, torch.optim.AdamW(model.parameters()), loss_fn), hw, cfg.repeats)
    rows.append(("classify", f"train step, batch {c.batch_size}", seconds, c.steps))
    g = GenerateConfig()
    unet = make_unet(g).to(hw.device, memory_format=torch.channels_last)
    use_compile = cfg.compile == "on" or (cfg.compile == "auto" and hw.device.type == "cuda")
    forward = torch.compile(unet) if use_compile else unet  # as the generator's training loop runs it
    xg = torch.randn(g.batch_size, 3, 32, 32, device=hw.device)
    yg = torch.randint(0, 100, (g.batch_size,), device=hw.device)
    seconds = time_call(training_step(forward, torch.optim.Adam(unet.parameters()), lambda m: edm_loss(m, xg, yg, g)),
                        hw, cfg.repeats)
    rows.append(("generate", f"train step, batch {g.batch_size}", seconds, g.steps))
    d = GradflowConfig()
    vgg = VGG(38).to(hw.device, memory_format=torch.channels_last)
    xv = torch.randn(d.batch_size, 3, 32, 32, device=hw.device)
    yv = torch.randint(0, 100, (d.batch_size,), device=hw.device)
    seconds = time_call(training_step(vgg, torch.optim.Adam(vgg.parameters()), lambda m: F.cross_entropy(m(xv), yv)),
                        hw, cfg.repeats)
    rows.append(("gradflow", f"VGG_38 train step, batch {d.batch_size}", seconds, 100 * 47_500 // d.batch_size))
    n = 1000 if hw.device.type == "cuda" else 8  # a CPU samples slowly: a small batch is enough to time it
    unet.eval()
    z, emb = torch.randn(n, 3, 32, 32, device=hw.device), unet.class_embed(torch.arange(n, device=hw.device) % 100)
    seconds = time_call(lambda: edm_heun_sampler(unet, z, emb, g.sampler_steps, 1.0, hw), hw, max(1, cfg.repeats // 5))
    rows.append(("generate", f"sampler, NFE {2 * g.sampler_steps - 1}, {n} images", seconds / n, g.fid_samples))
    n = 200 if hw.device.type == "cuda" else 10
    inception = fid.FIDInceptionV3().eval().to(hw.device)  # random weights: the same work as the real ones
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)
    seconds = time_call(lambda: fid.inception_features(images, inception, quiet=True), hw, max(1, cfg.repeats // 5))
    rows.append(("fid", f"Inception features, {n} images", seconds / n, 2 * g.fid_samples))
    print(f"\nspeed on {hw.device} ({torch.cuda.get_device_name() if hw.device.type == 'cuda' else 'CPU'}), "
          f"precision {hw.precision}")
    print_table([{"command": command, "what": what, "ms each": f"{1000 * s:.1f}", "per second": f"{1 / s:,.1f}",
                  "count": f"{count:,}", "time for the count": fmt_time(s * count)}
                 for command, what, s, count in rows])
    result = {"device": str(hw.device), "mixed_precision": hw.precision, "torch": torch.__version__,
              "rows": [{"command": command, "what": what, "seconds_each": s, "count": count}
                       for command, what, s, count in rows]}
    save_json(os.path.join(cfg.out, "bench.json"), result)
    print(f"wrote {cfg.out}/bench.json (count: steps of a full run, or samples / images FID needs)")
    return result


# ---------------------------------------------------------------------------------------------
# Report: the coursework papers' tables and figures from finished run folders (report.md, report.tex)

@dataclass
class ReportConfig:
    classify: str = ""  # a finished classify run folder (empty: leave the classifier out)
    generate: str = ""  # a finished generate run folder (empty: leave the generator out)
    gradflow: str = ""  # a finished gradflow run folder, e.g. from --compare (empty: leave the depth study out)
    ablation: str = ""  # a folder of finished classify runs; one row per recipe, its seeds pooled (mean ± std)
    out: str = "runs/report"  # folder for report.md, report.tex, the figures (PNG, 300 dpi) and their CSVs


def read_metrics(folder, command):
    """metrics.json of a finished run, or None with one line saying why."""
    path = os.path.join(folder, "metrics.json")
    if not os.path.isfile(path):
        print(f"{command}: {folder} has no metrics.json (unfinished, or not a {command} run); left out")
        return None
    with open(path) as f:
        return json.load(f)


def tex_escape(text):
    for plain, tex in (("\\", r"\textbackslash{}"), ("%", r"\%"), ("_", r"\_"), ("&", r"\&"), ("#", r"\#"),
                       ("±", r"$\pm$"), ("≤", r"$\le$"), ("<", r"$<$"), ("σ", r"$\sigma$")):
        text = text.replace(plain, tex)
    return text


class Report:
    """Collects markdown and LaTeX side by side: tables (booktabs), figures (with captions), lines."""

    def __init__(self, out):
        self.out, self.md, self.tex = out, [], []

    def heading(self, text):
        self.md += [f"## {text}", ""]
        self.tex += [rf"\subsection*{{{tex_escape(text)}}}"]

    def line(self, text):
        self.md += [text, ""]
        self.tex += [tex_escape(text), ""]

    def table(self, caption, rows):
        keys = list(rows[0])
        self.md += [f"**{caption}**", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        self.md += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows] + [""]
        env, width = ("table*", r"\textwidth") if len(keys) > 5 else ("table", r"\columnwidth")  # wide: both columns
        shrink = rf"\resizebox{{\ifdim\width>{width} {width}\else\width\fi}}{{!}}{{%"  # scaled down only, never up
        self.tex += [rf"\begin{{{env}}}[t]", r"\centering", rf"\caption{{{tex_escape(caption)}}}", shrink,
                     r"\begin{tabular}{l" + "r" * (len(keys) - 1) + "}", r"\toprule",
                     " & ".join(tex_escape(k) for k in keys) + r" \\", r"\midrule"]
        self.tex += [" & ".join(tex_escape(str(r[k])) for k in keys) + r" \\" for r in rows]
        self.tex += [r"\bottomrule", r"\end{tabular}}", rf"\end{{{env}}}", ""]

    def figure(self, name, caption):
        self.md += [f"![{caption}]({name})", "", f"*{caption}*", ""]
        size = r"width=\columnwidth,height=0.45\textheight,keepaspectratio"  # tall grids stay on the page
        self.tex += [r"\begin{figure}[t]", r"\centering", rf"\includegraphics[{size}]{{{name}}}",
                     rf"\caption{{{tex_escape(caption)}}}", r"\end{figure}", ""]


def penalty_line(params, param_limit, steps, step_limit):
    marks = budget_penalty(params, param_limit, False) + budget_penalty(steps, step_limit, True)
    return f"penalty: {marks} marks (parameters {params:,} < {param_limit:,}; steps {steps:,} ≤ {step_limit:,})"


def mean_band(curves, key):
    """Mean and mean ± std across runs of curves[run][key] (runs share their x values)."""
    values = np.array([c[key] for c in curves], dtype=np.float64)  # (runs, points)
    mean, std = values.mean(0), values.std(0, ddof=1) if len(values) > 1 else np.zeros(values.shape[1])
    return mean.tolist(), ((mean - std).tolist(), (mean + std).tolist())


def recipe_flags(config):
    """The flags that set a classify run's recipe apart from today's defaults, e.g. "--train-on train"
    ("(default)" if none). The seed, folders, logging and hardware (RESUME_FREE) are not part of a recipe."""
    flags = []
    for key, default in asdict(ClassifyConfig()).items():
        value = config.get(key, default)  # a field older than the run's config: it ran with the default
        if key in RESUME_FREE["classify"] or key == "seed" or value == default:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        else:
            flags.append(f"{flag} {value:g}" if isinstance(value, float) else f"{flag} {value}")
    return " ".join(flags) or "(default)"


def ablation_rows(folder):
    """The ablation table from the finished classify runs in folder's sub-folders: one row per recipe, its
    seeds pooled, whether they ran as one `--runs N` folder or as one folder per seed; best test first."""
    recipes = {}  # recipe flags -> {seed: that run's result}
    for name in sorted(os.listdir(folder)):
        if not os.path.isdir(os.path.join(folder, name)):
            continue
        m = read_metrics(os.path.join(folder, name), "classify")
        if m is None:
            continue
        seeds = recipes.setdefault(recipe_flags(m["config"]), {})
        for run in m["per_run"]:
            if run["seed"] in seeds:  # the same recipe and seed twice would count one result as two
                print(f"classify: {name} repeats seed {run['seed']} of its recipe; counted once")
            seeds.setdefault(run["seed"], run)
    rows = []
    for flags, seeds in recipes.items():
        runs = [seeds[s] for s in sorted(seeds)]
        stat = lambda key: mean_std([r[key] for r in runs])
        test = stat("test_acc")  # (mean, std): sorts the rows and weighs the best row's lead
        rows.append({"recipe": flags, "seeds": len(runs), "test": test, "per seed": [r["test_acc"] for r in runs],
                     "train loss": "{:.4f} ± {:.4f}".format(*stat("train_loss")),
                     "train acc %": percent(stat("train_acc")), "test acc %": percent(test),
                     "single view %": percent(stat("test_acc_single_view")),
                     "gap (points)": percent(mean_std([r["train_acc"] - r["test_acc"] for r in runs]))})
    return sorted(rows, key=lambda row: -row["test"][0])


def report_classifier(rep, m):
    rep.heading("Classifier (AddNIST)")
    rep.line(penalty_line(m["params"], CLASSIFY_PARAM_LIMIT, m["steps"], CLASSIFY_STEP_LIMIT))
    n = m["runs"]
    rep.table(f"Classifier: final figures, mean ± std over {n} seed(s)", [
        {"parameters": f"{m['params']:,}", "steps": f"{m['steps']:,}",
         "train loss": f"{m['train_loss_mean']:.4f} ± {m['train_loss_std']:.4f}",
         "train acc %": percent((m["train_acc_mean"], m["train_acc_std"])),
         "test acc %": percent((m["test_acc_mean"], m["test_acc_std"]))}])
    curves = [r["curves"] for r in m["per_run"]]
    lines = []
    for key, label, colour in (("train_acc", "train", PALETTE[0]), ("test_acc", "test", PALETTE[1])):
        mean, band = mean_band(curves, key)
        lines.append(Line(f"{label} (mean ± std)", curves[0]["step"], mean, colour, band))
    line_plot(os.path.join(rep.out, "classifier_accuracy.png"), lines, f"AddNIST accuracy, {n} seed(s)", "step",
              "accuracy", percent=True)
    rep.figure("classifier_accuracy.png", f"Train and test accuracy over training: mean across {n} seed(s), "
                                          f"shaded ± one standard deviation.")


def report_ablation(rep, ablation, under_classifier):
    if not under_classifier:  # the table alone, without a --classify run's section to sit in
        rep.heading("Classifier ablation (AddNIST)")
    rep.table("Ablation: one row per recipe (its flags on top of the defaults), mean ± std over its seeds, "
              "best test accuracy first",
              [{k: v for k, v in row.items() if k not in ("test", "per seed")} for row in ablation])
    best = ablation[0]
    default = [row for row in ablation if row["recipe"] == "(default)"]
    line = f"best row: {best['recipe']} ({best['test acc %']} %, n={best['seeds']})"
    if default and default[0] is not best:
        # Welch's standard error of a difference of two means: sqrt(s1^2/n1 + s2^2/n2). A gap inside two of
        # them is what reseeding alone moves a mean by, so the sort order there is not a ranking.
        (best_mean, best_std), (default_mean, default_std) = best["test"], default[0]["test"]
        gap = best_mean - default_mean
        se = math.sqrt(best_std ** 2 / best["seeds"] + default_std ** 2 / default[0]["seeds"])
        line += (f"; the default recipe is {100 * gap:.2f} points below it (standard error of the difference "
                 f"{100 * se:.2f}: " + ("more than two standard errors)" if gap > 2 * se else
                                        "within two standard errors, level with it at these seeds)"))
    rep.line(line)
    strip_plot(os.path.join(rep.out, "ablation.png"), [(row["recipe"], row["per seed"]) for row in ablation],
               "AddNIST ablation: test accuracy of every seed", "test accuracy", highlight="(default)")
    rep.figure("ablation.png", "Test accuracy of each recipe's seeds (circles), their mean (bar) and ± one "
                               "standard deviation (whisker); best row on top, the default in red.")


def report_generator(rep, m, folder):
    rep.heading("Generator (CIFAR-100)")
    rep.line(penalty_line(m["params"], GENERATE_PARAM_LIMIT, m["steps"], GENERATE_STEP_LIMIT))
    rep.line(f"sampler: {m['sampler']}, {m['sampler_steps']} steps, NFE {m['nfe']}, guidance {m['guidance']}; "
             f"{m['fid_samples']:,} samples scored against the CIFAR-100 test split")
    rows = [{"metric": key, "value": "null" if m.get(key) is None else f"{m[key]:.4g}"}
            for key in fid.PANEL_MEANING if key in m]
    rep.table("Generator: the quality panel (realism, diversity, uniqueness)", rows)
    for name, caption in (("samples.png", "64 samples, the first of the run (not cherry-picked)."),
                          ("interpolations.png", "Interpolations between 8 pairs of samples."),
                          ("neighbours.png", "The first 8 samples, then the 8 samples nearest to a training "
                                             "image, each with its 3 nearest training images (pixel L2).")):
        if os.path.exists(os.path.join(folder, name)):
            Image.open(os.path.join(folder, name)).save(os.path.join(rep.out, "generator_" + name), dpi=(300, 300))
            rep.figure("generator_" + name, caption)


def report_depth_study(rep, m, folder):
    rep.heading("Depth study (CIFAR-100)")
    runs = {}  # configuration name -> its runs' metrics, read from OUT/<configuration>/seed*/metrics.json
    for row in m["table"]:
        sub = run_folder(folder, row["name"])
        runs[row["name"]] = [json.load(open(os.path.join(sub, d, "metrics.json"))) for d in sorted(os.listdir(sub))
                             if os.path.isfile(os.path.join(sub, d, "metrics.json"))]
    table = []
    for row in m["table"]:
        per = runs[row["name"]]
        last = lambda key: mean_std([r["curves"][key][-1] for r in per])
        table.append({"model": row["name"], "lr": f"{row['lr']:.0e}", "params": f"{row['params']:,}",
                      "train loss": "{:.3f} ± {:.3f}".format(*last("train_loss")),
                      "train acc %": percent(last("train_acc")),
                      "val loss": "{:.3f} ± {:.3f}".format(*last("val_loss")), "val acc %": percent(last("val_acc")),
                      "test acc %": percent((row["test_acc_mean"], row["test_acc_std"]))})
    rep.table(f"Depth study: final epoch, mean ± std over {m['table'][0]['runs']} seed(s)", table)
    for key, label in (("loss", "loss"), ("acc", "accuracy")):
        lines = []
        for i, (name, per) in enumerate(runs.items()):
            colour = PALETTE[i % len(PALETTE)]
            for split, shade in (("train", colour), ("val", tuple(v // 2 for v in colour))):
                mean, band = mean_band([r["curves"] for r in per], f"{split}_{key}")
                lines.append(Line(f"{name}, {split}", per[0]["curves"]["epoch"], mean, shade, band))
        line_plot(os.path.join(rep.out, f"depth_{label}.png"), lines, f"{label} per epoch", "epoch", label,
                  size=(1400, 700), percent=key == "acc")
        rep.figure(f"depth_{label}.png", f"Train and validation {label} of every configuration "
                                         f"(mean ± std over seeds).")
    lines = []
    for i, (name, per) in enumerate(runs.items()):
        flow = per[0]["grad_flow"][-1]  # the last epoch of the first seed
        xs = [j / max(1, len(flow) - 1) for j in range(len(flow))]
        lines.append(Line(name, xs, list(flow.values()), PALETTE[i % len(PALETTE)]))
    line_plot(os.path.join(rep.out, "depth_gradflow.png"), lines, "gradient flow at the last epoch",
              "relative depth of the layer (0 = entry, 1 = classifier)", "mean |dL/dW|", size=(1400, 700), logy=True)
    rep.figure("depth_gradflow.png", "Mean absolute gradient of every weight layer at the last epoch, entry to "
                                     "classifier: the plain 38-layer network's gradient vanishes towards its entry.")


def report(cfg):
    """`python mm.py report`: report.md and report.tex with every table and figure the two papers need."""
    if not (cfg.classify or cfg.generate or cfg.gradflow or cfg.ablation):
        raise UserError("name at least one finished run: --classify DIR, --generate DIR, --gradflow DIR "
                        "or --ablation DIR")
    check_out(cfg.out, has_run=False)
    found = {command: read_metrics(folder, command) if folder else None
             for command, folder in (("classify", cfg.classify), ("generate", cfg.generate), ("gradflow", cfg.gradflow))}
    if cfg.ablation and not os.path.isdir(cfg.ablation):
        raise UserError(f"--ablation {cfg.ablation} is not a folder")
    ablation = ablation_rows(cfg.ablation) if cfg.ablation else []
    if cfg.ablation and not ablation:
        raise UserError(f"--ablation {cfg.ablation} has no sub-folder holding a finished classify run "
                        f"(metrics.json); nothing to tabulate")
    if not any(found.values()) and not ablation:
        raise UserError("none of the named runs has finished (no metrics.json); nothing to report")
    os.makedirs(cfg.out, exist_ok=True)
    rep = Report(cfg.out)
    if found["classify"]:
        report_classifier(rep, found["classify"])
    if ablation:
        report_ablation(rep, ablation, under_classifier=bool(found["classify"]))
    if found["generate"]:
        report_generator(rep, found["generate"], cfg.generate)
    if found["gradflow"]:
        report_depth_study(rep, found["gradflow"], cfg.gradflow)
    with open(os.path.join(cfg.out, "report.md"), "w") as f:
        f.write("# Results\n\n" + "\n".join(rep.md))
    with open(os.path.join(cfg.out, "report.tex"), "w") as f:  # \input{report} inside a paper with booktabs, graphicx
        f.write("% generated by `python mm.py report`; needs \\usepackage{booktabs,graphicx}\n" + "\n".join(rep.tex))
    print(f"wrote {cfg.out}/report.md, report.tex and {len([n for n in os.listdir(cfg.out) if n.endswith('.png')])} "
          f"figures (PNG at 300 dpi, numbers as CSV beside the charts)")
    return rep


# ---------------------------------------------------------------------------------------------
# Figures: line charts and image grids as PNG, drawn with Pillow; every chart's numbers also go to a CSV

PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75)]
Line = namedtuple("Line", "label xs ys colour band", defaults=(None,))  # band: (lows, highs), a shaded ± area


def nice_ticks(lo, hi, count=5, integer=False):
    """Round tick values spanning [lo, hi]: steps of 1, 2, 2.5 or 5 times a power of ten (whole steps only
    for integer data such as epochs)."""
    if hi <= lo:
        lo, hi = lo - 0.5 * (abs(lo) or 1.0), hi + 0.5 * (abs(hi) or 1.0)
    raw = max((hi - lo) / count, 1.0) if integer else (hi - lo) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw * 0.999 and not (integer and m == 2.5))
    first, last = math.floor(lo / step + 1e-9) * step, math.ceil(hi / step - 1e-9) * step
    return [first + i * step for i in range(round((last - first) / step) + 1)], step


def tick_text(value, step):
    """A tick label with just the decimals its step needs (a step of 2.5e-k needs one more than 1e-k)."""
    power = math.floor(math.log10(step) + 1e-9)
    extra = 1 if round(step / 10 ** power, 1) == 2.5 else 0
    return f"{value:.{max(0, -power) + extra}f}"


def line_plot(path, lines, title, xlabel, ylabel, size=(975, 600), logy=False, percent=False, xlabels=None):
    """Draw Lines as a chart PNG (Pillow) and write their numbers to a CSV beside it.

    Round ticks; the legend sits in its own panel right of the data, so it never covers a curve; percent
    plots y x 100; logy plots log10(y) with one label per decade (10^-3 ...); xlabels names the integer x
    positions 0..n-1 (rotated). The default size is a 3.25-inch paper column at 300 dpi.
    """
    W, H = size
    font = ImageFont.load_default(size=max(12, W // 40))
    fy = (lambda y: math.log10(max(y, 1e-30))) if logy else (lambda y: 100 * y if percent else y)
    legend = dict((line.label, line.colour) for line in lines)  # same-label lines share one legend row
    legend_w = max(font.getlength(label) for label in legend) + 50
    right, top = legend_w + 20, 30 + font.size * 2
    bottom = font.size * 3 + 10 if xlabels is None else max(map(font.getlength, xlabels)) + 2 * font.size + 20
    ys_all = [fy(y) for line in lines for y in line.ys] + [fy(v) for line in lines if line.band for v in
                                                             line.band[0] + line.band[1]]
    xs_all = [x for line in lines for x in line.xs]
    if logy:
        lo, hi = math.floor(min(ys_all)), math.ceil(max(ys_all))
        every = max(1, math.ceil((hi - lo) / 8))  # at most about 8 decade labels, the last one above the data
        y_ticks = [lo + i * every for i in range(math.ceil((hi - lo) / every) + 1)]
        y_text = lambda v: f"1e{v:d}"
    else:
        y_ticks, y_step = nice_ticks(min(ys_all), max(ys_all))
        y_text = lambda v: tick_text(v, y_step)
    if xlabels is None:
        x_ticks, x_step = nice_ticks(min(xs_all), max(xs_all), integer=all(float(x).is_integer() for x in xs_all))
    else:
        x_ticks, x_step = [0, max(len(xlabels) - 1, 1)], 1
    x0, x1, y0, y1 = x_ticks[0], x_ticks[-1], y_ticks[0], max(y_ticks[-1], y_ticks[0] + 1e-12)
    left = 16 + max(font.getlength(y_text(v)) for v in y_ticks)  # room for the widest tick label
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)

    def px(x, y):  # data -> pixel coordinates
        return (left + (x - x0) / (x1 - x0) * (W - left - right),
                H - bottom - (y - y0) / (y1 - y0) * (H - top - bottom))

    for v in y_ticks:  # horizontal grid lines with their labels
        _, yp = px(x0, v)
        d.line([left, yp, W - right, yp], fill=(225, 225, 225))
        d.text((left - 6, yp), y_text(v), fill="black", font=font, anchor="rm")
    if xlabels is None:
        for v in x_ticks:
            d.text((px(v, y0)[0], H - bottom + 6), tick_text(v, x_step), fill="black", font=font, anchor="ma")
    for i, text in enumerate(xlabels or []):  # one rotated label per category
        box = font.getbbox(text)
        tile = Image.new("RGB", (box[2] + 2, box[3] + 2), "white")
        ImageDraw.Draw(tile).text((1, 1), text, fill="black", font=font)
        tile = tile.rotate(90, expand=True)
        img.paste(tile, (int(px(i, y0)[0] - tile.width / 2), int(H - bottom + 4)))
    for line in lines:  # bands first, lightened, so every line stays visible above them
        if line.band:
            pale = tuple(int(255 - 0.25 * (255 - c)) for c in line.colour)
            upper = [px(x, fy(v)) for x, v in zip(line.xs, line.band[1])]
            lower = [px(x, fy(v)) for x, v in zip(line.xs, line.band[0])]
            if len(upper) > 1:
                d.polygon(upper + lower[::-1], fill=pale)
    for line in lines:
        points = [px(x, fy(y)) for x, y in zip(line.xs, line.ys)]
        if len(points) > 1:
            d.line(points, fill=line.colour, width=max(2, W // 300))
        for p in points[-1:]:  # a dot at the last value
            d.ellipse([p[0] - 4, p[1] - 4, p[0] + 4, p[1] + 4], fill=line.colour)
    d.rectangle([left, top, W - right, H - bottom], outline="black")
    for i, (label, colour) in enumerate(legend.items()):  # the legend, right of the data
        y = top + font.size * (0.7 + 1.4 * i)
        d.line([W - legend_w - 5, y, W - legend_w + 25, y], fill=colour, width=4)
        d.text((W - legend_w + 32, y), label, fill="black", font=font, anchor="lm")
    d.text(((left + W - right) / 2, 4), title, fill="black", font=font, anchor="ma")
    d.text(((left + W - right) / 2, H - font.size - 6), xlabel, fill="black", font=font, anchor="ma")
    d.text((8, font.size + 10), ylabel + (" (%)" if percent else ""), fill="black", font=font, anchor="la")
    img.save(path, dpi=(300, 300))
    with open(os.path.splitext(path)[0] + ".csv", "w") as f:  # the numbers behind the figure
        f.write("label,x,y,band_low,band_high\n")
        for line in lines:
            lows, highs = line.band or ([""] * len(line.xs), [""] * len(line.xs))
            for x, y, lo, hi in zip(line.xs, line.ys, lows, highs):
                f.write(f"{line.label},{x},{y},{lo},{hi}\n")


def strip_plot(path, rows, title, xlabel, highlight=None, plot_width=900):
    """One horizontal strip per (label, values) row, top to bottom: every value a hollow dot, the mean a
    vertical bar with a ± one-std whisker, so a reader sees whether rows differ by more than their seeds
    do. Values are fractions, drawn as percent; the `highlight` row is red. The figure widens with its
    labels so the data panel keeps plot_width pixels. Numbers to a CSV beside the PNG (label, value)."""
    font = ImageFont.load_default(size=24)
    row_h, top, bottom = 2.2 * font.size, 30 + font.size * 2, font.size * 3 + 10
    left = 20 + max(font.getlength(label) for label, _ in rows)  # labels sit left of the data
    right = left + plot_width  # the data panel's right edge; 30 px of margin beyond it
    width, height = int(right + 30), int(top + bottom + row_h * len(rows))
    spread = [mean_std(vs) for _, vs in rows]  # the axis spans every value and every whisker
    values = [100 * v for _, vs in rows for v in vs] + [100 * (m + s) for m, s in spread] + \
        [100 * (m - s) for m, s in spread]
    x_ticks, x_step = nice_ticks(min(values), max(values))
    x0, x1 = x_ticks[0], max(x_ticks[-1], x_ticks[0] + 1e-12)
    px = lambda v: left + (100 * v - x0) / (x1 - x0) * plot_width  # fraction -> pixel column
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    for v in x_ticks:  # vertical grid lines with their labels
        x = px(v / 100)
        d.line([x, top, x, height - bottom], fill=(225, 225, 225))
        d.text((x, height - bottom + 6), tick_text(v, x_step), fill="black", font=font, anchor="ma")
    dot = font.size / 3  # radius of a seed's circle
    for i, ((label, vs), (mean, std)) in enumerate(zip(rows, spread)):
        y = top + row_h * (i + 0.5)
        colour = PALETTE[1] if label == highlight else PALETTE[0]
        d.text((left - 10, y), label, fill=colour if label == highlight else "black", font=font, anchor="rm")
        d.line([px(mean - std), y, px(mean + std), y], fill=colour, width=3)  # ± one std whisker
        d.line([px(mean), y - row_h / 3, px(mean), y + row_h / 3], fill=colour, width=4)  # the mean
        for v in vs:
            d.ellipse([px(v) - dot, y - dot, px(v) + dot, y + dot], outline="black", width=2)
    d.rectangle([left, top, right, height - bottom], outline="black")
    d.text(((left + right) / 2, 4), title, fill="black", font=font, anchor="ma")
    d.text(((left + right) / 2, height - font.size - 6), xlabel + " (%)", fill="black", font=font, anchor="ma")
    img.save(path, dpi=(300, 300))
    with open(os.path.splitext(path)[0] + ".csv", "w") as f:
        f.write("label,value\n")
        for label, vs in rows:
            f.writelines(f"\"{label}\",{v}\n" for v in vs)


GRID_TITLE = 24  # pixels of the title bar above an image grid


def save_grid(path, images, nrow, title, scale=2, pad=2, gap_after=None, header=None):
    """uint8 (N, 3, H, W) -> one PNG grid with nrow images per row, each scaled up `scale` times, under a
    title bar. gap_after=k sets the first k columns apart (the query column of neighbours.png); header
    names the two column groups."""
    n, _, h, w = images.shape
    rows, gap = math.ceil(n / nrow), 0 if gap_after is None else 8
    font = ImageFont.load_default(size=14)
    width, height = nrow * (w * scale + pad) + pad + gap, rows * (h * scale + pad) + pad + GRID_TITLE
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, GRID_TITLE // 2), title if header is None else f"{header[0]}  |  {header[1]}", fill="black",
              font=font, anchor="lm")
    for i, img in enumerate(images.cpu()):
        column = i % nrow
        tile = Image.fromarray(img.permute(1, 2, 0).numpy()).resize((w * scale, h * scale), Image.NEAREST)
        x = pad + column * (w * scale + pad) + (gap if gap_after is not None and column >= gap_after else 0)
        canvas.paste(tile, (x, GRID_TITLE + pad + (i // nrow) * (h * scale + pad)))
    canvas.save(path)


def plot_accuracy(path, results):
    """Train and test accuracy over steps: one line per run, labelled by its seed (percent axis)."""
    lines = []
    for i, r in enumerate(results):
        c, colour = r["curves"], PALETTE[i % len(PALETTE)]
        lines.append(Line(f"train, seed {r['seed']}", c["step"], c["train_acc"], colour))
        lines.append(Line(f"test, seed {r['seed']}", c["step"], c["test_acc"], tuple(v // 2 for v in colour)))
    line_plot(path, lines, f"AddNIST accuracy ({len(results)} run{'s' * (len(results) > 1)})", "step", "accuracy",
              percent=True)


def plot_run(run_dir, result):
    """gradflow.png (mean |grad| per layer, a line per chosen epoch) and curves.png (accuracy per epoch)."""
    flows, names = result["grad_flow"], list(result["grad_flow"][0])
    n = len(flows)
    chosen = sorted({0, n // 4, n // 2, 3 * n // 4, n - 1})  # a few epochs, first and last included
    lines = [Line(f"epoch {e + 1}", list(range(len(names))), [flows[e][k] for k in names],
                  PALETTE[i % len(PALETTE)]) for i, e in enumerate(chosen)]
    line_plot(os.path.join(run_dir, "gradflow.png"), lines, "gradient flow: mean |dL/dW| per layer", "layer",
              "mean |grad|", size=(1400, 700), logy=True, xlabels=[layer_name(k) for k in names])
    c = result["curves"]
    line_plot(os.path.join(run_dir, "curves.png"),
              [Line("train", c["epoch"], c["train_acc"], PALETTE[0]),
               Line("val", c["epoch"], c["val_acc"], PALETTE[1])],
              "accuracy per epoch", "epoch", "accuracy", percent=True)


# ---------------------------------------------------------------------------------------------
# CLI: argparse subcommands built from the config dataclasses, so --help lists every knob

COMMANDS = {"classify": (ClassifyConfig, classify, "train the AddNIST classifier under its budget"),
            "generate": (GenerateConfig, generate, "train the CIFAR-100 diffusion model under its budget, then score"),
            "gradflow": (GradflowConfig, gradflow, "depth study: VGG_08 vs VGG_38 on CIFAR-100, gradient flow, fixes"),
            "bench": (BenchConfig, bench, "time each command's training step, the sampler and Inception on a device"),
            "report": (ReportConfig, report, "report.md and report.tex with the tables and figures of finished runs")}


def field_help(cls):
    """{field name: its trailing comment}, read from the dataclass source so help and code never drift."""
    src = inspect.getsource(cls)
    return dict(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.+)$", src, flags=re.M))


def add_config_args(parser, cls):
    """One --flag per dataclass field, with its type, default and comment."""
    helps = field_help(cls)
    for f in fields(cls):
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            shown = "on" if f.default else "off"
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                                help=f"{helps[f.name]} (default: {shown})")
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            shown = "%(default)s" if f.default != "" else "empty"
            parser.add_argument(flag, type=typ, default=f.default, choices=CHOICES.get(f.name),
                                metavar=f.name.upper(), help=f"{helps[f.name]} (default: {shown})")


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag gets one line (what is wrong, where to look) instead of a usage block."""

    def error(self, message):
        sys.exit(f"error: {message} (see {self.prog} --help)")


def main(argv=None):
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (cls, _, text) in COMMANDS.items():
        add_config_args(sub.add_parser(name, help=text, description=text), cls)
    args = vars(parser.parse_args(argv))
    cls, run_command, _ = COMMANDS[args.pop("command")]
    try:
        run_command(cls(**args))
    except UserError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:  # a second Ctrl-C: no new checkpoint, the last complete one stands
        kept = (f"the checkpoint at {LAST_CHECKPOINT['path']} (after {LAST_CHECKPOINT['step']:,}) is kept"
                if LAST_CHECKPOINT else "no checkpoint was written in this call")
        sys.exit(f"error: aborted by a second Ctrl-C; {kept}")


if __name__ == "__main__":
    main()
