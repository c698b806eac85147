"""Tests for Minimal Mastery: `python test_mm.py` (or `pytest test_mm.py`).

Offline, CPU only, seeded. Each test checks our code against a reference, a closed form or a property
that a wrong program breaks. Downloads are tested against a local HTTP server on 127.0.0.1 that serves
fixture files written here in the official formats; nothing here needs ../shared or the internet.
"""
import atexit, contextlib, copy, csv, glob, hashlib, http.server, io, itertools, json, math, os
import pickle, shutil, signal, subprocess, sys, tarfile, tempfile, threading, time, traceback, types, zipfile
from dataclasses import replace
from unittest import mock

import numpy as np, torch
import torch.nn.functional as F

import data, fid, mm

HERE = os.path.dirname(os.path.abspath(__file__))
DEVICE = os.environ.get("MM_TEST_DEVICE", "cpu")  # `python test_mm.py --device cuda` runs the device tests there
HW = mm.Hardware(torch.device(DEVICE), "fp32")  # what the tests train on
torch.set_num_threads(min(2, torch.get_num_threads()))

class Skip(Exception):
    """Raised by a test whose optional reference is not installed: reported as skipped, never as passed."""

TMP_DIRS = []  # removed at exit, under pytest too
atexit.register(lambda: [shutil.rmtree(d, ignore_errors=True) for d in TMP_DIRS])

def tmpdir():
    TMP_DIRS.append(tempfile.mkdtemp(prefix="mm_test_"))
    return TMP_DIRS[-1]

def expect_error(fn, *needles):
    """Run fn, demand a UserError whose one-line message contains every needle; return the message."""
    try:
        fn()
    except data.UserError as e:
        msg = str(e)
        assert "\n" not in msg and all(n in msg for n in needles), (needles, msg)
        return msg
    raise AssertionError(f"expected a UserError mentioning {needles}")

def quiet(fn, *args, **kw):
    """Call fn with its stdout and stderr captured; returns (result, captured text)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        return fn(*args, **kw), buf.getvalue()

def one_line_error(r, needle):
    """A finished subprocess failed with exactly one `error:` line naming needle, and no traceback (beside the
    notes that MM_TRUST_LOCAL=1 prints for the fixtures it accepts)."""
    lines = [line for line in r.stderr.strip().splitlines() if "(MM_TRUST_LOCAL=1)" not in line]
    assert r.returncode != 0 and len(lines) == 1 and lines[0].startswith("error:"), (r.args, r.stderr)
    assert needle in lines[0], (r.args, needle, lines[0])

# ---------------------------------------------------------------------------------------------
# Fixtures in the official on-disk formats

def write_addnist(d, n=(48, 16, 24), seed=0):
    """AddNIST layout: {split}_x.npy float32 (N,3,28,28), {split}_y.npy int64, plus metadata."""
    rng = np.random.default_rng(seed)
    os.makedirs(d, exist_ok=True)
    for split, k in zip(("train", "valid", "test"), n):
        np.save(os.path.join(d, f"{split}_x.npy"), rng.normal(size=(k, 3, 28, 28)).astype(np.float32))
        np.save(os.path.join(d, f"{split}_y.npy"), rng.integers(0, 20, k).astype(np.int64))
    json.dump({"num_classes": 20, "input_shape": [n[0], 3, 28, 28]}, open(os.path.join(d, "metadata"), "w"))
    return d

def zip_bytes(files):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, blob in files.items():
            z.writestr(name, blob)
    return buf.getvalue()

def addnist_zip_bytes(nested=True):
    """The article zip, with the files inside a folder of a zip inside the zip (both layouts are handled)."""
    src = write_addnist(tmpdir())
    inner = zip_bytes({f"AddNIST/{name}": open(os.path.join(src, name), "rb").read() for name in os.listdir(src)})
    return zip_bytes({"AddNIST.zip": inner}) if nested else inner

def tar_member(tar, name, obj):
    blob = pickle.dumps(obj, protocol=2)
    info = tarfile.TarInfo(name)
    info.size = len(blob)
    tar.addfile(info, io.BytesIO(blob))

def cifar_tar_bytes(n_train=20, n_test=10, seed=0, smooth=False, name="cifar100"):
    """The official archive of CIFAR-100 (pickles train, test) or CIFAR-10 (data_batch_1..5, test_batch): bytes
    keys, b'data' uint8 (N, 3072) channel-major. smooth gives images with structure to learn (one colour per
    image) instead of uniform noise."""
    spec, rng, buf = data.CIFAR[name], np.random.default_rng(seed), io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for split, n in (("train", n_train), ("test", n_test)):
            pixels = (np.repeat(rng.integers(0, 256, (n, 3, 1), dtype=np.uint8), 1024, axis=2).reshape(n, 3072)
                      if smooth else rng.integers(0, 256, (n, 3072), dtype=np.uint8))
            labels = rng.integers(0, spec["classes"], n)
            for member, part in zip(spec[split], np.array_split(np.arange(n), len(spec[split]))):
                batch = {b"data": pixels[part], spec["labels"]: labels[part].tolist(), b"batch_label": b"b"}
                tar_member(tar, f"{spec['folder']}/{member}", batch)
    return buf.getvalue()

def cifar_accepted(blob, name="cifar100", **spec):
    """The dataset's checksum and size set to those of `blob` (and any other field of its spec)."""
    return mock.patch.dict(data.CIFAR[name], md5=hashlib.md5(blob).hexdigest(), size=len(blob), **spec)

@contextlib.contextmanager
def http_server(routes):
    """Serve {path: (status, body, claimed_length or None)} on 127.0.0.1; yields (base_url, hit counter)."""
    hits = []
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            status, body, claimed = routes.get(self.path, (404, b"not found", None))
            self.send_response(status)
            self.send_header("Content-Length", str(claimed or len(body)))
            self.end_headers()
            self.wfile.write(body)  # when claimed > len(body), the client sees a truncated transfer
            self.close_connection = True
        def log_message(self, *args):
            pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", hits
    finally:
        server.shutdown()
        server.server_close()

def closed_url():
    """The address of a server that has just shut down: nothing listens there."""
    with http_server({}) as (url, _):
        return url

patched = mock.patch.multiple  # patched(module, NAME=value, ...): set for a `with` block, then restored

# Tiny configs of the three commands (each runs in seconds on a CPU)

def tiny_cfg(root, out, **kw):
    base = dict(data_dir=root, out=out, arch="8,M,16", batch_size=8, steps=6, eval_every=3, log_every=3,
                eval_train=32, warmup_steps=2, device=DEVICE)
    return mm.ClassifyConfig(**{**base, **kw})

def tiny_gen_cfg(root, out, **kw):
    base = dict(data_dir=root, out=out, widths="8,16,16", emb_dim=32, steps=6, batch_size=8, warmup_fraction=0.3,
                sampler_steps=2, fid_samples=16, sample_batch=16, log_every=3, device=DEVICE)
    return mm.GenerateConfig(**{**base, **kw})

def tiny_gradflow_cfg(root, out, **kw):
    base = dict(data_dir=root, out=out, depth=8, epochs=2, batch_size=4, val_size=4, log_every=5, device=DEVICE)
    return mm.GradflowConfig(**{**base, **kw})

@contextlib.contextmanager
def tiny_cifar(n_train=24, n_test=16, smooth=False, root=None):
    """A CIFAR-100 archive in the official format (new, or the one already in `root`) with its checksum
    accepted, and no reachable FID weights (offline)."""
    path = os.path.join(root or tmpdir(), "cifar-100-python.tar.gz")
    if root is None:
        open(path, "wb").write(cifar_tar_bytes(n_train=n_train, n_test=n_test, smooth=smooth))
    with cifar_accepted(open(path, "rb").read()), patched(fid, WEIGHTS_URL=closed_url() + "/w.pth"):
        yield os.path.dirname(path)

TINY = {"classify": (mm.classify, tiny_cfg, 3), "generate": (mm.generate, tiny_gen_cfg, 3),
        "gradflow": (mm.gradflow, tiny_gradflow_cfg, 3)}  # command: (its function, tiny config, a pause within it)
SHARED = {}  # the tiny datasets, and the runs trained once on them that tests take copies of

def shared_data():
    """(AddNIST root, CIFAR-100 root): the tiny datasets of the shared runs, written once."""
    if not SHARED:
        SHARED["addnist"], SHARED["cifar"] = write_addnist(tmpdir()), tmpdir()
        open(os.path.join(SHARED["cifar"], "cifar-100-python.tar.gz"), "wb").write(cifar_tar_bytes(24, 16))
    return SHARED["addnist"], SHARED["cifar"]

def run_copy(command, paused=False):
    """A copy of the tiny `command` run (6 steps; gradflow: 2 epochs), finished or paused at step 3, which is
    trained once per session. -> (its data root, the copy)"""
    root = shared_data()[command != "classify"]
    if (command, paused) not in SHARED:
        fn, make_cfg, half = TINY[command]
        with tiny_cifar(root=shared_data()[1]):
            quiet(fn, make_cfg(root, out := tmpdir(), pause_at=half if paused else 0))
        SHARED[command, paused] = out
    shutil.copytree(SHARED[command, paused], copy := tmpdir(), dirs_exist_ok=True)
    return root, copy

# ---------------------------------------------------------------------------------------------
# The classifier's pieces against references

def test_sum_log_probs_matches_brute_force():
    torch.manual_seed(0)
    logits = torch.randn(5, 3, 10, dtype=torch.float64) * 3
    ours = mm.sum_log_probs(logits).double()
    p = torch.softmax(logits, -1).numpy()
    for b in range(5):
        ref = np.zeros(28)
        for i, j, k in itertools.product(range(10), repeat=3):
            ref[i + j + k] += p[b, 0, i] * p[b, 1, j] * p[b, 2, k]
        np.testing.assert_allclose(ours[b].exp().numpy(), ref[1:21], rtol=1e-5, atol=1e-7)
    digits = torch.tensor([[0, 0, 1], [9, 9, 2], [3, 4, 5], [1, 8, 0]])  # near-certain digits: sums 1, 20, 12, 9
    assert mm.sum_log_probs(F.one_hot(digits, 10).float() * 50).argmax(1).tolist() == (digits.sum(1) - 1).tolist()
    print(f"OK sum_log_probs vs brute force (maxdiff {abs(ours[b].exp().numpy() - ref[1:21]).max():.1e})")

def test_trunk_parameter_counts_and_head_sizes_are_analytic():
    # Default digit trunk 32,M,48,M,64,96 + GAP head, counted by hand: a 3x3 conv has 9*in*out weights (no
    # bias, BN follows), BN has 2*out, the linear head (in + 1) * 10.
    convs = [(1, 32), (32, 48), (48, 64), (64, 96)]
    by_hand = sum(9 * i * o + 2 * o for i, o in convs) + (96 + 1) * 10
    assert mm.count_params(mm.DigitSumNet(mm.ClassifyConfig().arch)) == by_hand == 98_506
    for arch in ("8,M,8,M,8,M,8,M", "8,M,8,M,8,M,8,M,8,M"):  # 28 -> 14 -> 7 -> 3 -> 1 fits; one more pool does not
        if arch.count("M") == 4:
            assert mm.DigitSumNet(arch)(torch.randn(2, 3, 28, 28)).shape == (2, 20)
        else:
            expect_error(lambda: mm.DigitSumNet(arch), "below 1 pixel")

def test_augment_identity_and_background():
    cfg = mm.ClassifyConfig(shift=0, rotate=0, zoom=0, elastic=0)
    x = torch.randn(4, 3, 28, 28)
    assert torch.allclose(mm.augment_digits(x, cfg, -0.5), x, atol=1e-5)  # no warp -> the same image
    elastic_only = mm.ClassifyConfig(shift=0, rotate=0, zoom=0, elastic=1.5)
    assert not torch.allclose(mm.augment_digits(x, elastic_only, -0.5), x, atol=1e-2)  # the field moves ink
    cfg = mm.ClassifyConfig(shift=3, rotate=20, zoom=0.2)
    blank = torch.full((4, 3, 28, 28), -0.4242)
    assert torch.allclose(mm.augment_digits(blank, cfg, -0.4242), blank, atol=1e-5)  # canvas stays blank
    torch.manual_seed(0)
    y = mm.augment_digits(x, cfg, -0.5)
    assert not torch.allclose(y[:, 0], y[:, 1] + (x[:, 0] - x[:, 1]), atol=1e-2)  # channels warp apart

def test_tta_views_shift_in_background_and_never_wrap():
    seen = []
    record = lambda v: seen.append(v.clone()) or torch.zeros(len(v), 20)  # a "model" that keeps its inputs
    x = torch.full((2, 3, 6, 6), -0.42)
    x[:, :, -1, :] = 2.8  # ink on the bottom row and the right column: torch.roll would wrap it round
    x[:, :, :, -1] = 2.8
    mm.evaluate(type("M", (), {"eval": lambda self: None, "__call__": lambda self, v: record(v)})(), x,
                torch.zeros(2, dtype=torch.long), tta=True)
    for (dy, dx), view in zip(mm.TTA_SHIFTS, seen):
        expected = torch.full_like(x, -0.42)
        expected[:, :, max(dy, 0):6 + min(dy, 0), max(dx, 0):6 + min(dx, 0)] = \
            x[:, :, max(-dy, 0):6 + min(-dy, 0), max(-dx, 0):6 + min(-dx, 0)]
        assert torch.equal(view, expected), (dy, dx)
    assert len(seen) == 5 and torch.equal(seen[0], x) and (seen[1][:, :, 0] == -0.42).all()  # (1, 0): top row empty

