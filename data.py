"""Datasets for Minimal Mastery: download, verify, cache, parse.

    python data.py addnist  [--data-dir DIR]   # fetch and check AddNIST  (about 629 MB)
    python data.py cifar100 [--data-dir DIR]   # fetch and check CIFAR-100 (about 169 MB)
    python data.py cifar10  [--data-dir DIR]   # fetch and check CIFAR-10  (about 170 MB)

Everything lives under one cache root: --data-dir, else $MM_DATA, else ./data. A file already in
place is used without touching the network, once its checksum matches; MM_TRUST_LOCAL=1 skips that
check for files already in place (stand-ins in the official format, say), with a notice each time.
Downloads stream into `NAME.part`, are verified, and only then renamed to their real name, so an
interrupted download never leaves a half-written file behind.

Loaders return numpy arrays. The test split has its own entry point, `load_test()`, which only
evaluation code calls: `load_split()` refuses it, so a training loop cannot draw from it by accident.
"""
import argparse
import functools
import hashlib
import io
import os
import pickle
import shutil
import sys
import tarfile
import time
import zipfile

import numpy as np
import requests

# Official sources. AddNIST (Geada et al., "Insights from the NAS-Unseen-Data challenge") is published
# by Newcastle University's data repository as an article zip with no published checksum, so we
# verify it by structure (zip integrity, then every array's shape and dtype) instead.
ADDNIST_URL = "https://data.ncl.ac.uk/ndownloader/articles/24574354/versions/1"
ADDNIST_FILES = [f"{s}_{k}.npy" for s in ("train", "valid", "test") for k in ("x", "y")]
ADDNIST_SIZES = {"train": 45_000, "valid": 15_000, "test": 10_000}  # official split sizes
# CIFAR (Krizhevsky 2009): the official archive, its md5 and size, the folder inside it, the pickles of each
# split, the key of the labels and how many classes there are
CIFAR = {"cifar100": dict(url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                          md5="eb9058c3a382ffc7106e4002c42a8d85", size=169_001_437, folder="cifar-100-python",
                          train=["train"], test=["test"], labels=b"fine_labels", classes=100),
         "cifar10": dict(url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                         md5="c58f30108f718f92721af3b95e74349a", size=170_498_071, folder="cifar-10-batches-py",
                         train=[f"data_batch_{i}" for i in range(1, 6)], test=["test_batch"], labels=b"labels",
                         classes=10)}


class UserError(Exception):
    """A problem with the user's input or environment: printed as one line, never as a traceback."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag gets one line (what is wrong, where to look) instead of a usage block."""

    def error(self, message):
        sys.exit(f"error: {message} (see {self.prog} --help)")


def fmt_time(seconds):
    """Seconds as m:ss, or h:mm:ss past an hour: for progress lines and ETAs."""
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def data_root(data_dir=None):
    """The cache root: the explicit argument, else $MM_DATA, else ./data. It must be a folder, if it exists."""
    root = os.path.abspath(data_dir or os.environ.get("MM_DATA") or "data")
    if os.path.exists(root) and not os.path.isdir(root):
        raise UserError(f"the data folder {root} (from --data-dir, or $MM_DATA) is a file; point it at a folder")
    return root


# ----------------------------------------------------------------------------------------------
# Downloading

def file_digest(path, algo):
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(path, md5=None, sha256=None, size=None, bad=None):
    """Raise UserError if `path` has the wrong size or digest; the bad file is moved to `bad` (PATH.bad)."""
    problem = None
    if size is not None and os.path.getsize(path) != size:
        problem = f"size {os.path.getsize(path):,} bytes, expected {size:,}"
    for algo, want in (("md5", md5), ("sha256", sha256)):
        if problem is None and want:
            got = file_digest(path, algo)
            # A prefix is accepted where only a prefix of the digest is published (pytorch-fid's weights).
            if not got.startswith(want):
                problem = f"{algo} {got}, expected {want}"
    if problem:
        bad = bad or path + ".bad"
        os.replace(path, bad)  # kept aside for inspection, never silently reused
        raise UserError(f"{path} failed verification ({problem}); it was moved to {bad} - delete that and run "
                        f"again to re-download (for a stand-in or a file you trust, move it back and set "
                        f"MM_TRUST_LOCAL=1)")


