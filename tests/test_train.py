"""Datasets, msfast train / eval / predict, resume, and two-process DistributedDataParallel."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT

from msfast import cli
from msfast import data as D
from msfast import train as T

# A tiny model and a short run: what the tests need, in a few seconds on two cores.
TINY = dict(image_size=16, width=4, depth=18, scales=(1.0, 0.5), batch_size=32, device="cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


def test_digits_split():
    tr, te = D.load("digits", 20)
    assert tr.images.dtype == torch.uint8 and tr.images.shape[1:] == (20, 20, 1)
    assert len(tr) + len(te) == 1797 and 350 <= len(te) <= 370
    assert tr.classes == [str(i) for i in range(10)]
    assert set(te.labels.tolist()) == set(range(10))  # stratified: every class is tested
    assert tr.images.max() > 200 and tr.images.float().std() > 20
    tr2, te2 = D.load("digits", 20)
    assert torch.equal(te.images, te2.images) and torch.equal(te.labels, te2.labels)  # a fixed split
    x, y = te.batch([0, 5, 7])
    assert x.shape == (3, 1, 20, 20) and x.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y, te.labels[[0, 5, 7]])
    assert D.load("digits", 30)[1].images.shape[1:] == (30, 30, 1)  # same split, another size
    assert torch.equal(D.load("digits", 30)[1].labels, te.labels)


def _write_images(root, classes, per_class, gen, size=(11, 9)):
    from PIL import Image

    for c in classes:
        os.makedirs(root / c, exist_ok=True)
        for i in range(per_class):
            a = torch.randint(0, 256, (size[1], size[0], 3), generator=gen, dtype=torch.uint8).numpy()
            Image.fromarray(a).save(root / c / f"{i}.png")
    (root / classes[0] / "notes.txt").write_text("not an image")


def test_folder_dataset(tmp_path, gen):
    _write_images(tmp_path, ["cat", "dog", "eel"], 5, gen)
    tr, te = D.load(f"folder:{tmp_path}", 8)
    assert tr.classes == ["cat", "dog", "eel"]
    assert len(tr) == 12 and len(te) == 3 and sorted(te.labels.tolist()) == [0, 1, 2]
    assert tr.images.shape == (12, 8, 8, 3) and tr.images.dtype == torch.uint8
    assert tr.images.float().std() > 20


def test_folder_dataset_with_train_and_test(tmp_path, gen):
    _write_images(tmp_path / "train", ["a", "b"], 3, gen)
    _write_images(tmp_path / "test", ["a", "b"], 2, gen)
    tr, te = D.load(f"folder:{tmp_path}", 6)
    assert (len(tr), len(te)) == (6, 4) and tr.classes == te.classes == ["a", "b"]


def test_dataset_errors(tmp_path, gen):
    with pytest.raises(ValueError, match="--data: unknown dataset 'mnist'"):
        D.load("mnist", 16)
    with pytest.raises(ValueError, match="--data: folder .* does not exist"):
        D.load(f"folder:{tmp_path / 'missing'}", 16)
    with pytest.raises(ValueError, match="--data: .* one sub-folder per class"):
        D.load(f"folder:{tmp_path}", 16)
    os.makedirs(tmp_path / "x")
    os.makedirs(tmp_path / "y")
    with pytest.raises(ValueError, match="--data: no images"):
        D.load(f"folder:{tmp_path}", 16)
    with pytest.raises(ValueError, match="--image-size"):
        D.load("digits", 0)
    (tmp_path / "x" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="bad.png"):
        D.load(f"folder:{tmp_path}", 16)


@pytest.mark.parametrize("kw,match", [
    (dict(depth=20), "--depth"),
    (dict(data="cifar"), "--data"),
    (dict(scales="1,x"), "--scales"),
    (dict(scales=(1, -0.5)), "--scales"),
    (dict(optimizer="lbfgs"), "--optimizer"),
    (dict(epochs=0), "--epochs"),
    (dict(label_smoothing=1.0), "--label-smoothing"),
    (dict(device="tpu"), "--device"),
])
def test_train_config_errors(kw, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        T.train(T.TrainConfig(**{**TINY, **kw, "out": str(tmp_path)}))


def test_train_resume_eval_predict(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--image-size", "16", "--width", "4", "--scales", "1,0.5", "--batch-size", "32",
            "--subset", "512", "--lr", "0.05", "--device", "cpu", "--seed", "3", "--out", str(out)]
    assert cli.main([*args, "--epochs", "2"]) == 0
    captured = capsys.readouterr()
    assert "epoch 2/2" in captured.out and "[####" in captured.err  # the log, and the progress bar
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["test_accuracy"] <= 1 and len(metrics["history"]) == 2
    h = metrics["history"]
    assert h[1]["train_loss"] < h[0]["train_loss"]
    assert h[1]["test_accuracy"] > 0.3  # well above chance (0.1) after 32 small steps
    assert metrics["test_accuracy"] == h[-1]["test_accuracy"]
    assert (out / "curves.png").stat().st_size > 1000
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert {"model", "model_args", "config", "optimizer", "epoch", "history", "classes"} <= set(ckpt)
    assert ckpt["epoch"] == 2 and ckpt["config"]["scales"] == (1.0, 0.5) and ckpt["optimizer"]["state"]

    # resume: the saved options, two more epochs on top of the first two
    assert cli.main(["train", "--resume", "--epochs", "3", "--out", str(out)]) == 0
    assert "resuming" in capsys.readouterr().out
    resumed = json.loads((out / "metrics.json").read_text())
    assert len(resumed["history"]) == 3 and resumed["history"][:2] == h
    assert resumed["config"]["width"] == 4 and resumed["config"]["seed"] == 3

    # eval reproduces the final test accuracy; off-scale images still run
    assert cli.main(["eval", "--checkpoint", str(out / "checkpoint.pt"), "--json", "--device", "cpu"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["test_accuracy"] == pytest.approx(resumed["test_accuracy"], abs=1e-12) and ev["image_size"] == 16
    assert cli.main(["eval", "--checkpoint", str(out / "checkpoint.pt"), "--json", "--scale", "1.5",
                     "--backend", "torch"]) == 0
    ev15 = json.loads(capsys.readouterr().out)
    assert ev15["image_size"] == 24 and 0 <= ev15["test_accuracy"] <= 1

    # predict on PNGs of test images: the same top-1 as the model on the same bytes
    from PIL import Image

    _, te = D.load("digits", 16)
    paths = []
    for i in range(4):
        p = tmp_path / f"digit{i}.png"
        Image.fromarray(te.images[i, :, :, 0].numpy(), mode="L").save(p)
        paths.append(str(p))
    assert cli.main(["predict", "--checkpoint", str(out / "checkpoint.pt"), "--top-k", "3", "--json", *paths]) == 0
    pred = json.loads(capsys.readouterr().out)
    model, _ = T.load_checkpoint(str(out / "checkpoint.pt"))
    with torch.no_grad():
        expected = model(te.batch(range(4))[0]).argmax(1).tolist()
    assert [r["image"] for r in pred] == paths
    assert [r["top"][0]["class"] for r in pred] == [str(c) for c in expected]
    for r in pred:
        probs = [t["probability"] for t in r["top"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    assert cli.main(["predict", "--checkpoint", str(out / "checkpoint.pt"), paths[0]]) == 0
    assert capsys.readouterr().out.startswith(f"{paths[0]}: ")

    # a resumed run must keep the model's options
    assert cli.main(["train", "--resume", "--depth", "34", "--out", str(out)]) == 2
    assert "--depth 34 differs from the checkpoint's 18" in capsys.readouterr().err
    assert cli.main(["train", "--resume", "--optimizer", "adamw", "--out", str(out)]) == 2
    assert "--optimizer 'adamw' differs from the checkpoint's 'sgd'" in capsys.readouterr().err


def test_train_folder_adamw_bf16_options(tmp_path, gen):
    # the other options once: a folder of RGB images, AdamW, bfloat16 autocast, NCHW, one trunk
    # per scale, a constant learning rate, the torch backend
    _write_images(tmp_path / "data", ["a", "b", "c"], 6, gen)
    cfg = T.TrainConfig(**{**TINY, "data": f"folder:{tmp_path / 'data'}", "image_size": 12, "batch_size": 4,
                           "epochs": 2, "optimizer": "adamw", "bf16": True, "channels_last": False,
                           "per_scale": True, "schedule": "constant", "backend": "torch", "label_smoothing": 0.0,
                           "out": str(tmp_path / "run")})
    res = T.train(cfg, log=lambda s: None, progress=False)
    assert res["classes"] == ["a", "b", "c"] and len(res["history"]) == 2
    assert all(h["lr"] == T.LR_DEFAULTS["adamw"] for h in res["history"])
    model = res["model"]
    assert len(model.trunks) == 2 and model.backend == "torch"
    assert model.trunks[0].conv1.weight.shape[1] == 3  # RGB
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert isinstance(ckpt["optimizer"]["state"][0]["exp_avg"], torch.Tensor)  # AdamW's state
    assert ckpt["model_args"]["shared"] is False and len(ckpt["model_args"]["mean"]) == 3


def test_auto_threads(monkeypatch):
    n = torch.get_num_threads()  # 1, from the fixture
    torch.set_num_threads(2)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.1, 0.0, 0.0))
    assert T.auto_threads() == 2  # idle machine: torch's count
    monkeypatch.setattr(os, "getloadavg", lambda: (1.2, 0.0, 0.0))
    assert T.auto_threads() == 1  # one core busy elsewhere
    monkeypatch.setattr(os, "getloadavg", lambda: (7.0, 0.0, 0.0))
    assert T.auto_threads() == 1  # never fewer than one
    torch.set_num_threads(n)


def test_cli_errors(tmp_path, capsys):
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "none.pt")]) == 2
    assert "--checkpoint: no such file" in capsys.readouterr().err
    assert cli.main(["predict", "--checkpoint", str(tmp_path / "none.pt"), "x.png"]) == 2
    assert "--checkpoint: no such file" in capsys.readouterr().err
    assert cli.main(["train", "--resume", "--out", str(tmp_path)]) == 2
    assert "--resume: no checkpoint" in capsys.readouterr().err
    assert cli.main(["train", "--data", "imagenet", "--out", str(tmp_path)]) == 2
    assert "--data: unknown dataset 'imagenet'" in capsys.readouterr().err
    for bad in (["--depth", "20"], ["--scales", "1,zero"], ["--optimizer", "adam"]):
        with pytest.raises(SystemExit) as e:
            cli.main(["train", *bad])
        assert e.value.code == 2
        assert f"argument {bad[0]}" in capsys.readouterr().err


DDP_SCRIPT = """
import os, sys, torch
import msfast.train as T
from msfast import cli