def test_augmentation_decays_linearly_to_nothing():
    seen, real = [], mm.augment_digits
    spy = lambda x, cfg, background, strength: seen.append(strength) or real(x, cfg, background, strength)
    with patched(mm, augment_digits=spy):
        quiet(mm.classify, tiny_cfg(write_addnist(tmpdir()), tmpdir(), steps=4))
    assert seen == [1.0, 0.75, 0.5, 0.25]  # 1 - step / steps: full strength first, a quarter last

def test_overfits_a_tiny_batch():
    root = write_addnist(tmpdir(), n=(16, 16, 16))
    cfg = tiny_cfg(root, tmpdir(), arch="16,M,32,M,64", batch_size=16, steps=120, lr=1e-2, warmup_steps=10,
                   shift=0, rotate=0, zoom=0, elastic=0, tta=False, ema_decay=0, weight_decay=0, label_smoothing=0,
                   eval_every=120, log_every=120)
    m, _ = quiet(mm.classify, cfg)
    assert m["train_acc_mean"] == 1.0 and m["train_loss_mean"] < 0.05, m["train_loss_mean"]
    assert m["test_acc_mean"] < 0.5  # random labels: nothing to generalise, so the test set stays near chance

def test_seeded_runs_repeat_and_seed_k_of_many_equals_seed_k_alone():
    # so seeds trained as separate processes (--seed 0 ... --seed 4) give exactly the figures of one --runs 5
    root = write_addnist(tmpdir())
    a, b = (quiet(mm.classify, tiny_cfg(root, tmpdir()))[0] for _ in range(2))
    assert a["per_run"][0]["curves"] == b["per_run"][0]["curves"] and a["train_loss_mean"] == b["train_loss_mean"]
    m, log = quiet(mm.classify, tiny_cfg(root, out := tmpdir(), runs=2))
    alone = quiet(mm.classify, tiny_cfg(root, tmpdir(), seed=1))[0]["per_run"][0]
    drop = lambda r: {k: v for k, v in r.items() if k != "seconds"}
    assert m["per_run"][1]["seed"] == alone["seed"] == 1
    assert drop(m["per_run"][1]) == drop(alone) != drop(a["per_run"][0])
    # The record and the figure: mean ± sample std over the runs, the accuracy plot and its numbers
    assert "> Number of parameters" in log and "mean ± std (n=2)" in log
    saved, accs = json.load(open(os.path.join(out, "metrics.json"))), [r["test_acc"] for r in m["per_run"]]
    assert saved["runs"] == 2 and all(k in saved for k in ("params", "steps", "train_loss_mean", "train_loss_std",
                                                           "train_acc_mean", "train_acc_std"))
    assert abs(saved["test_acc_mean"] - np.mean(accs)) + abs(saved["test_acc_std"] - np.std(accs, ddof=1)) < 1e-12
    assert saved["per_run"][0]["curves"]["step"] == [3, 6]
    from PIL import Image
    img = Image.open(os.path.join(out, "accuracy.png"))
    assert img.size == (975, 600) and len(img.getcolors(1 << 16)) > 3  # a 3.25-inch column at 300 dpi
    rows = open(os.path.join(out, "accuracy.csv")).read().splitlines()  # the numbers behind the figure
    assert rows[0] == "label,x,y,band_low,band_high" and len(rows) == 1 + 2 * 2 * 2  # 2 runs x train/test x 2 evals
    assert all(len(r) == 5 for r in csv.reader(rows)) and rows[1].startswith('"train, seed 0",3,')  # quoted

def test_train_only_runs_score_the_held_out_valid_split():
    root = write_addnist(tmpdir())
    m, log = quiet(mm.classify, tiny_cfg(root, out := tmpdir(), train_on="train"))
    assert "valid acc %" in log and "valid_acc_mean" in m and "valid_acc_mean" not in quiet(
        mm.classify, tiny_cfg(root, tmpdir()))[0]  # train + valid leaves no held-out split to score
    model = mm.DigitSumNet(tiny_cfg(root, out).arch).to(memory_format=torch.channels_last)  # as trained: same sums
    model.load_state_dict(torch.load(os.path.join(out, "run0", "ckpt.pt"), weights_only=True)["ema"])
    x, y = (torch.from_numpy(a) for a in data.load_split("addnist", "valid", root))
    assert (m["per_run"][0]["valid_loss"], m["per_run"][0]["valid_acc"]) == mm.evaluate(model, x, y, tta=True)

# ---------------------------------------------------------------------------------------------
# The generator

def test_edm_scalings_and_schedule_closed_forms():
    sd = 0.5
    c_skip, c_out, c_in, c_noise = mm.edm_scalings(torch.tensor([sd]), sd)
    assert torch.allclose(torch.cat([c_skip, c_out, c_in, c_noise]),
                          torch.tensor([0.5, sd / 2 ** 0.5, 1 / (sd * 2 ** 0.5), math.log(sd) / 4]))
    sigma = torch.logspace(-3, 2, 20)
    c_skip, c_out, c_in, _ = mm.edm_scalings(sigma, sd)
    weight = (sigma ** 2 + sd ** 2) / (sigma * sd) ** 2
    assert torch.allclose(weight * c_out ** 2, torch.ones(20))  # λ(σ) c_out² = 1: unit-weight targets (EDM)
    assert torch.allclose(c_in ** 2 * (sigma ** 2 + sd ** 2), torch.ones(20))  # unit-variance network input
    s = mm.edm_sigmas(18)
    assert len(s) == 19 and abs(s[0] - 80) < 1e-9 and abs(s[17] - 0.002) < 1e-12 and s[18] == 0
    assert bool((s[1:] < s[:-1]).all())

class RecordingNet:
    """Stands in for the U-Net: records the labels edm_loss embeds and what it feeds the net, denoises nothing."""
    n_classes = 100
    def class_embed(self, labels):
        self.labels = labels
        return torch.zeros(len(labels), 4)
    def __call__(self, x, sigma, emb):
        self.seen = (x.detach(), sigma.detach())
        return x

def test_power_ema_averages_the_run_with_width_sigma_rel():
    # EDM2 Sec. 3.1: the power EMA weighs past time tau of a run of length t as tau^gamma, so the mean of
    # w(tau) = tau is t (gamma+1)/(gamma+2), and the profile's std relative to t is sigma_rel.
    for sigma_rel in (0.04, 0.10):
        mean1, mean2, T = 0.0, 0.0, 20_000
        for step in range(T):  # scalar weights w = t and w = t^2, averaged as ema_update does
            beta = mm.power_ema_decay(sigma_rel, step)
            t = (step + 1) / T
            mean1, mean2 = beta * mean1 + (1 - beta) * t, beta * mean2 + (1 - beta) * t * t
        gamma = np.roots([1, 7, 16 - sigma_rel ** -2, 12 - sigma_rel ** -2]).real.max()
        assert abs(mean1 - (gamma + 1) / (gamma + 2)) < 1e-3, (sigma_rel, mean1)
        assert abs(math.sqrt(mean2 - mean1 ** 2) / sigma_rel - 1) < 0.02, (sigma_rel, mean2 - mean1 ** 2)
    assert mm.power_ema_decay(0.04, 0) == 0 and mm.power_ema_decay(0, 5000) == 0  # starts at the weights; 0 = off
    # The same fraction of any run: the decay at the end of 2,000 steps is that of 50,000 steps, rescaled.
    ends = [(1 - mm.power_ema_decay(0.04, steps - 1)) * steps for steps in (2000, 50_000)]  # both about gamma + 1
    assert abs(ends[0] / ends[1] - 1) < 0.01, ends

def test_forward_noising_and_label_dropout_match_their_distributions():
    torch.manual_seed(0)
    cfg, net, x = mm.GenerateConfig(), RecordingNet(), torch.rand(4096, 3, 4, 4) * 2 - 1
    mm.edm_loss(net, x, torch.zeros(4096, dtype=torch.long), cfg)
    noisy, sigma = net.seen  # each image noised twice: rows i and 4096 + i share the clean image
    assert cfg.noise_draws == 2 and len(sigma) == 2 * 4096
    n = (noisy - x.repeat(2, 1, 1, 1)) / sigma[:, None, None, None]  # x_σ = x + σ n  =>  n ~ N(0, I)
    assert abs(n.mean()) < 0.01 and abs(n.std() - 1) < 0.01
    ls = sigma.log()  # ln σ ~ N(P_mean, P_std²), drawn independently for the two copies
    assert abs(ls.mean() - cfg.p_mean) < 0.06 and abs(ls.std() - cfg.p_std) < 0.06
    assert abs(torch.corrcoef(ls.view(2, -1))[0, 1]) < 0.06 and abs(torch.corrcoef(n.view(2, -1))[0, 1]) < 0.01
    labels = torch.randint(0, 100, (20_000,), generator=torch.Generator().manual_seed(0))
    for rate in (0.0, 0.1, 0.5, 1.0):  # labels become the null class 100 at rate p_uncond
        mm.edm_loss(net, torch.zeros(len(labels), 3, 1, 1), labels, mm.GenerateConfig(p_uncond=rate, noise_draws=1))
        dropped = net.labels == 100
        assert abs(dropped.float().mean().item() - rate) < 0.015, (rate, dropped.float().mean())  # ~5 std
        assert torch.equal(net.labels[~dropped], labels[~dropped])  # the others keep their class

class GaussianDenoiser(torch.nn.Module):
    """The exact denoiser of data ~ N(0, s_d² I): D(x; σ) = x s_d² / (σ² + s_d²)."""
    n_classes = 100
    def __init__(self, sd=0.5):
        super().__init__()
        self.sd, self.class_embed, self.evals = sd, torch.nn.Embedding(101, 4), 0
    def forward(self, x, sigma, emb):
        self.evals += len(x)  # network evaluations, counted per image
        return x * self.sd ** 2 / (sigma[:, None, None, None] ** 2 + self.sd ** 2)

def test_heun_sampler_solves_the_ode():
    # Gaussian data: the probability-flow ODE's solution is x(σ) = x(σ0) sqrt(σ² + s_d²)/sqrt(σ0² + s_d²)
    net, sd = GaussianDenoiser(), 0.5
    z = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    emb = net.class_embed(torch.zeros(2, dtype=torch.long))
    exact = z * 80 * sd / math.sqrt(80 ** 2 + sd ** 2)
    err = {n: ((mm.edm_heun_sampler(net, z, emb, steps=n) - exact).abs().max() / exact.abs().max()).item()
           for n in (18, 100, 200)}
    assert err[200] < 1e-3 and err[18] < 0.1, err
    assert 3.0 < err[100] / err[200] < 5.0, err  # doubling the steps divides the error by ~4: second order (Heun)
    for w in (1.0, 2.0):  # the NFE metrics.json records is what the sampler spends (guided: both branches)
        net.evals = 0
        assert torch.allclose(mm.edm_heun_sampler(net, z, emb, 18, w), exact, rtol=0.1, atol=0.1 * exact.abs().max())
        assert net.evals == len(z) * mm.nfe(tiny_gen_cfg("", "", sampler_steps=18, guidance=w)), (w, net.evals)
    print(f"OK Heun sampler vs exact ODE solution (rel err {err[18]:.1e} at 18 steps, {err[200]:.1e} at 200, "
          f"order {math.log2(err[100] / err[200]):.2f})")

def test_generate_writes_every_output_and_its_record():
    root, out = run_copy("generate")
    m = json.load(open(os.path.join(out, "metrics.json")))
    assert m["fid"] is None and "Inception weights" in m["fid_unavailable"]  # offline: null with the reason
    for key in ("params", "fid_samples", "sampler", "guidance", "wall_seconds", "train_seconds", "sample_seconds"):
        assert key in m, key
    assert m["nfe"] == mm.nfe(tiny_gen_cfg("", "")) and m["loss_curve"]["step"] == [3, 6] and m["steps"] == 6
    npz = np.load(os.path.join(out, "samples.npz"))
    assert npz["images"].shape == (64, 3, 32, 32) and npz["images"].dtype == np.uint8  # never fewer than the grid
    assert npz["labels"].tolist() == list(range(64))  # classes cycled
    from PIL import Image
    # tiles of 32x2 px, 2 px apart, under the title bar; neighbours: the query column set apart by 8 px
    for name, cols, rows, gap in (("samples", 8, 8, 0), ("interpolations", 10, 8, 0), ("neighbours", 4, 16, 8)):
        img = np.asarray(Image.open(os.path.join(out, name + ".png")).convert("L"))
        assert img.shape == (rows * 66 + 2 + mm.GRID_TITLE, cols * 66 + 2 + gap)
        ink = np.nonzero((img[:mm.GRID_TITLE] < 128).any(0))[0]
        assert 0 < ink.max() < img.shape[1] - 2, name  # the title ends inside its bar, not cut at the edge
    assert len(m["neighbours"]["pixel_l2"]) == 16 and len(m["neighbours"]["pixel_l2"][0]) == 3
    with tiny_cifar(root=root):
        x_train = data.load_split("cifar100", "train", root)[0].astype(np.float64)
        # --sample-only: the sampler is deterministic, so the same checkpoint gives the same images
        quiet(mm.generate, tiny_gen_cfg(root, again := tmpdir(), sample_only=True, ckpt=os.path.join(out, "ckpt.pt")))
        expect_error(lambda: quiet(mm.generate, tiny_gen_cfg(root, tmpdir(), sample_only=True)), "no checkpoint")
        expect_error(lambda: quiet(mm.generate, tiny_gen_cfg(root, out)), "--resume")
    assert np.array_equal(np.load(os.path.join(again, "samples.npz"))["images"], npz["images"])
    x_train = np.concatenate([x_train, x_train[..., ::-1]])  # the training images and their mirror images
    images = npz["images"].astype(np.float64)
    to_train = np.sqrt(((images[:, None] - x_train[None]) ** 2).sum((2, 3, 4))).min(1)  # (64,) by brute force
    nearest = np.array(m["neighbours"]["pixel_l2"])[:, 0]
    assert m["neighbours"]["sample_index"][:8] == list(range(8))
    assert np.allclose(nearest[8:], np.sort(to_train)[:8], rtol=1e-5)  # then the 8 closest to a training image
    assert 0 <= m["pixel_copy_rate"] <= 1 and m["pixel_copy"]["median_ratio"] > 0

