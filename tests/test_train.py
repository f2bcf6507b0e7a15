"""The training script, ``cnnbook/train.py``, run as a reader runs it: in subprocesses,
alone and under ``torchrun``.

The runs are tiny (the book's digits ResNet on 16x16 crops of photographs, a few steps) so
that the module takes about a minute on two cores; what they check does not depend on the
size: a run killed by a signal under ``torchrun --max-restarts`` finishes with exit status
0 and the weights of an uninterrupted run, with augmentations drawn at random in every
process; mixed precision on the CPU; the output folder; ``--test-only``; ``--help``; and a
one-line error, never a traceback, for every bad argument.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cnnbook import train
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
# The checkout's module, whichever one is installed; one thread per process on small CPUs.
ENVIRONMENT = dict(
    os.environ,
    OMP_NUM_THREADS="1",
    PYTHONPATH=os.pathsep.join([str(ROOT / "notebooks"), os.environ.get("PYTHONPATH", "")]),
)
TINY = ["--model", "digits_resnet", "--device", "cpu", "--image-size", "16"]


def run(args: list[str], cwd: Path, processes: int = 0) -> subprocess.CompletedProcess:
    """``python -m cnnbook.train ARGS`` alone (``processes=0``) or under
    ``torchrun --standalone --nproc-per-node=PROCESSES --max-restarts=1``."""
    launcher = []
    if processes:
        launcher = ["-m", "torch.distributed.run", "--standalone",
                    f"--nproc-per-node={processes}", "--max-restarts=1"]
    command = [sys.executable, *launcher, "-m", "cnnbook.train", *args]
    return subprocess.run(command, cwd=cwd, env=ENVIRONMENT, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ImageFolder with train/ and val/: two classes, crops of two photographs shipped
    inside scikit-learn (a Chinese temple) and scikit-image (a cat). Nothing is downloaded."""
    from skimage import data
    from sklearn.datasets import load_sample_image

    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for name, photo in (("temple", load_sample_image("china.jpg")), ("cat", data.chelsea())):
        small = np.asarray(Image.fromarray(photo).reduce(4))
        for split, count in (("train", 32), ("val", 8)):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                top = rng.integers(0, small.shape[0] - 24)
                left = rng.integers(0, small.shape[1] - 24)
                crop = small[top:top + 24, left:left + 24]
                Image.fromarray(crop).save(root / split / name / f"{i}.png")
    return root


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_training(a: dict, b: dict) -> None:
    """Bitwise the same weights, buffers and momentum."""
    assert a["step"] == b["step"]
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    for key, state in a["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"],
                           b["optimizer"]["state"][key]["momentum_buffer"])


def test_killed_run_restarts_and_ends_as_uninterrupted(photos: Path, tmp_path: Path) -> None:
    """Both processes are killed (SIGKILL) at step 5, as when their machine fails;
    torchrun --max-restarts restarts them, they resume from the checkpoint of step 4 and
    end with the uninterrupted run's weights.
    The random crops and flips differ between the processes and must be the same after
    the resume; the killed run reads them with a data-loading worker, the other without.
    Mixed precision (--amp) with the book's SyncBatchNorm, on the CPU."""
    common = [*TINY, "--data", str(photos), "--batch-size", "16", "--epochs", "2",
              "--checkpoint-every", "2", "--sync-bn", "--amp", "--print-freq", "1"]
    full = run([*common, "--output-dir", "full"], tmp_path, processes=2)
    assert full.returncode == 0, full.stderr[-3000:]
    killed = run([*common, "--output-dir", "killed", "--kill-at-step", "5", "--workers", "1"],
                 tmp_path, processes=2)
    assert killed.returncode == 0, killed.stderr[-3000:]
    assert "step 5: rank 1 kills itself (SIGKILL)" in killed.stderr
    assert "step 5: rank 0 kills itself (SIGKILL)" in killed.stderr
    assert "exitcode: -9" in killed.stderr                   # torchrun saw the signal
    assert "resumed from killed/last.pt at step 4" in killed.stdout
    assert_same_training(load(tmp_path / "full" / "last.pt"),
                         load(tmp_path / "killed" / "last.pt"))
    assert_same_training(load(tmp_path / "full" / "best.pt"),
                         load(tmp_path / "killed" / "best.pt"))
    # The epoch summaries add up the steps before and after the restart.
    full_metrics, killed_metrics = ((tmp_path / name / "metrics.jsonl").read_text()
                                    for name in ("full", "killed"))
    assert full_metrics == killed_metrics and len(full_metrics.splitlines()) == 2
    # Per-process randomness: each rank saved its own random state, and they differ.
    ranks = load(tmp_path / "full" / "last.pt")["ranks"]
    assert ranks[0]["rng"]["torch"] != ranks[1]["rng"]["torch"]