out = sys.argv[1]
run = T.train

def train_and_dump(cfg, **kw):  # the CLI's call, plus each rank's parameters for the test
    res = run(cfg, **kw)
    rank = os.environ["RANK"]
    torch.save({k: v.detach() for k, v in res["model"].named_parameters()}, os.path.join(out, f"params{rank}.pt"))
    torch.save(dict(res["model"].named_buffers()), os.path.join(out, f"buffers{rank}.pt"))
    return res

T.train = train_and_dump
sys.exit(cli.main(["train", "--epochs", "3", "--image-size", "16", "--width", "4", "--scales", "1,0.5",
                   "--batch-size", "16", "--subset", "256", "--lr", "0.05", "--device", "cpu", "--out", out]))
"""


def test_two_processes_ddp(tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    out = tmp_path / "run"
    out.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    env.pop("MSFAST_FORCE_FALLBACK", None)
    # a session of its own: on a timeout the workers are killed with torchrun, not orphaned
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script), str(out)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail("two-process training timed out:\n" + stdout[-3000:] + stderr[-3000:])
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    p0, p1 = torch.load(out / "params0.pt"), torch.load(out / "params1.pt")
    assert p0.keys() == p1.keys() and len(p0) > 50
    start = T.MultiScaleResNet(10, depth=18, width=4, stem="small", scales=(1, 0.5), in_channels=1)
    moved = 0
    for k in p0:
        assert torch.equal(p0[k], p1[k]), k  # DDP keeps the replicas identical
        moved += p0[k].shape == start.state_dict()[k].shape and not torch.equal(p0[k], start.state_dict()[k])
    assert moved > 50  # and they did train
    b0, b1 = torch.load(out / "buffers0.pt"), torch.load(out / "buffers1.pt")
    assert all(torch.equal(b0[k], b1[k]) for k in b0)  # BatchNorm statistics: rank 0's everywhere
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    losses = [h["train_loss"] for h in metrics["history"]]
    assert len(losses) == 3 and losses[2] < losses[1] < losses[0]
    # logging on rank 0 only: every epoch line once
    assert stdout.count("epoch 1/3  lr") == 1 and stdout.count("epoch 3/3  lr") == 1
    assert "2 process(es)" in stdout
    assert sorted(os.listdir(out)) == ["buffers0.pt", "buffers1.pt", "checkpoint.pt", "curves.png", "metrics.json",
                                       "params0.pt", "params1.pt"]