def test_a_failure_while_scoring_keeps_the_samples_and_their_record():
    def broken(*args, **kw):  # as if the Inception step died with a bug after a whole training run
        raise RuntimeError("simulated failure inside scoring")
    with tiny_cifar() as root, patched(fid, load_inception=broken):
        out = tmpdir()
        try:
            quiet(mm.generate, tiny_gen_cfg(root, out))
            raise AssertionError("the simulated failure did not propagate")
        except RuntimeError as e:
            assert "simulated" in str(e)  # a bug stays visible as a traceback...
    saved = json.load(open(os.path.join(out, "metrics.json")))  # ...but what was made is on disk
    assert saved["steps"] == 6 and saved["fid_samples"] == 64 and "fid" not in saved
    assert np.load(os.path.join(out, "samples.npz"))["images"].shape == (64, 3, 32, 32)

def test_interpolation_end_frames_are_the_samples():
    torch.manual_seed(0)
    cfg = tiny_gen_cfg("", "")
    net = mm.make_unet(cfg).eval()
    for p in net.parameters():  # a non-trivial network (zero-initialised outputs would make every frame equal)
        torch.nn.init.normal_(p, std=0.05)
    frames, (la, lb) = mm.interpolations(net, cfg, HW, seed=3, pairs=2, frames=5)
    g = torch.Generator().manual_seed(4)  # the same draws as interpolations(seed=3)
    za, zb = torch.randn(2, 3, 32, 32, generator=g), torch.randn(2, 3, 32, 32, generator=g)
    sample = lambda z, label: mm.to_uint8(mm.edm_heun_sampler(net, z, net.class_embed(label), cfg.sampler_steps,
                                                              cfg.guidance))
    for p in range(2):
        a, b = sample(za[p:p + 1], la[p:p + 1]), sample(zb[p:p + 1], lb[p:p + 1])
        assert (frames[5 * p].int() - a[0].int()).abs().max() <= 1  # <= 1 level: batch-size rounding only
        assert (frames[5 * p + 4].int() - b[0].int()).abs().max() <= 1
        assert not torch.equal(frames[5 * p + 2], a[0])  # the midpoint is an image of its own
    mid = mm.slerp(za[0], zb[0], 0.5)
    assert abs(mid.norm() / za[0].norm() - 1) < 0.05  # slerp keeps a Gaussian sample's norm (lerp would shrink it)

def test_generator_loss_falls_on_a_tiny_dataset():
    with tiny_cifar(n_train=16, smooth=True) as root:
        m, _ = quiet(mm.generate, tiny_gen_cfg(root, tmpdir(), steps=150, lr=3e-3, warmup_fraction=0.07, log_every=25,
                                               fid_samples=2, sample_batch=2, dropout=0.0))
    losses = m["loss_curve"]["loss"]
    assert losses[-1] < 0.85 * losses[0] and losses[-1] < min(losses[:3]), losses

def test_generator_flips_only_when_asked():
    x = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8)  # random images: no two are mirror images
    y = torch.arange(32) % 100
    for flip in (True, False):
        cfg = tiny_gen_cfg("", tmpdir(), steps=2, batch_size=32, flip=flip, log_every=1)
        seen = []
        net = mm.make_unet(cfg)
        opt = torch.optim.Adam(net.parameters())
        with patched(mm, edm_loss=lambda net, xb, labels, cfg: seen.append((xb, labels))
                     or sum(p.sum() * 0 for p in net.parameters())):  # records the batch; zero loss
            quiet(mm.train_generator, cfg, dict(model=net, ema=copy.deepcopy(net), opt=opt, scaler=mm.grad_scaler(HW)),
                  x, y, HW, os.path.join(cfg.out, "ckpt.pt"), dict(step=0, curve={"step": [], "loss": []}, seconds=0.0,
                                                                    data_id="-"))
        for xb, labels in seen:
            original = x[labels].float() / 127.5 - 1  # each row's source image (labels are unique here)
            mirrored = (xb == original.flip(3)).flatten(1).all(1)
            assert ((xb == original).flatten(1).all(1) | mirrored).all()  # every image is its source, or mirrored
            assert mirrored.any() if flip else not mirrored.any()

# ---------------------------------------------------------------------------------------------
# The depth study

def test_vgg_layers_counts_and_residual_wiring():
    for depth, convs, params in ((8, 7, 59_716), (38, 37, 336_196)):  # the coursework's ≈59.7k and ≈336.2k
        net = mm.VGG(depth)
        assert sum(isinstance(m, torch.nn.Conv2d) for m in net.modules()) == convs
        assert sum(isinstance(m, torch.nn.Linear) for m in net.modules()) == 1
        assert mm.count_params(net) == params, mm.count_params(net)
    bn = mm.VGG(38, bn=True)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in bn.modules()) == 37  # entry + one per conv
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in mm.VGG(38).modules()) == 1  # the entry block's only
    assert mm.VGG(8)(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    names = [mm.layer_name(k) for k in mm.VGG(38).state_dict() if k.endswith("weight") and "conv" in k]
    assert names[:3] == ["s1.b1.c1", "s1.b1.c2", "s1.b2.c1"] and names[10:12] == ["s1.red.c1", "s1.red.c2"]
    expect_error(lambda: mm.VGG(9), "--depth")
    x = torch.rand(2, 8, 6, 6)  # non-negative, like the output of a previous leaky ReLU
    for bn in (False, True):
        block, plain = mm.Block(8, bn=bn, residual=True), mm.Block(8, bn=bn)
        for b in (block, plain):
            torch.nn.init.zeros_(b.conv1.weight), torch.nn.init.zeros_(b.conv2.weight)
        assert torch.allclose(block(x), x, atol=1e-6)  # zeroed convs: the residual block is the identity
        assert torch.allclose(plain(x), torch.zeros_like(x), atol=1e-6)  # and the plain block outputs nothing
    assert isinstance(mm.Block(8, True).bn2, torch.nn.BatchNorm2d) and mm.Block(8, True).conv1.bias is None
    reduction = mm.Block(8, False, reduce=True)
    assert isinstance(reduction.bn1, torch.nn.Identity) and reduction.conv1.bias is not None  # the framework's
    assert reduction(x).shape == (2, 8, 3, 3)

def test_gradient_flow_matches_hand_computation():
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    w1, b1, w2 = np.array([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]]), np.array([0.1, -0.2]), np.array([[2.0, -4.0]])
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor(w1))
        net[0].bias.copy_(torch.tensor(b1))
        net[1].weight.copy_(torch.tensor(w2))
    x = np.array([0.5, -1.0, 2.0])
    net(torch.tensor(x, dtype=torch.float32)[None]).sum().backward()
    # L = w2 (W1 x + b1) + b2:  dL/dW2 = (W1 x + b1)^T,  dL/dW1 = w2^T x^T (an outer product)
    ref = {"0.weight": np.abs(np.outer(w2[0], x)).mean(), "1.weight": np.abs(w1 @ x + b1).mean()}
    flow = mm.gradient_flow(net)
    assert set(flow) == set(ref)  # biases are left out
    for k in ref:
        assert abs(flow[k] - ref[k]) < 1e-6, (k, flow[k], ref[k])

def test_crop_flip_moves_pixels_only():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    torch.manual_seed(0)
    y = mm.crop_flip(x, pad=0)  # no padding: each image is either itself or its mirror
    for i in range(2):
        assert torch.equal(y[i], x[i]) or torch.equal(y[i], x[i].flip(2))
    y = mm.crop_flip(x, pad=2)
    assert y.shape == x.shape and set(y.unique().tolist()) <= set(x.unique().tolist()) | {0.0}

def test_gradflow_runs_on_tiny_cifar_and_resumes():
    root, out = run_copy("gradflow")
    with tiny_cifar(root=root):
        cfg = tiny_gradflow_cfg(root, out)
        expect_error(lambda: quiet(mm.gradflow, cfg), "--resume")
        rows, log = quiet(mm.gradflow, replace(cfg, resume=True))
    assert "already finished" in log and rows[0]["params"] == 59_716 and rows[0]["name"] == "VGG_08"
    m = json.load(open(os.path.join(run := os.path.join(out, "VGG_08", "seed0"), "metrics.json")))
    assert len(m["grad_flow"]) == 2 and len(m["grad_flow"][0]) == 8  # 7 convs + fc, per epoch
    assert all(v > 0 for v in m["grad_flow"][-1].values())
    assert m["curves"]["epoch"] == [1, 2] and m["curves"]["lr"][0] == cfg.lr  # cosine starts at lr
    assert all(os.path.getsize(os.path.join(run, png)) > 1000 for png in ("gradflow.png", "curves.png"))

# ---------------------------------------------------------------------------------------------
# The run skeleton: a resumed run follows the schedule it started with, and every record tells the truth

def test_budgets_refused_unless_penalty_accepted():
    p = mm.budget_penalty
    assert p(99_999, 100_000, False) == 0 and p(100_000, 100_000, False) == 5  # "< 100,000"
    assert p(110_000, 100_000, False) == 5 and p(150_000, 100_000, False) == 25  # the coursework's examples
    assert p(110_001, 100_000, False) == 10  # part of a further 10 % costs 5 more
    assert p(10_000, 10_000, True) == 0 and p(10_001, 10_000, True) == 5 and p(20_000, 10_000, True) == 50
    assert mm.count_params(mm.DigitSumNet(mm.ClassifyConfig().arch)) < mm.CLASSIFY_PARAM_LIMIT  # the default fits
    root = write_addnist(tmpdir())
    big = tiny_cfg(root, tmpdir(), arch="64,M,128,M,128")
    expect_error(lambda: quiet(mm.classify, big), "parameters", "--allow-penalty", "-")
    expect_error(lambda: quiet(mm.classify, tiny_cfg(root, tmpdir(), steps=10_001)), "10,001", "-5 marks")
    # With the penalty accepted the run goes ahead and says what it costs. (Limit shrunk to keep it fast.)
    with patched(mm, CLASSIFY_STEP_LIMIT=4):
        m, out = quiet(mm.classify, tiny_cfg(root, tmpdir(), steps=6, allow_penalty=True))
    assert "-25 marks" in out and m["steps"] == 6, out  # 6 steps is 50 % over 4: 5 x 5
    croot, part = run_copy("generate", paused=True)
    with tiny_cifar(root=croot):  # the generator's budgets, for a new run and a resumed one
        expect_error(lambda: quiet(mm.generate, tiny_gen_cfg(croot, part, resume=True, steps=50_001)), "budget")
        expect_error(lambda: quiet(mm.generate, tiny_gen_cfg(croot, tmpdir(), widths="64,128,256")), "1,000,000")
        expect_error(lambda: quiet(mm.generate, tiny_gen_cfg(croot, tmpdir(), steps=50_001)), "50,001", "-5 marks")

def test_paused_and_resumed_runs_equal_unbroken_ones():
    # Paused after 3 steps (gradflow: within its first epoch of 5), then resumed: the same batches, noise and
    # weights as straight through, and the same records.
    for command, weights, record in (("gradflow", "model", "metrics.json"), ("generate", "ema", "samples.npz"),
                                     ("classify", "model", "metrics.json")):
        fn, make_cfg, _ = TINY[command]
        (root, straight), (_, part) = run_copy(command), run_copy(command, paused=True)
        with tiny_cifar(root=shared_data()[1]):
            resumed, log = quiet(fn, make_cfg(root, part, resume=True))
        a, b = (torch.load(glob.glob(os.path.join(d, "**", "ckpt.pt"), recursive=True)[0], weights_only=True)
                for d in (straight, part))
        assert "from step 3" in log and b["step"] == a["step"]  # 3 + the rest, not 3 + all
        assert all(torch.equal(a[weights][k], b[weights][k]) for k in a[weights])
        files = [os.path.join(d, record) for d in (straight, part)]
        if command == "generate":
            assert np.array_equal(*(np.load(f)["images"] for f in files))  # the same samples
        if command == "gradflow":
            assert json.load(open(files[0]))["table"] == json.load(open(files[1]))["table"]
    straight = json.load(open(files[0]))
    assert resumed["per_run"][0]["curves"] == straight["per_run"][0]["curves"]
    again, log = quiet(mm.classify, tiny_cfg(root, part, resume=True))  # finished: nothing is retrained
    assert "already finished" in log and again["test_acc_mean"] == straight["test_acc_mean"]
    expect_error(lambda: quiet(mm.classify, tiny_cfg(root, part)), "--resume")  # never overwrites silently
    expect_error(lambda: quiet(mm.classify, tiny_cfg(root, part, resume=True, steps=10_001)), "budget")
    first, log = quiet(mm.classify, tiny_cfg(root, fresh := tmpdir(), resume=True))  # one command: first run too
    assert "holds no checkpoint yet; starting the run" in log and first["per_run"][0]["curves"] == \
        straight["per_run"][0]["curves"] and json.load(open(os.path.join(fresh, "config.json")))["resume"]