def test_mixed_precision_output_folder_and_test_only(photos: Path, tmp_path: Path) -> None:
    """--amp (bfloat16 autocast on the CPU) with the other options on: the run writes its
    files and logs, computes something else than float32 does, and --test-only
    evaluates its best checkpoint to the same numbers as the run did."""
    options = [*TINY, "--data", str(photos), "--batch-size", "16", "--epochs", "2",
               "--warmup-steps", "2", "--label-smoothing", "0.1", "--no-bias-decay",
               "--accumulate", "2", "--clip-grad-norm", "5", "--channels-last",
               "--print-freq", "1"]
    mixed = run([*options, "--amp", "--output-dir", "amp"], tmp_path)
    assert mixed.returncode == 0, mixed.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "amp").iterdir()) == [
        "best.pt", "last.pt", "metrics.jsonl"]
    lines = [line for line in mixed.stdout.splitlines() if "images/s" in line]
    assert len(lines) == 8 and all(" lr " in line and " data " in line for line in lines)
    metrics = [json.loads(line) for line in (tmp_path / "amp" / "metrics.jsonl").open()]
    assert [m["step"] for m in metrics] == [4, 8]
    for m in metrics:
        assert 0 <= m["test_top1"] <= m["test_top5"] == 1.0    # two classes: top-5 is all
        assert np.isfinite(m["train_loss"]) and np.isfinite(m["test_loss"])
    single = run([*options, "--output-dir", "float32"], tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    # The first step starts from the same weights: its losses differ by bfloat16's
    # rounding only (8 bits of mantissa, about 0.4 %).
    first = [float(done.stdout.split(" loss ")[1].split()[0]) for done in (mixed, single)]
    assert first[0] != first[1] and abs(first[0] - first[1]) < 0.02 * first[1], first

    best = tmp_path / "amp" / "best.pt"
    evaluated = run([*options, "--test-only", str(best)], tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    result = json.loads(evaluated.stdout.splitlines()[-1])
    at_best = max(metrics, key=lambda m: m["test_top1"])
    assert result["step"] == load(best)["step"] == at_best["step"]
    assert result["test_top1"] == pytest.approx(at_best["test_top1"])


def test_help_shows_every_default_and_hides_test_options() -> None:
    text = train.parser().format_help()
    for action in train.parser()._actions:
        if action.help == argparse.SUPPRESS:
            assert action.option_strings[0] not in text
        elif action.option_strings[0] != "-h":
            assert f"(default: {action.default})" in " ".join(text.split()), action.dest
    assert "--kill-at-step" not in text and "--record" not in text


BAD_ARGUMENTS = [
    (["--momentum", "-5"], "--momentum must be in [0, 1), got -5.0"),
    (["--lr", "0"], "--lr must be a positive number, got 0.0"),
    (["--lr", "nan"], "--lr must be a positive number, got nan"),
    (["--weight-decay", "-1"], "--weight-decay must be 0 or more, got -1.0"),
    (["--label-smoothing", "1"], "--label-smoothing must be in [0, 1), got 1.0"),
    (["--clip-grad-norm", "0"], "--clip-grad-norm must be a positive number, got 0.0"),
    (["--epochs", "0"], "--epochs must be a positive integer, got 0"),
    (["--image-size", "-8"], "--image-size must be a positive integer, got -8"),
    (["--accumulate", "0"], "--accumulate must be a positive integer, got 0"),
    (["--print-freq", "0"], "--print-freq must be a positive integer, got 0"),
    (["--checkpoint-every", "0"], "--checkpoint-every must be a positive integer"),
    (["--max-steps", "-1"], "--max-steps must be a positive integer, got -1"),
    (["--warmup-steps", "-1"], "--warmup-steps must be 0 or more, got -1"),
    (["--workers", "-1"], "--workers must be 0 or more, got -1"),
    (["--seed", "-1"], "--seed must be 0 or more, got -1"),
    (["--batch-size", "60", "--accumulate", "8"], "--batch-size 60 does not split"),
    (["--amp", "--float64"], "--amp computes in 16 bits: it excludes --float64"),
    (["--model", "resnet5"], "did you mean 'resnet50'"),
    (["--data", "no/such/folder"], "--data 'no/such/folder': no such folder"),
    (["--test-only", "no/such.pt"], "--test-only 'no/such.pt': no such file"),
    (["--data", "no/such.pt"], "--data 'no/such.pt': no such file"),
    (["--output-dir", __file__], "is not a folder"),
    (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    (["--epochs", "two"], "argument --epochs: invalid int value: 'two'"),
]
if not torch.cuda.is_available():
    BAD_ARGUMENTS.append((["--device", "cuda"], "--device cuda, but PyTorch sees no CUDA"))


@pytest.mark.parametrize("arguments, message", BAD_ARGUMENTS, ids=lambda a: " ".join(a)
                         if isinstance(a, list) else "")
def test_bad_argument_gets_one_line(arguments: list[str], message: str,
                                    capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_status:
        train.parse_args(arguments, world_size=1)
    assert exit_status.value.code == 2
    error = capsys.readouterr().err.splitlines()
    assert "error: " in error[-1] and message in error[-1]


def test_bad_arguments_on_the_command_line(photos: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture) -> None:
    """As the reader sees them: exit status 2, the usage and one line, no traceback; also
    for what only shows on reading the data or a checkpoint of another run (these run
    in this process, through the script's main())."""
    done = run(["--momentum", "-5"], tmp_path)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.splitlines()[-1].endswith("--momentum must be in [0, 1), got -5.0")
    folder = [*TINY, "--data", str(photos), "--batch-size", "16", "--epochs", "3"]
    out = ["--output-dir", str(tmp_path / "out")]
    train.main([*folder, *out, "--max-steps", "1"])
    for arguments, message in (
        ([*folder, *out, "--lr", "0.05"], "belongs to another run: --lr 0.05 (checkpoint: 0.1)"),
        ([*folder, "--batch-size", "128"], "--batch-size 128 is larger than the training "
         "set (64 images)"),
        ([*folder, "--warmup-steps", "12"], "--warmup-steps 12 leaves no step of the 12 for "
         "the cosine"),
        ([*folder, "--test-only", str(tmp_path / "out" / "last.pt"), "--model", "resnet50"],
         "holds no weights of --model resnet50"),
    ):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_status:
            train.main(arguments)
        assert exit_status.value.code == 2
        assert message in capsys.readouterr().err.splitlines()[-1]


def test_tensors_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``--data FILE.pt``: the tensors' own size, channels and classes; a file without the
    tensors gets one line."""
    generator = torch.Generator().manual_seed(0)
    tensors = {"x_train": torch.rand(32, 3, 12, 12, generator=generator),
               "y_train": torch.arange(32) % 3,
               "x_test": torch.rand(8, 3, 12, 12, generator=generator),
               "y_test": torch.arange(8) % 3}
    torch.save(tensors, tmp_path / "data.pt")
    args = train.parse_args(["--data", str(tmp_path / "data.pt")], world_size=1)
    assert args.image_size == 12
    train_set, test_set, classes, channels = train.load_data(args.data, 12, 0)
    assert (len(train_set), len(test_set), classes, channels) == (32, 8, 3, 3)
    train.main(["--data", str(tmp_path / "data.pt"), "--model", "photo_resnet",
                "--device", "cpu", "--batch-size", "16", "--epochs", "1",
                "--output-dir", str(tmp_path / "out")])
    summary = json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[-1])
    assert summary["step"] == 2
    torch.save({"x": tensors["x_train"]}, tmp_path / "wrong.pt")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_status:
        train.main(["--data", str(tmp_path / "wrong.pt"), "--device", "cpu"])
    assert exit_status.value.code == 2
    assert "expected a dict with the tensors x_train and y_train" in (
        capsys.readouterr().err.splitlines()[-1])