def download(url, dest, md5=None, sha256=None, size=None, quiet=False):
    """Fetch `url` to `dest` (streamed to dest.part, verified, renamed). A verified file in place is kept."""
    if os.path.exists(dest):
        if os.environ.get("MM_TRUST_LOCAL") == "1":  # an explicit opt-out, announced every time
            print(f"note: using {dest} without checking its checksum (MM_TRUST_LOCAL=1)", file=sys.stderr)
        else:
            verify(dest, md5, sha256, size)
        return dest
    folder = os.path.dirname(dest) or "."
    if not os.path.isdir(folder):  # said aloud: a typo in --data-dir should not pass unnoticed before a big download
        print(f"note: {folder} did not exist; creating it for the download", file=sys.stderr)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the data folder {folder} ({e.strerror or e}); "
                        f"choose another --data-dir") from None
    part = dest + ".part"
    by_hand = f"download {url} by hand and put it at {dest}"
    try:
        with requests.get(url, stream=True, timeout=30) as r:
            if r.status_code != 200:
                raise UserError(f"server answered HTTP {r.status_code} for {url}; try later or {by_hand}")
            total = int(r.headers.get("Content-Length") or 0) or size
            done, t0, last = 0, time.time(), 0.0
            with open(part, "wb") as f:
                for chunk in r.iter_content(chunk_size=1 << 20):
                    f.write(chunk)
                    done += len(chunk)
                    now = time.time()
                    if not quiet and (now - last > 1 or done == total):
                        last = now
                        rate = done / max(now - t0, 1e-9)
                        eta = fmt_time((total - done) / rate) if total else "?"
                        pct = f"{100 * done / total:5.1f}%" if total else ""
                        print(f"\rdownloading {os.path.basename(dest)} {pct} {done / 1e6:,.1f} MB "
                              f"{rate / 1e6:.1f} MB/s eta {eta}", end="", file=sys.stderr, flush=True)
        if not quiet:
            print(file=sys.stderr)
    except requests.RequestException as e:
        if os.path.exists(part):
            os.remove(part)
        kind = "the transfer broke off" if isinstance(e, requests.exceptions.ChunkedEncodingError) \
            else "no network?"
        raise UserError(f"could not download {url} ({kind}: {type(e).__name__}); {by_hand}") from None
    if total and done != total:
        os.remove(part)
        raise UserError(f"download of {url} was truncated ({done:,} of {total:,} bytes); run again or {by_hand}")
    verify(part, md5, sha256, size, bad=dest + ".bad")  # raises before the real name is ever written
    os.replace(part, dest)  # atomic: dest is either absent or complete
    return dest


# ----------------------------------------------------------------------------------------------
# AddNIST: three MNIST digits stacked as channels, label = r + g + b - 1 (20 classes)

def addnist_dir(data_dir=None):
    """Directory holding the six AddNIST .npy files, downloading and unpacking the zip if needed."""
    root = data_root(data_dir)
    for d in (root, os.path.join(root, "addnist")):  # a folder of the six files is taken as is
        if all(os.path.exists(os.path.join(d, f)) for f in ADDNIST_FILES):
            return d
    if os.path.isdir(root) and any(os.path.exists(os.path.join(root, f)) for f in ADDNIST_FILES):
        missing = [f for f in ADDNIST_FILES if not os.path.exists(os.path.join(root, f))]
        raise UserError(f"{root} holds some AddNIST files but not {', '.join(missing)}; add them or "
                        f"point --data-dir at an empty folder to download")
    zpath = download(ADDNIST_URL, os.path.join(root, "addnist.zip"))
    out = os.path.join(root, "addnist")
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        with zipfile.ZipFile(zpath) as z:
            extract_addnist(z, tmp)
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        os.replace(zpath, zpath + ".bad")
        raise UserError(f"{zpath} is not a readable zip ({e}); it was moved to {zpath}.bad - "
                        f"delete it and run again") from None
    missing = [f for f in ADDNIST_FILES if not os.path.exists(os.path.join(tmp, f))]
    if missing:
        shutil.rmtree(tmp)
        raise UserError(f"{zpath} does not contain {', '.join(missing)}; is it the AddNIST article zip?")
    os.replace(tmp, out)
    os.remove(zpath)  # the unpacked folder is the cache from now on
    return out


def extract_addnist(z, dest):
    """Copy the six .npy files and metadata out of the zip, wherever they sit (nested zips included)."""
    wanted = set(ADDNIST_FILES) | {"metadata"}
    for info in z.infolist():
        name = os.path.basename(info.filename)
        if name in wanted:
            with z.open(info) as src, open(os.path.join(dest, name), "wb") as dst:
                shutil.copyfileobj(src, dst)  # zip's CRC check raises BadZipFile on corruption
        elif name.lower().endswith(".zip"):
            with zipfile.ZipFile(io.BytesIO(z.read(info))) as inner:
                extract_addnist(inner, dest)