def test_interrupt_stops_at_the_next_step():
    root, out = write_addnist(tmpdir()), tmpdir()
    with patched(mm, STOP=[2]):  # as if Ctrl-C came during the first step
        expect_error(lambda: quiet(mm.classify, tiny_cfg(root, out)), "interrupted after step 1", "--resume")
    assert torch.load(os.path.join(out, "run0", "ckpt.pt"), weights_only=False)["step"] == 1
    with tiny_cifar() as croot, patched(mm, STOP=[2]):
        cfg = tiny_gradflow_cfg(croot, tmpdir())
        expect_error(lambda: quiet(mm.gradflow, cfg), "interrupted after step 1", "--resume")
        assert torch.load(glob.glob(os.path.join(cfg.out, "*", "*", "ckpt.pt"))[0], weights_only=True)["step"] == 1
        # with a progress grid every tenth of the run (here every step), a Ctrl-C while a grid is drawn keeps
        # the checkpoint of the steps already taken, written before the grid
        with patched(mm, GRID_MIN_STEPS=1):
            cfg = tiny_gen_cfg(croot, out := tmpdir())
            expect_error(lambda: quiet(mm.generate, cfg), "interrupted while sampling", "--resume")
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)["step"] == 1

def test_foreach_ema_equals_the_per_tensor_update():
    torch.manual_seed(0)
    model, ema = mm.VGG(8, bn=True), mm.VGG(8, bn=True)
    model(torch.randn(4, 3, 32, 32))  # moves BN statistics and its integer counter
    reference = {k: v.clone() for k, v in ema.state_dict().items()}
    for k, m in model.state_dict().items():
        reference[k] = reference[k].lerp(m, 1 - 0.9) if m.dtype.is_floating_point else m.clone()
    mm.ema_update(ema, model, 0.9)
    for k, v in ema.state_dict().items():
        assert torch.equal(v, reference[k]), k

def test_ema_warm_up_reaches_its_decay():
    # The warm-up (1+t)/(10+t) first reaches d at t = (10d - 1)/(1 - d): 8,990 for 0.999, 80 for 0.9.
    for limit, first in ((0.999, 8990), (0.9, 80)):
        assert mm.ema_decay(limit, first) == limit > mm.ema_decay(limit, first - 1)
    assert mm.ema_decay(0.999, 0) == 0.1  # step 0 keeps 10 % of the random initial weights

def counting_steps(optimizer_class):  # counts calls of optimizer_class.step: the steps a run really takes
    return mock.patch.object(optimizer_class, "step", autospec=True, side_effect=optimizer_class.step)

REFUSED = [  # (command, field, value): a resume with another value would follow another schedule
    ("classify", "steps", 8), ("classify", "warmup_steps", 3), ("classify", "lr", 0.5), ("classify", "batch_size", 16),
    ("classify", "arch", "8,M,8"), ("classify", "seed", 5), ("classify", "elastic", 0.0),
    ("classify", "train_on", "train"), ("generate", "lr", 0.5), ("generate", "warmup_fraction", 0.5),
    ("generate", "ema_length", 0.1),
    ("generate", "batch_size", 4), ("generate", "p_uncond", 0.5), ("generate", "flip", False),
    ("gradflow", "epochs", 1), ("gradflow", "lr", 0.5)]

def test_one_resume_rule_for_every_command():
    for command, (fn, make_cfg, _) in TINY.items():  # each command's paused run
        root, out = run_copy(command, paused=True)
        path = glob.glob(os.path.join(out, "**", "ckpt.pt"), recursive=True)[0]
        before = open(path, "rb").read()
        resume = lambda **kw: quiet(fn, make_cfg(root, out, resume=True, **kw))
        with tiny_cifar(root=shared_data()[1]):
            for field, value in ((f, v) for c, f, v in REFUSED if c == command):  # both values named
                msg = expect_error(lambda: resume(**{field: value}), "resume with the values it was trained with")
                flag = "--" + field.replace("_", "-")
                assert f"{flag} {getattr(make_cfg(root, out), field)}" in msg and f"{flag} {value}" in msg, msg
            # A checkpoint with a field this mm.py lacks (a flag that has left), or without one it has, means
            # something else: refused, naming the field, for a resume and for --sample-only alike.
            ck = torch.load(path, weights_only=True)
            for change, needle in (({"aug_floor": 0.5}, "--aug-floor 0.5 is no flag"), ({"lr": None}, "no --lr")):
                ck["config"] = {k: v for k, v in {**ck["config"], **change}.items() if v is not None}
                torch.save(ck, path)
                expect_error(resume, needle, "new --out")
                if command == "generate":
                    expect_error(lambda: quiet(fn, make_cfg(root, tmpdir(), sample_only=True, ckpt=path)), needle)
                open(path, "wb").write(before)
            assert open(path, "rb").read() == before  # refusals leave it untouched
            assert "from " in resume(log_every=1)[1]  # where files go and how often to print may change

def test_recorded_means_cover_exactly_their_steps():
    # A loss of 1 at every step: each mean printed or recorded reads 1, whatever the intervals (log lines
    # every 4 steps, evaluations every 5, generate's checkpoints every step).
    one = lambda out, *args, **kw: out.float().sum() * 0 + 1
    one_gen = lambda net, *args: sum(p.sum() for p in net.parameters()) * 0 + 1
    root, cifar = shared_data()
    with patched(F, cross_entropy=one), patched(mm, edm_loss=one_gen), tiny_cifar(root=cifar):
        logs = [quiet(mm.classify, tiny_cfg(root, tmpdir(), steps=12, eval_every=5, log_every=4))[1],
                quiet(mm.gradflow, tiny_gradflow_cfg(cifar, tmpdir(), log_every=3))[1]]
        m, log = quiet(mm.generate, tiny_gen_cfg(cifar, tmpdir(), steps=15, log_every=4))
    losses = [float(line.split("| loss ")[1].split()[0]) for line in "".join(logs + [log]).splitlines()
              if line.startswith("step")]
    assert len(losses) == 3 + 3 + 4 and set(losses) == {1.0}, losses
    assert m["loss_curve"] == {"step": [4, 8, 12, 15], "loss": [1.0] * 4}

def test_progress_grids_are_few_and_only_in_long_runs():
    drawn, real = [], mm.sample_images
    spy = lambda net, labels, *args: drawn.append(len(labels)) or real(net, labels, *args)
    with tiny_cifar(root=shared_data()[1]) as cifar, patched(mm, sample_images=spy):
        quiet(mm.generate, cfg := tiny_gen_cfg(cifar, tmpdir(), steps=20))
        assert drawn == [64] and not glob.glob(os.path.join(cfg.out, "progress*"))  # the samples only
        with patched(mm, GRID_MIN_STEPS=20):  # a tenth of 20 steps: a grid at steps 2, 4, ..., 18, each kept
            quiet(mm.generate, cfg := tiny_gen_cfg(cifar, tmpdir(), steps=20))
    assert drawn == [64] + [64] * 9 + [64]
    assert sorted(os.listdir(cfg.out)) == sorted([f"progress_{s:05d}.png" for s in range(2, 20, 2)] + [
        "ckpt.pt", "config.json", "interpolations.png", "loss.csv", "loss.png", "metrics.json", "neighbours.png",
        "samples.npz", "samples.png"])

def test_another_commands_folder_is_refused_and_left_as_it_was():
    root, cifar = shared_data()
    runs = {command: run_copy(command)[1] for command in TINY}
    before = snapshot(*runs.values())
    with tiny_cifar(root=cifar):
        for command, (fn, make_cfg, _) in TINY.items():
            for other, folder in runs.items():
                if other != command:
                    expect_error(lambda: quiet(fn, make_cfg(root if command == "classify" else cifar, folder)),
                                 f"holds a run of `mm.py {other}`")
        expect_error(lambda: quiet(mm.report, mm.ReportConfig(classify=runs["generate"], out=tmpdir())),
                     "`mm.py generate`, not of classify")
        expect_error(lambda: quiet(mm.report, mm.ReportConfig(classify=runs["classify"], out=runs["gradflow"])),
                     "`mm.py gradflow`, not of report")
        expect_error(lambda: quiet(mm.bench, mm.BenchConfig(out=runs["classify"])), "`mm.py classify`")
    assert snapshot(*runs.values()) == before
    for command, folder in runs.items():  # each record names its command
        assert json.load(open(os.path.join(folder, "config.json")))["command"] == command
        assert json.load(open(os.path.join(folder, "metrics.json")))["command"] == command
    # A folder an older mm.py wrote (its record names no command, as bench.json did) is refused by every
    # command, saying so and what to do, and left as it was
    old = tmpdir()
    json.dump({"device": "cpu", "rows": []}, open(os.path.join(old, "bench.json"), "w"))
    before = snapshot(old)
    with tiny_cifar(root=cifar):
        for fn, cfg in [(fn, make_cfg(root if c == "classify" else cifar, old)) for c, (fn, make_cfg, _) in
                        TINY.items()] + [(mm.bench, mm.BenchConfig(out=old)), (mm.report, mm.ReportConfig(
                            classify=runs["classify"], out=old)), (mm.report, mm.ReportConfig(generate=old))]:
            expect_error(lambda: quiet(fn, cfg), "bench.json was not written by this mm.py", "an older one",
                         "the mm.py that wrote it")
    assert snapshot(old) == before

def test_fp16_resume_and_sample_only_of_a_run_trained_without_fp16():
    # A T4 continues a run begun on a CPU or an A100: its checkpoint holds an empty GradScaler state,
    # which must not be loaded into the enabled fp16 scaler (that raised a traceback).
    root, out = run_copy("classify", paused=True)
    m, log = quiet(mm.classify, tiny_cfg(root, out, resume=True, precision="fp16"))
    assert "from step 3" in log and m["steps"] == 6 and m["mixed_precision"] == "fp16"
    croot, gen = run_copy("generate")
    with tiny_cifar(root=croot):
        g, _ = quiet(mm.generate, tiny_gen_cfg(croot, gen, sample_only=True, precision="fp16"))
    assert g["mixed_precision"] == "fp16" and g["steps"] == 6

def test_pause_at_or_before_the_checkpoint_is_refused_and_steps_are_counted():
    root, out = run_copy("classify", paused=True)  # 3 of 6 steps taken
    with counting_steps(torch.optim.AdamW) as taken:
        for pause in (3, 2):  # at or below the checkpoint's step 3: refused (it would rewrite the counter)
            expect_error(lambda: quiet(mm.classify, tiny_cfg(root, out, pause_at=pause, resume=True)),
                         f"--pause-at {pause}", "step 3")
        m, _ = quiet(mm.classify, tiny_cfg(root, out, resume=True))
    assert taken.call_count == 3 and m["steps"] == 6 and m["per_run"][0]["steps"] == 6  # what was trained
    assert m["per_run"][0]["curves"]["step"] == [3, 6]
    croot, out = run_copy("generate", paused=True)
    with tiny_cifar(root=croot), counting_steps(torch.optim.Adam) as taken:
        expect_error(lambda: quiet(mm.generate, tiny_gen_cfg(croot, out, pause_at=2, resume=True)), "--pause-at 2")
        g, _ = quiet(mm.generate, tiny_gen_cfg(croot, out, resume=True))
    assert taken.call_count == 3 and g["steps"] == 6 and g["loss_curve"]["step"] == [3, 6]

def test_sample_only_reports_the_checkpoint_it_sampled():
    root, out = run_copy("generate", paused=True)
    n_params = mm.count_params(mm.make_unet(tiny_gen_cfg(root, out)))
    with tiny_cifar(root=root):  # the flags' defaults (50,000 steps, the full-size widths) are not the checkpoint's
        m, log = quiet(mm.generate, tiny_gen_cfg(root, tmpdir(), sample_only=True, steps=50_000, widths="32,64,80",
                                                 ckpt=os.path.join(out, "ckpt.pt")))
    assert m["steps"] == 3 and m["params"] == n_params and "steps 50,000" not in log, log
    assert m["config"]["widths"] == "8,16,16" and m["config"]["steps"] == 6
    # --seed draws another sample set from the same network (seed 0 again: the same set)
    ckpt, images = os.path.join(out, "ckpt.pt"), lambda m: np.load(os.path.join(m["config"]["out"], "samples.npz"))
    with tiny_cifar(root=root):
        again, other = (quiet(mm.generate, tiny_gen_cfg(root, tmpdir(), sample_only=True, seed=s, ckpt=ckpt))[0]
                        for s in (0, 7))
    assert other["sample_seed"] == 7 and other["config"]["seed"] == 0 and again["sample_seed"] == 0
    assert np.array_equal(images(m)["images"], images(again)["images"])
    assert not np.array_equal(images(m)["images"], images(other)["images"])
    # Another training set in --data-dir (the same shape, other images) is refused for a resume and a
    # --sample-only alike, before anything is written
    with tiny_cifar(smooth=True) as other_root:
        for kw in (dict(sample_only=True, ckpt=ckpt), dict(resume=True)):
            target = tmpdir() if "ckpt" in kw else out
            before = snapshot(target)
            expect_error(lambda: quiet(mm.generate, tiny_gen_cfg(other_root, target, **kw)), "another training set",
                         "--data-dir")
            assert snapshot(target) == before

# ---------------------------------------------------------------------------------------------
# GPU readiness, proven on the CPU: device mix-ups (meta device), mixed precision (CPU bf16), a static scan

