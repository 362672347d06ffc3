"""``msfast train | eval | predict``: MultiScaleResNet on digits or a folder of images.

One process, or several under ``torchrun --nproc_per_node=K -m msfast train ...``:
DistributedDataParallel (gloo on CPU, nccl on CUDA), a DistributedSampler, and logging,
checkpoints and metrics on rank 0 only. ``--batch-size`` is per process.

Outputs in ``--out DIR``: ``checkpoint.pt`` (model, config, optimizer, epoch, history;
written after every epoch, ``--resume`` continues from it), ``metrics.json``
(``test_accuracy`` as a fraction, per-epoch ``history``) and ``curves.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import data as D
from .models import DEPTHS, MultiScaleResNet

__all__ = ["TrainConfig", "train", "evaluate", "load_checkpoint", "predict", "add_parsers"]

LR_DEFAULTS = {"sgd": 0.1, "adamw": 2e-3}
# the options that define the model, its data and its optimizer state: a resumed run keeps them
FIXED_ON_RESUME = ("data", "image_size", "depth", "width", "stem", "scales", "per_scale", "optimizer")


@dataclasses.dataclass
class TrainConfig:
    data: str = "digits"
    image_size: int = 32
    epochs: int = 6
    batch_size: int = 64
    optimizer: str = "sgd"
    lr: float | None = None  # None: LR_DEFAULTS[optimizer]
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    label_smoothing: float = 0.1
    scales: tuple = (1.0, 0.5, 0.25)
    depth: int = 18
    width: int = 16
    stem: str = "auto"  # "small" below 96 pixels, else "large"
    per_scale: bool = False
    channels_last: bool = True
    bf16: bool = False
    seed: int = 0
    device: str = "auto"
    backend: str = "msfast"
    out: str = "runs/train"
    resume: bool = False
    subset: int = 0  # train on the first N training images only (0: all); for quick trials

    def check(self) -> TrainConfig:
        def bad(opt, msg):
            raise ValueError(f"msfast: --{opt}: {msg}")

        for opt in ("epochs", "batch_size", "image_size", "width"):
            v = getattr(self, opt)
            if not isinstance(v, int) or v < 1:
                bad(opt.replace("_", "-"), f"must be a positive int, got {v!r}")
        if self.depth not in DEPTHS:
            bad("depth", f"must be one of {sorted(DEPTHS)}, got {self.depth!r}")
        if self.optimizer not in LR_DEFAULTS:
            bad("optimizer", f"must be one of {sorted(LR_DEFAULTS)}, got {self.optimizer!r}")
        if self.schedule not in ("cosine", "constant"):
            bad("schedule", f"must be 'cosine' or 'constant', got {self.schedule!r}")
        if self.stem not in ("auto", "small", "large"):
            bad("stem", f"must be 'auto', 'small' or 'large', got {self.stem!r}")
        if self.backend not in ("msfast", "torch"):
            bad("backend", f"must be 'msfast' or 'torch', got {self.backend!r}")
        if self.lr is not None and not self.lr > 0:
            bad("lr", f"must be positive, got {self.lr!r}")
        if not 0 <= self.label_smoothing < 1:
            bad("label-smoothing", f"must be in [0, 1), got {self.label_smoothing!r}")
        if self.weight_decay < 0:
            bad("weight-decay", f"must be >= 0, got {self.weight_decay!r}")
        if self.subset < 0:
            bad("subset", f"must be >= 0, got {self.subset!r}")
        self.scales = tuple(parse_scales(self.scales))
        if self.data != "digits" and not str(self.data).startswith("folder:"):
            bad("data", f"unknown dataset {self.data!r}; use 'digits' or 'folder:PATH'")
        return self

    @property
    def base_lr(self) -> float:
        return self.lr if self.lr is not None else LR_DEFAULTS[self.optimizer]

    @property
    def stem_kind(self) -> str:
        return self.stem if self.stem != "auto" else ("small" if self.image_size < 96 else "large")


def parse_scales(value) -> list[float]:
    """``"1,0.5,0.25"`` or a sequence of numbers -> positive finite floats."""
    items = value.split(",") if isinstance(value, str) else list(value)
    try:
        scales = [float(s) for s in items]
    except (TypeError, ValueError):
        raise ValueError(f"msfast: --scales must be comma-separated positive numbers, got {value!r}") from None
    if not scales or any(not math.isfinite(s) or s <= 0 for s in scales):
        raise ValueError(f"msfast: --scales must be comma-separated positive numbers, got {value!r}")
    return scales


# -- processes and devices -----------------------------------------------------------------

@dataclasses.dataclass
class Dist:
    rank: int = 0
    world: int = 1
    owned: bool = False  # we initialized the process group, so we tear it down

    @property
    def main(self) -> bool:
        return self.rank == 0


def _dist_start(device: torch.device) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size())
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), owned=True)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"msfast: --device: {e}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"msfast: --device {name!r} but no CUDA device is available")
        if dev.index is None:  # one GPU per process under torchrun
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return dev


def auto_threads() -> int:
    """torch's thread count, cut to the cores that the 1-minute load average leaves idle (at
    least one). OpenMP threads that share cores kept busy by other processes wait on each
    other at every operator: on this project's 2-core machine, with both cores busy
    elsewhere, a training step took 8.5 s with two threads and 0.26 s with one."""
    n = torch.get_num_threads()
    try:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or n
        idle = cores - os.getloadavg()[0]
    except OSError:  # no load average on this platform
        return n
    return max(1, min(n, round(idle)))


def _sum_all(values: list, d: Dist, device) -> list:
    """Sums float values over the processes."""
    if d.world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


# -- progress and logging ------------------------------------------------------------------

class Progress:
    """A one-line progress bar on stderr, redrawn in place on a terminal, printed once
    (when done) otherwise, so that logs stay readable."""

    def __init__(self, total: int, desc: str, enabled: bool = True, stream=None):
        self.total, self.desc, self.enabled = total, desc, enabled
        self.stream = stream or sys.stderr
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.n, self.t0, self.last, self.post = 0, time.perf_counter(), 0.0, ""

    def update(self, n: int = 1, **post) -> None:
        self.n += n
        self.post = "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in post.items())
        now = time.perf_counter()
        if self.tty and (now - self.last > 0.1 or self.n == self.total):
            self.last = now
            self.stream.write("\r" + self.line())
            self.stream.flush()

    def line(self) -> str:
        frac = self.n / self.total if self.total else 1.0
        bar = "#" * int(24 * frac) + "." * (24 - int(24 * frac))
        el = time.perf_counter() - self.t0
        rate = self.n / el if el > 0 else 0.0
        eta = (self.total - self.n) / rate if rate > 0 else 0.0
        return f"{self.desc} [{bar}] {self.n}/{self.total} {el:.0f}s<{eta:.0f}s {rate:.1f} it/s  {self.post}"

    def close(self) -> None:
        if self.enabled:
            self.stream.write(("\r" + self.line() + "\n") if self.tty else self.line() + "\n")
            self.stream.flush()


# -- model and checkpoints ----------------------------------------------------------------

def _model_args(cfg: TrainConfig, train_set: D.ImageData) -> dict:
    mean, std = train_set.mean_std()
    return dict(num_classes=len(train_set.classes), depth=cfg.depth, width=cfg.width, stem=cfg.stem_kind,
                scales=list(cfg.scales), in_channels=train_set.channels, shared=not cfg.per_scale, mean=mean, std=std,
                backend=cfg.backend)


def _save(obj, path: str) -> None:
    tmp = path + ".tmp"  # write then rename: a crash mid-write never leaves a truncated file
    if path.endswith(".json"):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
    else:
        torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str, device="cpu", backend: str | None = None):
    """(model in eval mode, checkpoint dict) from a ``checkpoint.pt``."""
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(f"msfast: --checkpoint: no such file {path!r}")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        raise ValueError(f"msfast: --checkpoint: {path!r} is not an msfast training checkpoint")
    args = dict(ckpt["model_args"])
    if backend is not None:
        args["backend"] = backend
    model = MultiScaleResNet(**args)
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt


# -- training -----------------------------------------------------------------------------

def _lr_at(cfg: TrainConfig, step: int, total: int) -> float:
    # stateless, so that a resumed run continues the same curve
    if cfg.schedule == "constant":
        return cfg.base_lr
    return cfg.base_lr * 0.5 * (1 + math.cos(math.pi * step / max(total, 1)))


def _make_optimizer(cfg: TrainConfig, model) -> torch.optim.Optimizer:
    # no weight decay on norms and biases (the usual choice; decaying them only hurts)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    rest = [p for n, p in model.named_parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.base_lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=cfg.base_lr)


@torch.no_grad()
def evaluate(model, data: D.ImageData, batch_size: int = 256, device="cpu", channels_last: bool = True,
             bf16: bool = False, d: Dist | None = None) -> dict:
    """Cross-entropy and accuracy on ``data``; split over the processes when ``d`` has several."""
    d = d or Dist()
    device = torch.device(device)
    was_training = model.training
    model.eval()
    idx = torch.arange(d.rank, len(data), d.world)  # disjoint shards, no padding: exact totals
    loss_sum = correct = 0.0
    for b in range(0, len(idx), batch_size):
        x, y = data.batch(idx[b:b + batch_size], device, channels_last)
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
    model.train(was_training)
    loss_sum, correct, n = _sum_all([loss_sum, correct, float(len(idx))], d, device)
    return {"loss": loss_sum / max(n, 1), "accuracy": correct / max(n, 1), "correct": int(correct), "n": int(n)}


def train(cfg: TrainConfig, log: Callable[[str], None] = print, progress: bool = True) -> dict:
    """Trains (or resumes) per ``cfg``; returns the metrics (and the model, under ``"model"``)."""
    t_start = time.perf_counter()
    cfg.check()
    device = resolve_device(cfg.device)
    d = _dist_start(device)
    try:
        return _train(cfg, device, d, log if d.main else (lambda s: None), progress and d.main, t_start)
    finally:
        if d.owned:
            dist.destroy_process_group()


def _train(cfg, device, d: Dist, log, progress, t_start) -> dict:
    ckpt_path = os.path.join(cfg.out, "checkpoint.pt")
    ckpt = None
    if cfg.resume:
        if not os.path.isfile(ckpt_path):
            raise FileNotFoundError(f"msfast: --resume: no checkpoint at {ckpt_path!r}")
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        saved = TrainConfig(**ckpt["config"]).check()
        for k in FIXED_ON_RESUME:  # a resumed run is the same model on the same data
            if getattr(cfg, k) != getattr(saved, k):
                raise ValueError(f"msfast: --{k.replace('_', '-')} {getattr(cfg, k)!r} differs from the checkpoint's "
                                 f"{getattr(saved, k)!r}; drop it to resume")
    train_set, test_set = D.load(cfg.data, cfg.image_size)
    if cfg.subset:
        train_set = D.ImageData(train_set.images[:cfg.subset], train_set.labels[:cfg.subset], train_set.classes)
    if len(train_set) < 2 * d.world:
        raise ValueError(f"msfast: --data: {len(train_set)} training images are too few for {d.world} processes")
    torch.manual_seed(cfg.seed)  # the same initial weights in every process
    margs = ckpt["model_args"] if ckpt else _model_args(cfg, train_set)
    margs = dict(margs, backend=cfg.backend)
    model = MultiScaleResNet(**margs).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = _make_optimizer(cfg, model)
    history, start_epoch = [], 0
    if ckpt:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        history, start_epoch = list(ckpt["history"]), int(ckpt["epoch"])
    net = model
    if d.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                        else None)
    sampler = torch.utils.data.DistributedSampler(range(len(train_set)), num_replicas=d.world, rank=d.rank,
                                                  shuffle=True, seed=cfg.seed, drop_last=False)
    # full batches only: a batch of one would break BatchNorm at the 1x1 maps of coarse levels
    steps = max(sampler.num_samples // cfg.batch_size, 1)
    total_steps = steps * cfg.epochs
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    n_params = sum(p.numel() for p in model.parameters())
    if start_epoch == 0:
        log(f"MultiScaleResNet-{cfg.depth} width {cfg.width} stem {cfg.stem_kind} scales {list(cfg.scales)} "
            f"({n_params / 1e6:.2f} M parameters), backend {cfg.backend}, {cfg.data} {cfg.image_size}px: "
            f"{len(train_set)} train / {len(test_set)} test images, {len(train_set.classes)} classes; "
            f"{d.world} process(es) on {device}, {torch.get_num_threads()} threads each")
    else:
        log(f"resuming {ckpt_path} after epoch {start_epoch}")
    if start_epoch >= cfg.epochs:
        log(f"nothing to do: the checkpoint has {start_epoch} epochs, --epochs is {cfg.epochs}")
    if d.main:
        os.makedirs(cfg.out, exist_ok=True)
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        sampler.set_epoch(epoch)
        order = torch.tensor(list(sampler))
        net.train()
        bar = Progress(steps, f"epoch {epoch + 1}/{cfg.epochs}", progress)
        loss_sum = correct = seen = 0.0
        for s in range(steps):
            lr = _lr_at(cfg, epoch * steps + s, total_steps)
            for g in optimizer.param_groups:
                g["lr"] = lr
            x, y = train_set.batch(order[s * cfg.batch_size:(s + 1) * cfg.batch_size], device, cfg.channels_last)
            with torch.autocast(device.type, torch.bfloat16, enabled=cfg.bf16):
                logits = net(x)
            loss = criterion(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
            bar.update(loss=loss_sum / seen, acc=correct / seen)
        bar.close()
        loss_sum, correct, seen = _sum_all([loss_sum, correct, seen], d, device)
        if d.world > 1:  # BatchNorm statistics of rank 0 everywhere: one model to test and save
            for buf in model.buffers():
                dist.broadcast(buf, 0)
        ev = evaluate(model, test_set, 256, device, cfg.channels_last, cfg.bf16, d)
        rec = {"epoch": epoch + 1, "lr": lr, "train_loss": loss_sum / seen, "train_accuracy": correct / seen,
               "test_loss": ev["loss"], "test_accuracy": ev["accuracy"], "seconds": time.perf_counter() - t0}
        history.append(rec)
        log(f"epoch {epoch + 1}/{cfg.epochs}  lr {lr:.4f}  train loss {rec['train_loss']:.4f} acc "
            f"{rec['train_accuracy']:.4f}  test loss {rec['test_loss']:.4f} acc {rec['test_accuracy']:.4f} "
            f"({ev['correct']}/{ev['n']})  {rec['seconds']:.1f}s")
        if d.main:
            _save({"model": model.state_dict(), "model_args": margs, "config": dataclasses.asdict(cfg),
                   "optimizer": optimizer.state_dict(), "epoch": epoch + 1, "history": history,
                   "classes": list(train_set.classes)}, ckpt_path)
    final = history[-1] if history else evaluate(model, test_set, 256, device, cfg.channels_last, cfg.bf16, d)
    metrics = {
        "test_accuracy": final.get("test_accuracy", final.get("accuracy")),
        "test_loss": final.get("test_loss", final.get("loss")),
        "epochs": len(history), "history": history, "config": dataclasses.asdict(cfg),
        "parameters": n_params, "classes": list(train_set.classes), "world_size": d.world, "device": str(device),
        "threads_per_process": torch.get_num_threads(), "torch": torch.__version__,
        "wall_seconds": time.perf_counter() - t_start,  # this invocation, data loading included
        "train_seconds": sum(h["seconds"] for h in history),  # all epochs, across resumes
    }
    if d.main:
        _save(metrics, os.path.join(cfg.out, "metrics.json"))
        png = os.path.join(cfg.out, "curves.png")
        made = plot_curves(history, png, f"MultiScaleResNet-{cfg.depth} scales {list(cfg.scales)} on {cfg.data}")
        log(f"wrote {ckpt_path}, {os.path.join(cfg.out, 'metrics.json')}" + (f" and {png}" if made else ""))
        log(f"test accuracy {metrics['test_accuracy']:.4f} after {len(history)} epochs, "
            f"{metrics['wall_seconds']:.1f}s wall")
    metrics["model"] = model
    return metrics


def plot_curves(history: list, path: str, title: str = "") -> bool:
    """Loss and accuracy per epoch (train and test) as a PNG; False without matplotlib."""
    if not history:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ep = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(ep, [h["train_loss"] for h in history], "o-", label="train (with label smoothing)")
    a.plot(ep, [h["test_loss"] for h in history], "o-", label="test")
    a.set_xlabel("epoch")
    a.set_ylabel("cross-entropy")
    a.legend()
    b.plot(ep, [h["train_accuracy"] for h in history], "o-", label="train")
    b.plot(ep, [h["test_accuracy"] for h in history], "o-", label="test")
    b.set_xlabel("epoch")
    b.set_ylabel("accuracy")
    b.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# -- prediction ---------------------------------------------------------------------------

@torch.no_grad()
def predict(model, ckpt: dict, paths: list, top_k: int = 3, device="cpu") -> list:
    """[(path, [(class name, probability), ...]), ...] for image files."""
    if top_k < 1:
        raise ValueError(f"msfast: --top-k must be >= 1, got {top_k!r}")
    if not paths:
        raise ValueError("msfast: give at least one IMAGE")
    size, channels = ckpt["config"]["image_size"], ckpt["model_args"]["in_channels"]
    x = torch.stack([D.load_image(p, size, channels) for p in paths]).to(device).permute(0, 3, 1, 2)
    probs = model(x).float().softmax(1)
    p, i = probs.topk(min(top_k, probs.shape[1]), dim=1)
    classes = ckpt["classes"]
    return [(path, [(classes[c], pr) for c, pr in zip(ii.tolist(), pp.tolist())]) for path, pp, ii in zip(paths, p, i)]


# -- command line -------------------------------------------------------------------------

def _scales_arg(s: str) -> list:
    try:
        return parse_scales(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).replace("msfast: --scales ", "")) from None


def _cmd_train(args) -> int:
    cli = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if getattr(args, f.name) is not None}
    if cli.get("resume"):  # the checkpoint's options, overridden by those given (train() checks them)
        path = os.path.join(cli.get("out", TrainConfig.out), "checkpoint.pt")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"msfast: --resume: no checkpoint at {path!r}")
        saved = torch.load(path, map_location="cpu", weights_only=True)["config"]
        cfg = TrainConfig(**{**saved, **cli})
    else:
        cfg = TrainConfig(**cli)
    # torchrun sets OMP_NUM_THREADS for its workers: leave that alone
    threads = args.threads or (None if "OMP_NUM_THREADS" in os.environ else auto_threads())
    if threads:
        torch.set_num_threads(threads)
    train(cfg)
    return 0


def _cmd_eval(args) -> int:
    device = resolve_device(args.device)
    model, ckpt = load_checkpoint(args.checkpoint, device, args.backend)
    cfg = ckpt["config"]
    if not args.scale > 0:
        raise ValueError(f"msfast: --scale must be positive, got {args.scale!r}")
    size = max(round(cfg["image_size"] * args.scale), 1)
    spec = args.data or cfg["data"]
    _, test_set = D.load(spec, size)
    if len(test_set.classes) != len(ckpt["classes"]):
        raise ValueError(f"msfast: --data {spec!r} has {len(test_set.classes)} classes, the model "
                         f"{len(ckpt['classes'])}")
    ev = evaluate(model, test_set, args.batch_size, device, cfg["channels_last"], cfg["bf16"])
    res = {"test_accuracy": ev["accuracy"], "test_loss": ev["loss"], "correct": ev["correct"], "n": ev["n"],
           "image_size": size, "scale": args.scale, "data": spec, "checkpoint": args.checkpoint}
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"{spec} test set at {size}x{size} (scale {args.scale:g}): accuracy {ev['accuracy']:.4f} "
              f"({ev['correct']}/{ev['n']}), cross-entropy {ev['loss']:.4f}")
    return 0


def _cmd_predict(args) -> int:
    device = resolve_device(args.device)
    model, ckpt = load_checkpoint(args.checkpoint, device, args.backend)
    out = predict(model, ckpt, args.images, args.top_k, device)
    if args.json:
        print(json.dumps([{"image": p, "top": [{"class": c, "probability": pr} for c, pr in top]} for p, top in out],
                         indent=2))
    else:
        for p, top in out:
            print(f"{p}: " + ", ".join(f"{c} ({pr:.3f})" for c, pr in top))
    return 0


def _errors_to_exit(fn):
    # bad input: one clear line on stderr and exit status 2, as argparse does, not a traceback
    def run(args):
        try:
            return fn(args)
        except (ValueError, FileNotFoundError) as e:
            print(f"msfast {args.command}: error: {e}", file=sys.stderr)
            return 2
    return run


def add_parsers(sub) -> None:
    d = TrainConfig()
    p = sub.add_parser("train", help="train MultiScaleResNet (torchrun --nproc_per_node=K -m msfast train: DDP)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    # defaults are None here so that --resume can tell what was given; TrainConfig holds them
    a("--data", help=f"'digits' (scikit-learn, embedded) or 'folder:PATH' (default {d.data})")
    a("--image-size", type=int, help=f"images are resized to this square size (default {d.image_size})")
    a("--epochs", type=int, help=f"default {d.epochs}")
    a("--batch-size", type=int, help=f"per process (default {d.batch_size})")
    a("--optimizer", choices=sorted(LR_DEFAULTS), help=f"SGD with Nesterov momentum or AdamW (default {d.optimizer})")
    a("--lr", type=float, help=f"peak learning rate (default {LR_DEFAULTS})")
    a("--momentum", type=float, help=f"SGD momentum (default {d.momentum})")
    a("--weight-decay", type=float, help=f"on weights, not on norms and biases (default {d.weight_decay})")
    a("--schedule", choices=["cosine", "constant"], help=f"learning-rate schedule per step (default {d.schedule})")
    a("--label-smoothing", type=float, help=f"default {d.label_smoothing}")
    a("--scales", type=_scales_arg, help=f"pyramid levels, e.g. 1,0.5,0.25 (default {','.join(map(str, d.scales))})")
    a("--depth", type=int, choices=sorted(DEPTHS), help=f"default {d.depth}")
    a("--width", type=int, help=f"channels of the first stage (default {d.width})")
    a("--stem", choices=["auto", "small", "large"], help="small: 3x3/1; large: 7x7/2 + max-pool; auto: small "
      "below 96 px")
    a("--per-scale", action="store_const", const=True, help="one trunk per scale (default: shared weights)")
    a("--channels-last", dest="channels_last", action="store_const", const=True, help="channels_last (default)")
    a("--no-channels-last", dest="channels_last", action="store_const", const=False, help="NCHW")
    a("--bf16", action="store_const", const=True, help="bfloat16 autocast")
    a("--seed", type=int, help=f"default {d.seed}")
    a("--device", help="auto (default), cpu, cuda, cuda:1")
    a("--backend", choices=["msfast", "torch"], help="msfast kernels or the pure-PyTorch path (default msfast)")
    a("--out", help=f"folder for checkpoint.pt, metrics.json, curves.png (default {d.out})")
    a("--resume", action="store_const", const=True, help="continue from OUT/checkpoint.pt (--epochs may extend it)")
    a("--subset", type=int, help="train on the first N training images only (quick trials)")
    a("--threads", type=int, default=0, help="torch.set_num_threads (default: the idle cores, see auto_threads; "
      "OMP_NUM_THREADS when set)")
    p.set_defaults(func=_errors_to_exit(_cmd_train))

    p = sub.add_parser("eval", help="test accuracy of a checkpoint")
    p.add_argument("--checkpoint", required=True, help="a checkpoint.pt written by msfast train")
    p.add_argument("--data", default=None, help="dataset (default: the checkpoint's)")
    p.add_argument("--scale", type=float, default=1.0, help="show the test images at this scale of the training "
                   "size, e.g. 0.75 or 1.5 (default 1)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--backend", choices=["msfast", "torch"], default=None, help="default: the checkpoint's")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_errors_to_exit(_cmd_eval))

    p = sub.add_parser("predict", help="top-k classes of image files")
    p.add_argument("--checkpoint", required=True, help="a checkpoint.pt written by msfast train")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--backend", choices=["msfast", "torch"], default=None, help="default: the checkpoint's")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_errors_to_exit(_cmd_predict))