def load_addnist(data_dir, split):
    """(x float32 (N,3,28,28) normalised digits, y int64 (N,) in 0..19) for one split."""
    d = addnist_dir(data_dir)
    paths = [os.path.join(d, f"{split}_{k}.npy") for k in ("x", "y")]
    try:
        x, y = (np.load(p, allow_pickle=False) for p in paths)
    except ValueError as e:
        raise UserError(f"cannot read {paths[0]} / {paths[1]} as .npy arrays ({e}); re-download them") from None
    if x.dtype != np.float32 or x.ndim != 4 or x.shape[1:] != (3, 28, 28):
        raise UserError(f"{paths[0]} holds {x.dtype} {x.shape}, expected float32 (N, 3, 28, 28)")
    if y.dtype != np.int64 or y.shape != (len(x),):
        raise UserError(f"{paths[1]} holds {y.dtype} {y.shape}, expected int64 ({len(x)},)")
    if len(y) and (y.min() < 0 or y.max() >= 20):
        raise UserError(f"{paths[1]} has labels outside 0..19")
    return x, y


# ----------------------------------------------------------------------------------------------
# CIFAR-100 and CIFAR-10: the python pickles inside the official tar.gz

def load_cifar(name, data_dir, split):
    """(x uint8 (N,3,32,32), y int64 (N,) labels 0..classes-1) of CIFAR-100 or CIFAR-10, split 'train' or 'test'."""
    spec = CIFAR[name]
    path = download(spec["url"], os.path.join(data_root(data_dir), os.path.basename(spec["url"])),
                    md5=spec["md5"], size=spec["size"])
    members = [f"{spec['folder']}/{m}" for m in spec[split]]
    try:
        with tarfile.open(path, "r:gz") as tar:
            missing = sorted(set(members) - set(tar.getnames()))
            if missing:
                raise UserError(f"{path} has no {missing[0]}; is it the {name} python archive?")
            batches = [pickle.load(tar.extractfile(m), encoding="bytes") for m in members]
    except (tarfile.TarError, EOFError, OSError, pickle.UnpicklingError) as e:
        raise UserError(f"{path} is truncated or corrupt ({type(e).__name__}); delete it and run again") from None
    try:
        x = np.concatenate([np.asarray(d[b"data"]) for d in batches])
        y = np.concatenate([np.asarray(d[spec["labels"]], dtype=np.int64) for d in batches])
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{members[0]} in {path} lacks b'data' / {spec['labels']}") from None
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072 or y.shape != (len(x),):
        raise UserError(f"{members[0]} in {path} holds data {x.dtype} {x.shape}, expected uint8 (N, 3072)")
    if len(y) and (y.min() < 0 or y.max() >= spec["classes"]):
        raise UserError(f"{members[0]} in {path} has labels outside 0..{spec['classes'] - 1}")
    return x.reshape(-1, 3, 32, 32), y  # rows are channel-major: 1024 red, 1024 green, 1024 blue


# ----------------------------------------------------------------------------------------------
# The two doors: training splits, and the test split for evaluation only

LOADERS = {"addnist": load_addnist, **{name: functools.partial(load_cifar, name) for name in CIFAR}}
TRAIN_SPLITS = {"addnist": ("train", "valid"), "cifar100": ("train",), "cifar10": ("train",)}


def load_split(name, split, data_dir=None):
    """A training-side split. The test split is refused here: evaluation code uses load_test()."""
    if split not in TRAIN_SPLITS[name]:
        raise UserError(f"{name} split {split!r} is not a training split (choose from "
                        f"{', '.join(TRAIN_SPLITS[name])}); the test split is reached only through load_test()")
    return LOADERS[name](data_dir, split)


def load_test(name, data_dir=None):
    """The held-out test split, for evaluation only."""
    return LOADERS[name](data_dir, "test")


def main():
    p = OneLineParser(description="Download and verify a dataset into the cache.")
    p.add_argument("dataset", choices=sorted(LOADERS), help="which dataset to fetch")
    p.add_argument("--data-dir", default=None, help="cache root (default $MM_DATA or ./data)")
    a = p.parse_args()
    try:
        for split in TRAIN_SPLITS[a.dataset]:
            x, y = load_split(a.dataset, split, a.data_dir)
            print(f"{a.dataset} {split}: x {x.dtype} {x.shape}, y {y.dtype} {y.shape}")
        x, y = load_test(a.dataset, a.data_dir)
        print(f"{a.dataset} test: x {x.dtype} {x.shape}, y {y.dtype} {y.shape}")
    except UserError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