def one_step_of_each(hw):
    """One training step of each command, a guided sampler step and a TTA evaluation on hw -> {name: output}."""
    dev, out = hw.device, {}
    torch.manual_seed(0)
    c = tiny_cfg("", "")
    model = mm.DigitSumNet(c.arch).to(dev, memory_format=torch.channels_last)
    ema = copy.deepcopy(model)
    opt, scaler = torch.optim.AdamW(model.parameters()), mm.grad_scaler(hw)
    x, y = torch.randn(8, 3, 28, 28, device=dev), torch.randint(0, 20, (8,), device=dev)
    idx = mm.batch_indices(0, 8, 4, 0, dev)
    with mm.autocast(hw):
        logits = model(mm.augment_digits(x[idx], c, -0.42, 0.5))
    out["classify"] = F.cross_entropy(logits.float(), y[idx])
    scaler.scale(out["classify"]).backward()
    scaler.step(opt)
    scaler.update()
    mm.ema_update(ema, model, mm.ema_decay(c.ema_decay, 0))
    if dev.type != "meta":  # evaluate() returns Python numbers: a meta tensor has none to give
        out["classify_tta"] = torch.tensor(mm.evaluate(ema, x, y, tta=True))
    g = tiny_gen_cfg("", "")
    net = mm.make_unet(g).to(dev, memory_format=torch.channels_last)
    opt = torch.optim.Adam(net.parameters())
    xg, yg = torch.randn(4, 3, 32, 32, device=dev), torch.randint(0, 100, (4,), device=dev)
    with mm.autocast(hw):
        out["generate"] = mm.edm_loss(net, xg, yg, g)
    scaler.scale(out["generate"]).backward()
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    scaler.step(opt)
    emb = net.class_embed(yg[:2])
    out["sampler"] = mm.edm_heun_sampler(net.eval(), torch.randn(2, 3, 32, 32, device=dev), emb, 2, 2.0, hw)
    vgg = mm.VGG(8, bn=True, residual=True).to(dev, memory_format=torch.channels_last)
    opt = torch.optim.Adam(vgg.parameters())
    with mm.autocast(hw):
        scores = vgg(mm.crop_flip(torch.randn(4, 3, 32, 32, device=dev)))
    out["gradflow"] = F.cross_entropy(scores.float(), yg)
    scaler.scale(out["gradflow"]).backward()
    scaler.step(opt)
    return out

def test_steps_stay_on_the_device_and_keep_float32_losses_under_bf16():
    # Every tensor lives on the meta device: one made on the CPU by mistake meets it and raises.
    out = one_step_of_each(mm.Hardware(torch.device("meta"), "fp32"))
    assert all(v.device.type == "meta" for v in out.values()), {k: v.device for k, v in out.items()}
    out = one_step_of_each(mm.Hardware(torch.device("cpu"), "bf16"))  # the mixed-precision path, on the CPU
    for name in ("classify", "generate", "gradflow"):
        assert out[name].dtype == torch.float32 and torch.isfinite(out[name]), (name, out[name])
    assert torch.isfinite(out["classify_tta"]).all() and out["sampler"].dtype == torch.float32
    assert torch.isfinite(out["sampler"]).all()

# What PyTorch 2.13 lists as having no deterministic CUDA kernel (torch.use_deterministic_algorithms): the
# modules, and the aten ops they and the functional calls run (a backward op where only the backward is listed)
NONDETERMINISTIC_MODULES = tuple(getattr(torch.nn, name) for name in (
    "AvgPool3d AdaptiveAvgPool2d AdaptiveAvgPool3d AdaptiveMaxPool2d FractionalMaxPool2d FractionalMaxPool3d "
    "MaxUnpool1d MaxUnpool2d MaxUnpool3d ReflectionPad1d ReflectionPad2d ReflectionPad3d NLLLoss CTCLoss").split())
NONDETERMINISTIC_OPS = set(
    "avg_pool3d_backward _adaptive_avg_pool2d_backward _adaptive_avg_pool3d_backward adaptive_max_pool2d_backward "
    "fractional_max_pool2d_backward fractional_max_pool3d_backward max_unpool2d max_unpool3d "
    "upsample_linear1d_backward upsample_bilinear2d_backward upsample_bicubic2d_backward upsample_trilinear3d_backward reflection_pad1d_backward "
    "reflection_pad2d_backward reflection_pad3d_backward nll_loss2d_forward _ctc_loss_backward "
    "_embedding_bag_backward put_ histc bincount median cumsum scatter_reduce grid_sampler_2d_backward".split())

def test_every_op_of_the_loops_has_a_deterministic_cuda_kernel():
    from torch.utils._python_dispatch import TorchDispatchMode
    class Ops(TorchDispatchMode):  # records every aten op run inside it, the backward passes' included
        seen = set()
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.add(func._schema.name.split("::")[1])
            return func(*args, **(kwargs or {}))
    with Ops():
        one_step_of_each(HW)
    assert "convolution_backward" in Ops.seen and not Ops.seen & NONDETERMINISTIC_OPS, Ops.seen & NONDETERMINISTIC_OPS
    nets = [mm.DigitSumNet("8,M,16"), mm.make_unet(tiny_gen_cfg("", "")), mm.VGG(8, True, True), mm.VGG(38)]
    assert not [m for net in nets for m in net.modules() if isinstance(m, NONDETERMINISTIC_MODULES)]
    # On a GPU the mode is strict: an op without a deterministic kernel would raise, not warn and differ.
    with patched(torch.cuda, is_available=lambda: True, is_bf16_supported=lambda **kw: True), \
            patched(torch, use_deterministic_algorithms=mock.DEFAULT) as strict, \
            torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled), mock.patch.dict(os.environ):
        assert quiet(mm.pick_hardware, mm.ClassifyConfig())[0].device.type == "cuda"
    strict["use_deterministic_algorithms"].assert_called_once_with(True)

def test_loops_have_no_per_step_sync_and_loads_stay_on_cpu():
    """A static rule, kept because no CPU test can see the GPU hazards it guards: a host sync in every
    step (.item(), .cpu()) stalls a GPU's queue, and torch.load without map_location='cpu' puts a CUDA
    checkpoint straight onto a GPU (or fails on a machine without one)."""
    import ast
    for path in ("mm.py", "fid.py"):
        for node in ast.walk(ast.parse(open(os.path.join(HERE, path)).read())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
                assert kw.get("map_location") == "'cpu'", f"{path}:{node.lineno} torch.load without map_location='cpu'"
    tree = ast.parse(open(os.path.join(HERE, "mm.py")).read())
    step_loops = [n for n in ast.walk(tree) if isinstance(n, ast.For)
                  and any("seed_step(" in ast.unparse(s) for s in n.body[:2])]  # loops that seed each step
    assert step_loops, "no loop seeds its steps"
    def check(node, guarded):  # a sync or a tensor from Python data is allowed only under an `if` (log/eval steps)
        for child in ast.iter_child_nodes(node):
            text = ast.unparse(child) if isinstance(child, ast.Call) else ""
            if text.startswith(("torch.tensor(", "torch.as_tensor(", "torch.from_numpy(")):
                raise AssertionError(f"mm.py:{child.lineno} makes a tensor from Python data inside a step loop")
            if isinstance(child, ast.Call) and isinstance(child.func, ast.Attribute) and not guarded:
                syncs = ("item", "tolist", "cpu", "numpy")
                assert child.func.attr not in syncs, f"mm.py:{child.lineno} syncs every step"
            check(child, guarded or isinstance(child, ast.If))
    for loop in step_loops:
        check(loop, False)

def test_precision_is_picked_per_device():
    out = lambda **kw: quiet(mm.pick_hardware, mm.ClassifyConfig(**kw))[0]
    assert out(device="cpu") == mm.Hardware(torch.device("cpu"), "fp32")  # bf16 convolutions are slow on a CPU
    assert out(device="cpu", precision="bf16").precision == "bf16"
    if not torch.cuda.is_available():
        expect_error(lambda: quiet(mm.pick_hardware, mm.ClassifyConfig(device="cuda")), "no CUDA GPU")
        # --device auto that lands on the CPU says so, with the run's time there, in one line before training
        lines = quiet(mm.pick_hardware, mm.ClassifyConfig(), 3 * 3600 + 120)[1].splitlines()
        assert len(lines) == 2 and "running on the CPU, about 3:02:00" in lines[0], lines
        assert quiet(mm.pick_hardware, mm.ClassifyConfig(device="cpu"), 100)[1].startswith("device cpu")
    # A user's CUBLAS_WORKSPACE_CONFIG that cuBLAS cannot be deterministic with: one line, before any matmul (a
    # GPU mocked; the cuDNN flags and the deterministic mode are put back as they were)
    cudnn = torch.backends.cudnn
    saved = cudnn.deterministic, cudnn.benchmark, torch.are_deterministic_algorithms_enabled()
    with patched(torch.cuda, is_available=lambda: True, is_bf16_supported=lambda **kw: True), \
            mock.patch.dict(os.environ, CUBLAS_WORKSPACE_CONFIG=":0:0"):
        expect_error(lambda: quiet(mm.pick_hardware, mm.ClassifyConfig()), "CUBLAS_WORKSPACE_CONFIG=:0:0", ":4096:8")
        assert quiet(mm.pick_hardware, mm.ClassifyConfig(deterministic=False))[0].precision == "bf16"
    cudnn.deterministic, cudnn.benchmark = saved[:2]
    torch.use_deterministic_algorithms(saved[2])
    assert mm.grad_scaler(mm.Hardware(torch.device("cpu"), "fp16")).is_enabled()
    assert not mm.grad_scaler(mm.Hardware(torch.device("cpu"), "bf16")).is_enabled()

# ---------------------------------------------------------------------------------------------
# Figures and the report

def test_ticks_are_round_and_cover_the_data():
    for lo, hi, integer in ((0.08303, 0.2237, False), (0, 10_000, True), (1, 1, True), (-0.00025, 0.0031, False),
                            (0.97, 0.9991, False), (1, 2, True)):
        ticks, step = mm.nice_ticks(lo, hi, integer=integer)
        assert ticks[0] <= lo and ticks[-1] >= hi and 2 <= len(ticks) <= 11, (lo, hi, ticks)
        mantissa = step / 10 ** math.floor(math.log10(step))
        assert round(mantissa, 6) in (1, 2, 2.5, 5), step  # round steps only
        assert not integer or float(step).is_integer()  # epochs get whole ticks, never 1.2 or 1.4
        labels = [mm.tick_text(v, step) for v in ticks]
        assert len(set(labels)) == len(labels) and all(len(s) <= 8 for s in labels), labels  # no 0.08303

def test_report_numbers_equal_the_runs_and_tex_is_input_safe():
    runs = {command: run_copy(command)[1] for command in TINY}  # the three finished runs
    quiet(mm.report, mm.ReportConfig(**runs, out=(out := tmpdir())))
    md, tex = open(os.path.join(out, "report.md")).read(), open(os.path.join(out, "report.tex")).read()
    c = json.load(open(os.path.join(runs["classify"], "metrics.json")))
    for key in ("train_acc", "test_acc"):
        assert f"{100 * c[key + '_mean']:.2f} ± {100 * c[key + '_std']:.2f}" in md, key
    assert f"{c['train_loss_mean']:.4f} ± {c['train_loss_std']:.4f}" in md and "penalty: 0 marks" in md
    g = json.load(open(os.path.join(runs["generate"], "metrics.json")))
    assert f"NFE {g['nfe']}" in md and f"{g['pixel_copy_rate']:.4g}" in md and "| fid | null |" in md
    v = json.load(open(os.path.join(runs["gradflow"], "metrics.json")))
    assert f"{100 * v['table'][0]['test_acc_mean']:.2f} ± {100 * v['table'][0]['test_acc_std']:.2f}" in md
    assert "best-validation epoch" in md  # the depth table says where its test column comes from
    for name in ("classifier_accuracy", "depth_accuracy", "depth_gradflow"):
        assert os.path.getsize(os.path.join(out, name + ".png")) > 1000
        assert os.path.exists(os.path.join(out, name + ".csv")) and f"{{{name}.png}}" in tex
    for name in ("generator_samples.png", "generator_interpolations.png", "generator_neighbours.png"):
        assert os.path.exists(os.path.join(out, name)) and name in tex
    depth = 0  # braces balance (escaped \{ \} aside) and never close more than they opened
    for ch in tex.replace("\\{", "").replace("\\}", ""):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        assert depth >= 0
    assert depth == 0 and "\\documentclass" not in tex and "\\begin{document}" not in tex  # \input-safe
    assert tex.count("\\begin{table") == tex.count("\\end{table") == 3  # classifier, panel, depth
    # Every LaTeX special is escaped, once: the text reads back as typed.
    assert mm.tex("--batch-size $5 {a} ~ ^ 10% #1 a_b & c\\d") == (
        r"-{}-batch-size \$5 \{a\} \textasciitilde{} \textasciicircum{} 10\% \#1 a\_b \& c\textbackslash{}d")

def test_scaling_report_pools_seeds_per_point_and_draws_both_axes():
    root, folder = write_addnist(tmpdir()), tmpdir()
    refused = tmpdir()
    expect_error(lambda: quiet(mm.report, mm.ReportConfig(scaling=folder, out=refused)), "no sub-folder")
    assert not os.listdir(refused)
    for name, kw in (("s4", dict(steps=4, runs=2)), ("s6", dict(steps=6)), ("s6_wide", dict(steps=6, arch="12,M,16"))):
        quiet(mm.classify, tiny_cfg(root, os.path.join(folder, name), **kw))
    quiet(mm.report, mm.ReportConfig(scaling=folder, out=(out := tmpdir())))
    md = open(os.path.join(out, "report.md")).read()
    m = json.load(open(os.path.join(folder, "s4", "metrics.json")))  # two seeds pooled into one row
    test = mm.mean_std([r["test_acc"] for r in m["per_run"]])
    gap = mm.mean_std([r["train_acc"] - r["test_acc"] for r in m["per_run"]])
    assert f"| 4 | {m['params']:,} | 2 | {mm.percent(test)} | {mm.percent(gap)} | 0 |" in md, md
    for axis, xs in (("steps", ["4", "6"]), ("parameters", None)):
        lines = open(os.path.join(out, f"scaling_{axis}.csv")).read().splitlines()[1:]
        assert os.path.getsize(os.path.join(out, f"scaling_{axis}.png")) > 1000 and len(lines) == 2 + 2 + 2
        if xs:  # log10 of each step count, then the budget limit's
            assert [round(10 ** float(l.split(",")[1])) for l in lines] == [4, 6, 4, 6, 10_000, 10_000]
            assert lines[-1].startswith("limit 10000,")  # named in the legend, not over a point's tick
    # generate runs beside them: each record's own reader row (a later row that scored other samples is
    # passed over), seeds pooled per step count, real images beside
    figures = lambda both, fd, **kw: dict(both=both, reader_fd=fd, precision=0.9, recall=0.8, coverage=0.7, **kw)
    def generate_run(name, steps, seed, rows=(), **config):
        os.makedirs(os.path.join(folder, name), exist_ok=True)
        json.dump({"command": "generate", "steps": steps, "guidance": 2.0, "pixel_copy_rate": 0.01,
                   "config": {"seed": seed, "steps": steps, "batch_size": 64, "guidance": 2.0, **config}},
                  open(os.path.join(folder, name, "metrics.json"), "w"))
        open(os.path.join(folder, name, "reader.json"), "w").write("".join(json.dumps(r) + "\n" for r in rows))
    for name, steps, seed, both, fd in (("g6", 6, 0, 40.0, 3.0), ("g6s1", 6, 1, 50.0, 2.0), ("g12", 12, 0, 90, 1)):
        generate_run(name, steps, seed, [figures(both, fd, steps=steps, guidance=2.0, pixel_copy=0.01),
                                         figures(1.0, 9.0, steps=steps, guidance=3.0, pixel_copy=0.02)])
    json.dump(figures(97.0, 0.7, run="real test images"), open(os.path.join(folder, "real.json"), "w"))
    quiet(mm.report, mm.ReportConfig(scaling=folder, out=(out := tmpdir())))
    md = open(os.path.join(out, "report.md")).read()
    assert "| 6 | 2 | 0.450 ± 0.071 | 0.900 ± 0.000 | 0.800 ± 0.000 | 0.700 ± 0.000 | 2.500 ± 0.707 |" in md, md
    assert "| real test images |  | 0.970 | 0.900 | 0.800 | 0.700 | 0.700 |" in md and "Classifier scaling" in md
    lines = open(os.path.join(out, "generator_fd.csv")).read().splitlines()[1:]
    assert len(lines) == 2 + 2 and lines[-2].startswith("real reader FD,0.77") and lines[-1].endswith(",0.7,,")
    # Another recipe among them, or a second run of a (steps, seed), is refused in one line, never averaged
    generate_run("g6_again", 6, 0)
    expect_error(lambda: quiet(mm.report, mm.ReportConfig(scaling=folder, out=tmpdir())), "both seed 0 at 6 steps")
    generate_run("g6_again", 24, 0, noise_draws=1)
    expect_error(lambda: quiet(mm.report, mm.ReportConfig(scaling=folder, out=tmpdir())), "mixes generate recipes",
                 "--noise-draws None / 1")
    shutil.rmtree(os.path.join(folder, "g6_again"))
    # the photo reader's rows (they name their kind) are labelled for photographs
    for name, steps, seed, both, fd in (("g6", 6, 0, 40.0, 3.0), ("g6s1", 6, 1, 50.0, 2.0), ("g12", 12, 0, 90, 1)):
        generate_run(name, steps, seed, [figures(both, fd, steps=steps, guidance=2.0, pixel_copy=0.01,
                                                 kind="cifar100-photos", **{"class": both + 10})])
    json.dump(figures(97.0, 0.7, **{"class": 98.0}), open(os.path.join(folder, "real.json"), "w"))
    quiet(mm.report, mm.ReportConfig(scaling=folder, out=(out := tmpdir())))
    assert "| steps | seeds | class right | class and decile right | precision |" in open(
        os.path.join(out, "report.md")).read()

def test_mean_band_uses_the_steps_every_run_has():
    curves = [{"step": [10, 20, 30], "acc": [0.1, 0.2, 0.3]}, {"step": [10, 30], "acc": [0.3, 0.5]}]
    line = mm.band_line("acc", (0, 0, 0), curves, "step", "acc")
    assert line.xs == [10, 30] and np.allclose(line.ys, [0.2, 0.4])
    assert np.allclose(line.band[0], [0.2 - math.sqrt(0.02), 0.4 - math.sqrt(0.02)])

# ---------------------------------------------------------------------------------------------
# Misuse: every bad call gets one line on stderr, exit non-zero, and touches no file

def test_every_flag_is_documented_in_help():
    for command, cls in (("classify", mm.ClassifyConfig), ("gradflow", mm.GradflowConfig),
                         ("generate", mm.GenerateConfig)):
        r = subprocess.run([sys.executable, os.path.join(HERE, "mm.py"), command, "--help"], capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0 and all("--" + f.name.replace("_", "-") in r.stdout for f in mm.fields(cls)), command
        assert set(mm.field_help(cls)) == {f.name for f in mm.fields(cls)}  # every knob has its comment

def snapshot(*folders):
    """{path: (size, md5)} of every file under the folders (missing folders included as absent)."""
    files = {}
    for folder in folders:
        for where, _, names in os.walk(folder):
            for name in names:
                path = os.path.join(where, name)
                files[path] = (os.path.getsize(path), hashlib.md5(open(path, "rb").read()).hexdigest())
        files[folder] = os.path.exists(folder)
    return files

def run_script(script, *args):
    env = dict(os.environ, MM_TEST_DEVICE=DEVICE)
    if script == "mm.py":  # the tiny CIFAR archive has no official checksum; fid.py's cases check theirs
        env["MM_TRUST_LOCAL"] = "1"
    return subprocess.run([sys.executable, os.path.join(HERE, script), *args], capture_output=True, text=True,
                          timeout=300, env=env, stdin=subprocess.DEVNULL)

def exit_message(script, args):
    """Run `script args` in-process through its main(), as run_script would: -> the message it exits with.
    Returning without an exit fails; an exception other than SystemExit propagates (a traceback a user sees)."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}  # mm.main() installs its own
    trust = {"MM_TRUST_LOCAL": "1"} if script == "mm.py" else {}
    try:
        with mock.patch.dict(os.environ, trust), patched(sys, argv=[script, *args]):
            quiet(mm.main, args) if script == "mm.py" else quiet(fid.main)
    except SystemExit as e:
        return str(e.code)
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    raise AssertionError(f"{script} {args} did not fail")

def test_bad_invocations_get_one_line_and_touch_nothing():
    (addnist, finished), (_, paused) = run_copy("classify"), run_copy("classify", paused=True)
    (cifar, finished_vgg), (_, gen) = run_copy("gradflow"), run_copy("generate")
    real = open(os.path.join(finished, "run0", "ckpt.pt"), "rb").read()
    broken = {}  # checkpoints that are not ones classify wrote
    for kind, content in (("garbage", b"not a checkpoint" * 64), ("truncated", real[:len(real) // 2]),
                          ("empty", b""), ("other-command", open(os.path.join(gen, "ckpt.pt"), "rb").read())):
        broken[kind] = tmpdir()
        os.makedirs(os.path.join(broken[kind], "run0"))
        with open(os.path.join(broken[kind], "run0", "ckpt.pt"), "wb") as f:
            f.write(content)
    a_file = os.path.join(tmpdir(), "a_file")
    open(a_file, "w").close()
    fresh = os.path.join(tmpdir(), "fresh")  # must still not exist afterwards
    stats = os.path.join(tmpdir(), "stats64.npz")
    np.savez(stats, mu=np.zeros(64), sigma=np.eye(64))
    images = os.path.join(tmpdir(), "images.npy")
    np.save(images, np.zeros((4, 3, 8, 8), np.uint8))
    not_png = tmpdir()
    open(os.path.join(not_png, "a.png"), "w").write("this is text")
    weights = os.path.join(tmpdir(), "my.pth")
    open(weights, "wb").write(b"\0" * 100)
    c = ["classify", "--data-dir", addnist, "--batch-size", "8"]  # the tiny sets hold fewer images than a batch
    g, v = ["generate", "--data-dir", cifar], ["gradflow", "--data-dir", cifar]
    bad_values = [(c, "--arch 32,X|--arch M,M,M,M,M,M|--steps 0|--batch-size 4096|--lr fast|--lr -1|--pause-at -3|"
                      "--eval-train 0|--eval-train -5|--shift -2|--ema-decay 1.5|--ema-decay -0.5|--warmup-steps -10|"
                      "--zoom 5"),
                  (g, "--widths 0,0,0|--widths a,b,c|--blocks 0|--emb-dim 0|--p-uncond 5|--sigma-data 0|"
                      "--fid-samples 0|--dropout 2|--ema-length 0.5|--warmup-fraction 1000"), (v, "--depth 9")]
    tiny_classify = "--arch 8,M,16 --steps 6 --batch-size 8 --warmup-steps 2 --eval-train 32".split()
    mm_cases = [(base + ["--out", fresh, *case.split()], case.split()[0])
                for base, cases in bad_values for case in cases.split("|")] + [
        (g + ["--out", fresh, "--widths", "8,12,16"], "multiple of 8"), (["nonsense"], "invalid choice"),
        (g + ["--out", fresh, "--steps", "60000"], "60,000"),
        *([] if torch.cuda.is_available() else [(c + ["--out", fresh, "--device", "cuda"], "cuda")]),
        *((c + ["--out", folder, "--resume", *tiny_classify], "not a checkpoint") for folder in broken.values()),
        (g + ["--out", fresh, "--sample-only", "--ckpt", os.path.join(broken["garbage"], "run0", "ckpt.pt")],
         "not a checkpoint"),
        (c + ["--out", "/proc/mm-test-out"], "cannot write"),
        (c + ["--out", os.path.join(a_file, "sub")], "cannot write"),
        (["classify", "--data-dir", a_file, "--out", fresh], "is a file"),
        (c + ["--out", paused, "--resume", "--pause-at", "2", *tiny_classify], "--pause-at 2"),
        (c + ["--out", finished, "--resume", "--steps", "60"], "--steps"),
        (v + ["--out", finished_vgg, "--resume", "--depth", "8", "--batch-size", "4", "--val-size", "4",
              "--epochs", "5"], "--epochs"),
    ]
    fid_cases = [
        ([images, images, "--batch-size", "-1"], "--batch-size"),
        ([images, images, "--batch-size", "0"], "--batch-size"),
        ([images, images, "--weights", weights], "left as it is"), ([not_png, images], "not a readable image"),
        ([stats, images], "--dims"), ([images, "--save-stats", os.path.join(fresh, "s.npz")], "does not exist"),
        ([images, images, "--dims", "7"], "--dims"), ([os.path.join(fresh, "x.npz"), stats], "does not exist"),
        ([stats], "--save-stats"),
    ]
    watched = [addnist, cifar, finished, paused, finished_vgg, gen, fresh, weights, not_png, *broken.values()]
    before = snapshot(*watched)
    jobs = [("mm.py", args, needle) for args, needle in mm_cases] + [("fid.py", a, n) for a, n in fid_cases]
    for script, args, needle in jobs:  # in-process, through each script's main()
        msg = exit_message(script, args)
        assert msg.startswith("error:") and "\n" not in msg and needle in msg, (script, args, needle, msg)
    for script, args, needle in (jobs[0], jobs[-1]):  # and as a user meets them: one stderr line, no traceback
        one_line_error(run_script(script, *args), needle)
    after = snapshot(*watched)
    changed = sorted(set(before.items()) ^ set(after.items()))
    assert not changed and os.path.exists(weights), changed  # nothing created, changed or renamed

def test_second_ctrl_c_exits_in_one_line():
    def pressed_twice(cfg):
        raise KeyboardInterrupt
    with patched(mm, COMMANDS={**mm.COMMANDS, "classify": (mm.ClassifyConfig, pressed_twice, "")}):
        try:
            mm.main(["classify"])
            raise AssertionError("main() returned after an abort")
        except SystemExit as e:
            msg = str(e.code)
    assert msg.startswith("error: aborted") and "--resume" in msg and "\n" not in msg, msg

# ---------------------------------------------------------------------------------------------
# data.py: downloads

def test_download_verifies_caches_and_fails_in_one_line():
    body, d = os.urandom(300_000), tmpdir()
    dest, md5 = os.path.join(d, "sub", "file.bin"), hashlib.md5(body).hexdigest()
    routes = {"/f": (200, body, None), "/bad": (200, b"not the real bytes", None), "/cut": (200, b"x" * 1000, 5000),
              "/500": (500, b"oops", None), "/w": (200, b"weights" * 1000, None)}
    with http_server(routes) as (url, hits):
        assert "did not exist" in quiet(data.download, url + "/f", dest, md5=md5, size=len(body), quiet=True)[1]
        bad = os.path.join(d, "bad.bin")  # a wrong checksum: kept aside as .bad, never reused, fetched again
        for _ in range(2):
            expect_error(lambda: quiet(data.download, url + "/bad", bad, md5="0" * 32), "md5", ".bad")
        assert hits.count("/bad") == 2 and os.path.exists(bad + ".bad") and not os.path.exists(bad)
        quiet(data.download, url + "/w", w := os.path.join(d, "w.pth"), sha256=hashlib.sha256(b"weights" * 1000)
              .hexdigest()[:8])  # a sha256 prefix is accepted
        assert os.path.getsize(w) == 7000
        cut = os.path.join(d, "cut")
        msg = expect_error(lambda: quiet(data.download, url + "/cut", cut), "by hand", cut)
        assert "truncated" in msg or "broke off" in msg, msg
        expect_error(lambda: quiet(data.download, url + "/500", cut), "HTTP 500", "put it at " + cut)
    expect_error(lambda: quiet(data.download, closed_url() + "/f", cut), "no network", "put it at " + cut)
    assert hits.count("/f") == 1 and open(dest, "rb").read() == body
    assert not [f for f in os.listdir(d) + os.listdir(os.path.dirname(dest)) if f.endswith(".part") or f == "cut"]
    # The server is gone now: a file already in place must be used without any network access.
    assert data.download("http://127.0.0.1:9/gone", dest, md5=md5, size=len(body)) == dest
    # A file in place that fails its checksum is used only on explicit request (stand-ins), and said so.
    with patched(os, environ={**os.environ, "MM_TRUST_LOCAL": "1"}):
        _, note = quiet(data.download, "http://127.0.0.1:9/gone", dest, md5="0" * 32)
    assert "without checking" in note and open(dest, "rb").read() == body
    with patched(os, environ={k: v for k, v in os.environ.items() if k != "MM_TRUST_LOCAL"}):
        expect_error(lambda: data.download("http://127.0.0.1:9/gone", dest, md5="0" * 32), "MM_TRUST_LOCAL")
    assert os.path.exists(dest + ".bad") and not os.path.exists(dest)

# ---------------------------------------------------------------------------------------------
# data.py: AddNIST and CIFAR-100 parsing

def test_addnist_zip_download_extract_and_load():
    for nested in (True, False):
        root = tmpdir()
        with http_server({"/addnist": (200, addnist_zip_bytes(nested), None)}) as (url, hits):
            with patched(data, ADDNIST_URL=url + "/addnist"):
                (x, y), _ = quiet(data.load_split, "addnist", "train", root)
                assert x.dtype == np.float32 and x.shape == (48, 3, 28, 28) and y.dtype == np.int64
                xt, yt = data.load_test("addnist", root)
                assert xt.shape == (24, 3, 28, 28) and len(hits) == 1  # unpacked once, then cached
        ref = write_addnist(tmpdir())  # same seed: the arrays must round-trip bit for bit
        assert np.array_equal(x, np.load(os.path.join(ref, "train_x.npy")))
        assert sorted(os.listdir(root)) == ["addnist"], os.listdir(root)  # no .part, .tmp or zip left

def test_addnist_folder_taken_as_is_and_bad_files_refused():
    root = write_addnist(tmpdir())
    assert data.load_split("addnist", "valid", root)[0].shape == (16, 3, 28, 28)  # a folder of the six files
    for dataset in ("addnist", "cifar100"):
        expect_error(lambda: data.load_split(dataset, "test", root), "load_test")  # test only through load_test
    nhwc = np.zeros((4, 28, 28, 3), np.float32)  # channels last: the wrong layout
    for name, array, needles in (("train_x.npy", nhwc, ("train_x.npy", "(N, 3, 28, 28)")),
                                 ("train_x.npy", np.zeros((48, 3, 28, 28)), ("float64",)),
                                 ("valid_y.npy", np.zeros(16, np.int32), ("valid_y.npy", "int64"))):
        np.save(os.path.join(root, name), array)
        expect_error(lambda: data.load_split("addnist", name[:5], root), *needles)
    os.remove(os.path.join(root, "test_y.npy"))
    expect_error(lambda: data.load_split("addnist", "valid", root), "test_y.npy")  # incomplete folder
    with open(os.path.join(write_addnist(root := tmpdir()), "train_y.npy"), "r+b") as f:  # corrupt header
        f.write(b"garbage!")
    expect_error(lambda: data.load_split("addnist", "train", root), "train_y.npy")
    with http_server({"/z": (200, b"PK\x03\x04 this is not a zip", None)}) as (url, _), \
            patched(data, ADDNIST_URL=url + "/z"):
        expect_error(lambda: quiet(data.load_split, "addnist", "train", root := tmpdir()), "addnist.zip", ".bad")
    assert not os.path.exists(os.path.join(root, "addnist"))

def test_cifar_parse_and_errors():
    for name, n_train, n_test in (("cifar100", 20, 10), ("cifar10", 23, 10)):  # CIFAR-10: 5 batches of 4-5
        blob, root, spec = cifar_tar_bytes(n_train, n_test, name=name), tmpdir(), data.CIFAR[name]
        file = os.path.basename(spec["url"])  # cifar-100-python.tar.gz, cifar-10-python.tar.gz
        with http_server({"/" + file: (200, blob, None)}) as (url, hits), \
                cifar_accepted(blob, name, url=f"{url}/{file}"):
            (x, y), _ = quiet(data.load_split, name, "train", root)
            xt, yt = data.load_test(name, root)
        assert hits == ["/" + file] and os.listdir(root) == [file]  # downloaded once, then cached
        assert x.shape == (n_train, 3, 32, 32) and x.dtype == np.uint8 and y.dtype == np.int64
        assert xt.shape == (n_test, 3, 32, 32) and yt.max() < spec["classes"]
        # Channel-major rows: the first 1024 bytes are the red plane, row by row; batches in their order.
        with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
            raw = [pickle.load(tar.extractfile(f"{spec['folder']}/{m}"), encoding="bytes") for m in spec["train"]]
        pixels, labels = np.concatenate([r[b"data"] for r in raw]), sum((r[spec["labels"]] for r in raw), [])
        assert np.array_equal(x[-3, 0, 1, :], pixels[-3, 32:64])
        assert np.array_equal(x[3, 2, 0, :], pixels[3, 2048:2080])
        assert y.tolist() == labels
        # A truncated archive that somehow passed (no checksum to catch it) still gives a one-line error.
        bad_root = tmpdir()
        bad = os.path.join(bad_root, os.path.basename(spec["url"]))
        open(bad, "wb").write(blob[: len(blob) // 2])
        with mock.patch.dict(spec, md5="", size=None):
            expect_error(lambda: data.load_split(name, "train", bad_root), "corrupt")
        # With the real checksum, the same file is refused and moved aside.
        expect_error(lambda: data.load_split(name, "train", bad_root), ".bad")
        assert not os.path.exists(bad)
    # CIFAR-100's archive in CIFAR-10's place is refused in one line.
    blob = cifar_tar_bytes(name="cifar100")
    root = tmpdir()
    open(os.path.join(root, "cifar-10-python.tar.gz"), "wb").write(blob)
    with cifar_accepted(blob, "cifar10"):
        expect_error(lambda: data.load_split("cifar10", "train", root), "no cifar-10-batches-py/data_batch_1")

# ---------------------------------------------------------------------------------------------
# fid.py: the distance in closed form, the square root against scipy, the network's structure

def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 16))
    mu, sigma = fid.feature_stats(a)
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-8  # identical sets -> 0
    shift = rng.normal(size=16)
    assert abs(fid.frechet_distance(mu, sigma, mu + shift, sigma) - shift @ shift) < 1e-8  # equal covariances
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2 with standard deviations s
    assert abs(fid.frechet_distance(1.0, 4.0, -2.0, 9.0) - (9 + 1)) < 1e-12
    # Diagonal: sum of (m1 - m2)^2 + (sqrt(v1) - sqrt(v2))^2 over coordinates
    v1, v2, m1, m2 = rng.uniform(0.1, 3, 8), rng.uniform(0.1, 3, 8), rng.normal(size=8), rng.normal(size=8)
    ref = ((m1 - m2) ** 2 + (np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    ours = fid.frechet_distance(m1, np.diag(v1), m2, np.diag(v2))
    assert abs(ours - ref) < 1e-10, (ours, ref)
    expect_error(lambda: fid.frechet_distance(mu, sigma, mu[:8], sigma[:8, :8]), "--dims")

def test_trace_sqrt_matches_scipy_sqrtm():
    import scipy.linalg
    rng = np.random.default_rng(1)
    worst = 0.0
    for n_samples in (400, 40):  # full rank, then rank-deficient (40 samples in 64 dimensions)
        s1 = np.cov(rng.normal(size=(n_samples, 64)) @ rng.normal(size=(64, 64)), rowvar=False)
        s2 = np.cov(rng.normal(size=(n_samples, 64)) * rng.uniform(0.5, 2, 64), rowvar=False)
        ref = np.trace(scipy.linalg.sqrtm(s1 @ s2)).real
        ours = fid.trace_sqrt_product(s1, s2)[0]
        worst = max(worst, abs(ours - ref) / abs(ref))
        assert abs(ours - ref) < 1e-6 * abs(ref), (ours, ref)
    print(f"OK trace sqrt vs scipy sqrtm (max rel diff {worst:.1e})")
    try:  # a "covariance" with a negative eigenvalue is refused, not silently rounded
        fid.frechet_distance(np.zeros(2), np.array([[1.0, 0], [0, -4.0]]), np.zeros(2), np.eye(2))
    except ValueError as e:
        assert "negative eigenvalue" in str(e)
    else:
        raise AssertionError("a covariance with a negative eigenvalue was accepted")

def test_inception_structure_and_outputs():
    torch.manual_seed(0)
    net = fid.FIDInceptionV3().eval()
    # torchvision's inception_v3 has 27,161,264 parameters with its aux head and 1000 classes; the FID
    # network drops the aux head (3,326,696) and has 1008 classes (+8 x 2049): 23,850,960.
    assert sum(p.numel() for p in net.parameters()) == 27_161_264 - 3_326_696 + 8 * 2049
    keys = net.state_dict().keys()
    for k in ("Conv2d_1a_3x3.conv.weight", "Conv2d_4a_3x3.bn.running_var", "Mixed_5b.branch_pool.conv.weight",
              "Mixed_6e.branch7x7dbl_5.bn.bias", "Mixed_7a.branch7x7x3_4.conv.weight",
              "Mixed_7c.branch3x3dbl_3b.bn.num_batches_tracked", "fc.weight", "fc.bias"):
        assert k in keys, k
    assert not any(k.startswith("AuxLogits") for k in keys)
    assert all(m.eps == 0.001 for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert net.fc.weight.shape == (1008, 2048)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        for dims in fid.DIMS:
            assert net(x, dims=dims).shape == (2, dims)
        a, b = net(x), net(x)
    assert torch.equal(a, b)  # deterministic
    # The TensorFlow-style pool ignores padding: a constant map stays constant up to the border.
    c = torch.full((1, 1, 5, 5), 3.0)
    assert torch.equal(fid.tf_avg_pool(c), c)
    assert not torch.equal(torch.nn.functional.avg_pool2d(c, 3, 1, 1), c)  # what torchvision's would do

def test_features_run_without_tf32_and_restore_it():
    seen = []
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    class Probe(torch.nn.Module):  # records the precision settings while the "network" runs
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
        def forward(self, x, dims, resize):
            seen.append((matmul.fp32_precision, conv.fp32_precision))
            return x.flatten(1)[:, :dims]
    before = torch.backends.fp32_precision, matmul.fp32_precision, conv.fp32_precision
    try:
        # The newer API switched on globally, as a user's script may do: reading the legacy allow_tf32 flags
        # would now raise, so this also guards the regression where FID died after a whole training run.
        torch.backends.fp32_precision = "tf32"
        matmul.fp32_precision = conv.fp32_precision = "tf32"
        fid.inception_features(torch.zeros(3, 3, 32, 32, dtype=torch.uint8), Probe(), dims=64, batch_size=2, quiet=True)
        assert seen == [("ieee", "ieee"), ("ieee", "ieee")]  # two batches, both in IEEE float32
        assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")  # restored
    finally:
        torch.backends.fp32_precision, matmul.fp32_precision, conv.fp32_precision = before
    # A torch before 2.9 has only the legacy flags (stand-ins for its backends): switched off, then restored
    old_matmul, old_cudnn = types.SimpleNamespace(allow_tf32=True), types.SimpleNamespace(allow_tf32=True)
    class OldProbe(Probe):
        def forward(self, x, dims, resize):
            seen.append((old_matmul.allow_tf32, old_cudnn.allow_tf32))
            return x.flatten(1)[:, :dims]
    with patched(torch.backends.cuda, matmul=old_matmul), patched(torch.backends, cudnn=old_cudnn):
        fid.inception_features(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), OldProbe(), dims=64, quiet=True)
    assert seen[-1] == (False, False) and old_matmul.allow_tf32 and old_cudnn.allow_tf32

def test_inception_weights_download_and_strict_load():
    torch.manual_seed(0)
    buf = io.BytesIO()
    torch.save(fid.FIDInceptionV3().state_dict(), buf)
    blob = buf.getvalue()
    root = tmpdir()
    with http_server({"/w.pth": (200, blob, None)}) as (url, _):
        with patched(fid, WEIGHTS_URL=url + "/w.pth", WEIGHTS_SHA256=hashlib.sha256(blob).hexdigest(),
                     WEIGHTS_BYTES=len(blob)):
            net, _ = quiet(fid.load_inception, "cpu", root)
    assert os.path.exists(os.path.join(root, "w.pth")) and not net.training
    msg = expect_error(lambda: quiet(fid.load_inception, "cpu", tmpdir()), "Inception weights", "by hand")
    assert fid.WEIGHTS_URL in msg

def test_fid_api_stats_cache_and_bad_inputs():
    torch.manual_seed(0)
    net = fid.FIDInceptionV3().eval()
    rng = np.random.default_rng(0)
    imgs_a = torch.from_numpy(rng.integers(0, 256, (6, 3, 16, 16), dtype=np.uint8))
    imgs_b = torch.from_numpy(rng.integers(0, 256, (6, 3, 16, 16), dtype=np.uint8))
    cache = tmpdir()
    mu_a, _ = quiet(fid.reference_stats, imgs_a, {"dataset": "toy", "split": "test"}, net, cache, dims=64)[0]
    mu_b, _ = quiet(fid.reference_stats, imgs_b, {"dataset": "toy", "split": "test"}, net, cache, dims=64)[0]
    assert len(os.listdir(cache)) == 2 and not np.allclose(mu_a, mu_b)  # other images, other cache entry
    mu_a2, _ = fid.reference_stats(imgs_a, {"dataset": "toy", "split": "test"}, net, cache, dims=64)
    assert np.array_equal(mu_a, mu_a2)  # the same inputs reuse the cache
    for name in os.listdir(cache):  # caches whose stored key does not match their name are refused
        np.savez(os.path.join(cache, name), mu=mu_b, sigma=np.eye(64), key="something else")
    expect_error(lambda: fid.reference_stats(imgs_a, {"dataset": "toy", "split": "test"}, net, cache, dims=64),
                 "other inputs")
    d, _ = quiet(fid.fid_between, imgs_a, imgs_a, net, dims=64)
    assert abs(d) < 1e-6
    # The image loaders: folders, arrays, stats files, and their one-line errors.
    folder = tmpdir()
    from PIL import Image
    for i, im in enumerate(imgs_a.permute(0, 2, 3, 1).numpy()):
        Image.fromarray(im).save(os.path.join(folder, f"{i}.png"))
    assert torch.equal(fid.load_images(folder), imgs_a)
    np.savez(os.path.join(folder, "s.npz"), images=imgs_a.permute(0, 2, 3, 1).numpy())  # NHWC is accepted
    assert torch.equal(fid.load_images(os.path.join(folder, "s.npz")), imgs_a)
    np.savez(os.path.join(folder, "stats.npz"), mu=mu_a, sigma=np.eye(64))
    assert np.array_equal(fid.load_images(os.path.join(folder, "stats.npz"))[0], mu_a)
    expect_error(lambda: fid.load_images(tmpdir()), "no .png")
    Image.fromarray(np.zeros((8, 9, 3), np.uint8)).save(os.path.join(folder, "odd.png"))
    expect_error(lambda: fid.load_images(folder), "mixes image sizes")
    np.save(os.path.join(folder, "f.npy"), np.zeros((2, 3, 8, 8), np.float32))
    expect_error(lambda: fid.load_images(os.path.join(folder, "f.npy")), "float32", "uint8")
    expect_error(lambda: fid.inception_features(np.zeros((2, 8, 8), np.uint8), net), "(N, 3, H, W)")
    expect_error(lambda: fid.feature_stats(np.zeros((1, 4))), "at least 2")

def test_matches_pytorch_fid_package():
    """The same random weights and images through pytorch-fid's own network and distance, where it imports.

    pytorch-fid needs torchvision, which has no CPU build here; `pip install --no-deps --target DIR
    torchvision==0.28.0 pytorch-fid` and PYTHONPATH=DIR run this test. torchvision's compiled ops are
    then missing, so its meta-kernel registration is stubbed out: the Inception model code never uses them.
    """
    try:
        sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
        import pytorch_fid.fid_score as pf_score
        import pytorch_fid.inception as pf
    except ImportError:
        sys.modules.pop("torchvision._meta_registrations", None)
        raise Skip("pytorch-fid (and torchvision) not importable")
    torch.manual_seed(0)
    ours = fid.FIDInceptionV3().eval()
    for m in ours.modules():  # non-trivial BN statistics, so that they are exercised too
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1), m.running_var.uniform_(0.5, 2.0), m.weight.data.uniform_(0.5, 1.5)
    state = ours.state_dict()  # float32, as the real weight file: both models load it exactly
    with patched(pf, load_state_dict_from_url=lambda *a, **k: state):  # their loader, our random weights
        theirs = {d: pf.InceptionV3([pf.InceptionV3.BLOCK_INDEX_BY_DIM[d]]).double().eval() for d in fid.DIMS}
    ours = ours.double()  # float64 on both sides, so any difference is structural, not rounding
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (4, 3, 32, 32), dtype=np.uint8))
    worst = 0.0
    with torch.no_grad():
        for d in fid.DIMS:
            a = ours(x.double() / 255, dims=d)
            b = torch.nn.functional.adaptive_avg_pool2d(theirs[d](x.double() / 255)[0], 1).flatten(1)
            rel = ((a - b).abs().max() / b.abs().max()).item()
            worst = max(worst, rel)
            assert rel < 1e-10, (d, rel)
    rng = np.random.default_rng(1)
    f1, f2 = rng.normal(size=(300, 32)), rng.normal(size=(300, 32)) * 1.3 + 0.2
    s1, s2 = fid.feature_stats(f1), fid.feature_stats(f2)
    ref = pf_score.calculate_frechet_distance(*s1, *s2)
    assert abs(fid.frechet_distance(*s1, *s2) - ref) < 1e-9 * abs(ref), ref
    print(f"OK features vs pytorch-fid (max rel diff {worst:.1e}), distance vs pytorch-fid ({ref:.6f})")

def test_clean_resize_keeps_constant_images_and_clips_its_overshoot():
    flat = torch.full((1, 3, 32, 32), 128, dtype=torch.uint8)
    out = fid.clean_resize(flat)
    assert out.shape == (1, 3, 299, 299) and torch.allclose(out, torch.full_like(out, 128 / 255), atol=1e-5)
    out = fid.clean_resize(torch.from_numpy(clipped_edge()))
    assert out.min() == 0.0 and out.max() == 1.0  # bicubic overshoots beside an edge: clipped, as clean-fid does

# ---------------------------------------------------------------------------------------------
# fid.py: the quality panel (KID, precision/recall, density/coverage, copy rate) against closed forms
# and constructed cases, and against the reference packages where they import

def test_kid_is_near_zero_for_one_distribution_and_grows_with_a_shift():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(400, 16)), rng.normal(size=(400, 16))
    same, spread = fid.kid(a, b, subsets=20, subset_size=200)
    assert abs(same) < 3 * spread + 1e-3, (same, spread)  # unbiased: zero in expectation for one distribution
    shifted, _ = fid.kid(a, b + 0.5, subsets=20, subset_size=200)
    # For k(x,y) = (x·y/d + 1)³ and a mean shift m, MMD² grows with |m|²: far above the same-distribution value.
    assert shifted > 10 * max(abs(same), spread), (shifted, same)
    x = rng.normal(size=(3, 4))  # one subset of all rows against itself: the unbiased estimate in closed form
    k = (x @ x.T / 4 + 1) ** 3
    within = 2 * (k.sum() - np.trace(k)) / 6
    assert abs(fid.kid(x, x, subsets=1, subset_size=3)[0] - (within - 2 * k.sum() / 9)) < 1e-12

def test_prdc_on_constructed_sets():
    rng = np.random.default_rng(1)
    real = rng.normal(size=(300, 8))
    same = fid.prdc(real, real.copy(), 3)
    assert same["precision"] == same["recall"] == same["coverage"] == 1.0  # identical sets
    far = fid.prdc(real, real + 100.0, 3)
    assert far == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}  # a set moved far away
    collapsed = real[rng.integers(0, 300, 300) % 5]  # every sample one of 5 real points: mode collapse
    c = fid.prdc(real, collapsed, 3)
    assert c["precision"] == 1.0 and c["recall"] < 0.1 and c["coverage"] < 0.1, c  # realistic, not diverse
    chunked = fid.prdc(real, real + 0.3, 3, chunk=7)
    assert chunked == fid.prdc(real, real + 0.3, 3, chunk=1000)  # chunking changes nothing

def test_copy_rate_counts_an_exact_training_image():
    rng = np.random.default_rng(2)
    train = rng.integers(0, 256, (50, 3, 8, 8)).astype(np.uint8)
    test = rng.integers(0, 256, (40, 3, 8, 8)).astype(np.uint8)  # new images: none is a training image
    samples = rng.integers(0, 256, (20, 3, 8, 8)).astype(np.uint8)
    samples[3], samples[7] = train[10], train[42]  # two exact copies
    to_train = fid.nearest_distances(samples, train, chunk=6)
    brute = np.sqrt(((samples[:, None].astype(float) - train[None].astype(float)) ** 2).sum((2, 3, 4))).min(1)
    assert np.allclose(to_train, brute) and to_train[3] == 0 and to_train[7] == 0
    panel = fid.copy_rate(to_train, fid.nearest_distances(test, train))
    assert panel["copy_rate"] == 2 / 20 and 0.5 < panel["median_ratio"] < 2  # the copies, and only them

def test_a_mirrored_copy_is_found_and_shown_mirrored():
    rng = np.random.default_rng(3)
    train = torch.from_numpy(rng.integers(0, 256, (30, 3, 8, 8)).astype(np.uint8))
    test = torch.from_numpy(rng.integers(0, 256, (20, 3, 8, 8)).astype(np.uint8))
    samples = rng.integers(0, 256, (10, 3, 8, 8)).astype(np.uint8)
    samples[4] = train[17].flip(2).numpy()  # a training image, mirrored
    with patched(fid, WEIGHTS_URL="http://127.0.0.1:9/w.pth"):  # offline: the pixel half of the panel only
        m = quiet(fid.score_samples, samples, train, test, "cpu", tmpdir(), neighbours=2, k=1)[0]
    assert m["fid"] is None and m["pixel_copy_rate"] >= 1 / 10 and m["pixel_copy"]["threshold"] > 0
    near = m["neighbours"]
    assert near["sample_index"][2] == 4 and near["pixel_l2"][2] == [0.0]  # the nearest sample is the copy
    assert near["pixel_index"][2] == [17] and near["mirrored"][2] == [True]

def test_prdc_matches_the_reference_package():
    try:
        import prdc
    except ImportError:
        raise Skip("prdc (and scikit-learn) not importable") from None
    rng = np.random.default_rng(3)
    real = rng.normal(size=(300, 64)).astype(np.float32)
    fake = (rng.normal(size=(200, 64)) * 1.1 + 0.2).astype(np.float32)
    for k in (3, 5):
        ref, _ = quiet(prdc.compute_prdc, real, fake, k)
        ours = fid.prdc(real, fake, k, chunk=97)
        diff = max(abs(ours[key] - ref[key]) for key in ref)
        assert diff < 1e-12, (ours, ref)
    print(f"OK prdc vs the prdc package (maxdiff {diff:.1e})")

def test_kid_matches_torch_fidelity():
    try:
        from torch_fidelity.metric_kid import kid_features_to_metric
    except ImportError:
        raise Skip("torch-fidelity (and torchvision) not importable") from None
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(300, 64)), rng.normal(size=(400, 64)) + 0.05
    ref = kid_features_to_metric(torch.from_numpy(a), torch.from_numpy(b), kid_subsets=20, kid_subset_size=100)
    mean, std = fid.kid(a, b, subsets=20, subset_size=100)
    assert abs(mean / ref["kernel_inception_distance_mean"] - 1) < 1e-9
    assert abs(std / ref["kernel_inception_distance_std"] - 1) < 1e-9

def clipped_edge():
    edge = np.zeros((1, 3, 32, 32), np.uint8)
    edge[..., 16:] = 255  # a hard edge: bicubic overshoots below 0 and above 255 beside it
    return edge

def test_clean_resize_matches_clean_fid():
    try:
        from cleanfid.resize import make_resizer
    except ImportError:
        raise Skip("clean-fid not importable") from None
    edge = clipped_edge()
    out = fid.clean_resize(torch.from_numpy(edge))
    ref = make_resizer("PIL", False, "bicubic", (299, 299))(edge[0].transpose(1, 2, 0)).transpose(2, 0, 1) / 255.0
    assert np.abs(out[0].numpy() - ref).max() < 1e-7

def test_fid_cli_prints_the_whole_panel():
    d = tmpdir()
    rng = np.random.default_rng(5)
    np.save(os.path.join(d, "a.npy"), rng.integers(0, 256, (12, 3, 16, 16), dtype=np.uint8))
    np.save(os.path.join(d, "b.npy"), rng.integers(0, 256, (12, 3, 16, 16), dtype=np.uint8))
    torch.manual_seed(0)
    weights = os.path.join(d, "w.pth")
    torch.save(fid.FIDInceptionV3().state_dict(), weights)  # random weights: the panel's plumbing, not its values
    env = dict(os.environ, MM_TRUST_LOCAL="1")
    args = [os.path.join(d, "a.npy"), os.path.join(d, "b.npy"), "--all", "--dims", "64", "--weights", weights]
    r = subprocess.run([sys.executable, os.path.join(HERE, "fid.py"), *args], capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    for key in ("fid", "clean_fid", "kid_mean", "precision", "recall", "density", "coverage"):
        assert any(line.split()[:1] == [key] for line in r.stdout.splitlines()), (key, r.stdout)
    np.savez(os.path.join(d, "a.npz"), mu=np.zeros(3), sigma=np.eye(3))
    np.savez(os.path.join(d, "b.npz"), mu=np.ones(3), sigma=4 * np.eye(3))  # FID = 3 + 3 x (1 - 2)^2 = 6
    r = subprocess.run([sys.executable, os.path.join(HERE, "fid.py"), os.path.join(d, "a.npz"),
                        os.path.join(d, "b.npz")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "FID: 6.0000" in r.stdout, r.stdout + r.stderr


# ---------------------------------------------------------------------------------------------

if __name__ == "__main__":  # python test_mm.py [--device cuda] [names...]
    args = sys.argv[1:]
    if "--device" in args:
        at = args.index("--device")
        DEVICE = os.environ["MM_TEST_DEVICE"] = args[at + 1]  # subprocesses of the tests inherit it
        HW = mm.Hardware(torch.device(DEVICE), "fp32")
        del args[at:at + 2]
    print(f"device-dependent tests run on {DEVICE}")
    counts, t_all = {"passed": 0, "failed": 0, "skipped": 0}, time.time()
    for name, fn in [(n, f) for n, f in list(globals().items()) if n.startswith("test_")]:
        if args and not any(a in name for a in args):
            continue
        t = time.time()
        try:
            fn()
            counts["passed"] += 1
            print(f"OK {name} ({time.time() - t:.1f}s)", flush=True)
        except Skip as e:
            counts["skipped"] += 1
            print(f"SKIP {name}: {e}", flush=True)
        except Exception:
            counts["failed"] += 1
            print(f"{traceback.format_exc()}FAIL {name}", flush=True)
    print(f"({time.time() - t_all:.0f}s) " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    sys.exit(1 if counts["failed"] or not counts["passed"] else 0)
