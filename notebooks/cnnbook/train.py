"""Train a network of the book on several processes with DistributedDataParallel.

``torchrun`` starts one copy of this script per process (one per GPU, or a few on a
CPU)::

    torchrun --standalone --nproc-per-node=2 --max-restarts=3 -m cnnbook.train \
        --model digits_resnet --output-dir runs/digits

Each process holds a replica of the network and trains it on its own share of
every batch; DistributedDataParallel (DDP) averages the gradients across the
processes during the backward pass, so that every replica takes the same optimiser
step. ``--sync-bn`` makes BatchNorm normalise with the statistics of the whole batch
rather than with those of each process's share. With ``--output-dir`` a run writes
a checkpoint every ``--checkpoint-every`` steps and at the end of every epoch, a
line of metrics per epoch, and the best checkpoint; started again with the same
command (by hand, or by ``torchrun --max-restarts`` after a process dies) it
resumes from its last checkpoint and ends with the weights of an uninterrupted run.
The appendix "Training on several processes" of The CNN Blocks Book explains every
part of this file; ``python -m cnnbook.train --help`` lists the options.

Hand-written, not generated (unlike ``cnnbook/__init__.py``): edit it directly.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import difflib
import gc
import inspect
import json
import math
import os
import random
import signal
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import (
    DataLoader,
    Dataset,
    DistributedSampler,
    Subset,
    TensorDataset,
)

import cnnbook

# The arguments that define a run: a checkpoint resumes only a run with the same.
RUN_ARGUMENTS = (
    "model",
    "data",
    "image_size",
    "batch_size",
    "epochs",
    "lr",
    "momentum",
    "weight_decay",
    "no_bias_decay",
    "warmup_steps",
    "label_smoothing",
    "accumulate",
    "clip_grad_norm",
    "amp",
    "channels_last",
    "float64",
    "seed",
    "sync_bn",
)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
LAST, BEST, METRICS = "last.pt", "best.pt", "metrics.jsonl"


class ArgumentError(ValueError):
    """An argument that cannot work; the message names it and its value."""


# --------------------------------------------------------------------- networks


def builders() -> dict[str, Callable[..., nn.Module]]:
    """The network builders of ``cnnbook``, by name.

    A builder is a public function that takes a ``num_classes`` argument and is
    annotated to return a module: ``resnet50``, ``digits_resnet``, and those of
    every chapter that saves one.
    """
    found = {}
    for name, function in inspect.getmembers(cnnbook, inspect.isfunction):
        if name.startswith("_") or function.__module__ != cnnbook.__name__:
            continue
        try:
            signature = inspect.signature(function, eval_str=True)
        except (NameError, TypeError):
            continue
        returns = signature.return_annotation
        if (
            "num_classes" in signature.parameters
            and inspect.isclass(returns)
            and issubclass(returns, nn.Module)
        ):
            found[name] = function
    return found


def check_model(name: str) -> Callable[..., nn.Module]:
    """The builder called ``name``; if there is none, ``ValueError`` lists them."""
    available = builders()
    if name not in available:
        close = difflib.get_close_matches(name, available, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ArgumentError(
            f"--model {name!r} is not a network of cnnbook{hint}; "
            f"choose one of: {', '.join(sorted(available))}"
        )
    return available[name]


def build_model(name: str, num_classes: int, in_channels: int) -> nn.Module:
    """The network ``name`` of ``cnnbook``, for ``num_classes`` and ``in_channels``.

    ``ValueError`` if the network has another number of input channels.
    """
    builder = check_model(name)
    try:
        model = builder(num_classes=num_classes, in_channels=in_channels)
    except TypeError as error:  # a builder that fixes its input channels itself
        if "in_channels" not in str(error):
            raise
        model = builder(num_classes=num_classes)
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    if first.in_channels != in_channels:
        raise ArgumentError(
            f"--model {name} takes {first.in_channels}-channel images but the "
            f"data have {in_channels} channels"
        )
    return model


def input_channels(name: str) -> int:
    """The channels of the images that the network ``name`` takes by default."""
    model = check_model(name)(num_classes=2)
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels


# --------------------------------------------------------------------- data


class SeededSamples(Dataset):
    """``dataset`` whose random transforms draw from a generator seeded by the
    run's seed, the epoch and the example's index.

    An example is then augmented the same way whichever process or data-loading
    worker reads it, and whether the run was interrupted or not: a resumed run sees
    exactly the images of an uninterrupted one. Set ``epoch`` before each epoch.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        with torch.random.fork_rng(devices=[]):   # the caller's generator untouched
            torch.manual_seed(
                (self.seed * 1_000_003 + self.epoch) * 100_000_007 + index
            )
            return self.dataset[index]


def load_data(
    data: str, image_size: int, seed: int, channels: int = 3
) -> tuple[Dataset, Dataset | None, int, int]:
    """The training and test sets, the number of classes and of image channels.

    ``data`` is ``digits`` (scikit-learn's 8x8 digits, 1 channel; the batches are
    resized to ``image_size`` on the device), a ``.pt`` file of tensors (see
    :func:`load_tensors`; resized likewise) or a folder of class folders of images
    (torchvision's ImageFolder, in colour or, with ``channels=1``, in grey; random
    crops of ``image_size`` and flips for training, a centre crop for testing); a
    folder with ``train`` and ``val`` subfolders gives both sets.
    """
    if data == "digits":
        x_train, y_train, x_test, y_test = cnnbook.load_digits_split()
        return TensorDataset(x_train, y_train), TensorDataset(x_test, y_test), 10, 1
    if data.endswith(".pt"):
        return load_tensors(data)
    root = Path(data)
    try:
        from torchvision import datasets, transforms
    except ImportError as error:
        raise ArgumentError(
            f"--data {data!r}: reading image folders needs torchvision "
            "(pip install torchvision)"
        ) from error
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    colour = []
    if channels == 1:      # a network for grey images: ImageNet's grey statistics
        mean, std = [sum(mean) / 3], [sum(std) / 3]
        colour = [transforms.Grayscale(1)]
    normalize = transforms.Normalize(mean, std)
    train_transform = transforms.Compose(
        [
            *colour,
            transforms.RandomResizedCrop(image_size),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            normalize,
        ]
    )
    test_transform = transforms.Compose(
        [
            *colour,
            transforms.Resize(round(image_size * 256 / 224)),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            normalize,
        ]
    )
    train_root, test_root = root, None
    if (root / "train").is_dir():
        train_root = root / "train"
        test_root = root / "val" if (root / "val").is_dir() else None
    try:
        train_set = datasets.ImageFolder(train_root, train_transform)
        test_set = (
            datasets.ImageFolder(test_root, test_transform) if test_root else None
        )
    except (FileNotFoundError, RuntimeError) as error:
        raise ArgumentError(f"--data {data!r}: {error}") from error
    return (SeededSamples(train_set, seed), test_set, len(train_set.classes),
            channels)


def read_tensors(path: str, mmap: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a ``--data`` file; ``ArgumentError`` if they are not there."""
    saved = torch.load(path, weights_only=True, mmap=mmap)
    if not isinstance(saved, dict) or not {"x_train", "y_train"} <= saved.keys():
        raise ArgumentError(f"--data {path!r}: expected a dict with the tensors "
                            "x_train and y_train (and x_test, y_test)")
    return saved


def load_tensors(path: str) -> tuple[Dataset, Dataset | None, int, int]:
    """Data saved by ``torch.save({"x_train": images, "y_train": labels})``, with
    ``x_test`` and ``y_test`` for a test set: images ``(N, C, H, W)``, labels
    ``(N,)`` from 0. Returns what :func:`load_data` returns."""
    saved = read_tensors(path)
    x_train, y_train = saved["x_train"], saved["y_train"]
    test_set = None
    if "x_test" in saved:
        test_set = TensorDataset(saved["x_test"], saved["y_test"])
    classes = int(y_train.max()) + 1
    return TensorDataset(x_train, y_train), test_set, classes, x_train.shape[1]


def resize(x: torch.Tensor, image_size: int) -> torch.Tensor:
    """A batch ``(B, C, H, W)`` resized to ``(B, C, image_size, image_size)``."""
    if x.shape[-1] == image_size and x.shape[-2] == image_size:
        return x
    return F.interpolate(
        x, size=(image_size, image_size), mode="bilinear", align_corners=False
    )


# --------------------------------------------------------------------- arguments


def parser() -> argparse.ArgumentParser:
    """The command line; ``--help`` shows every default."""
    p = argparse.ArgumentParser(
        prog="torchrun --nproc-per-node=N -m cnnbook.train",
        description="Train a network of The CNN Blocks Book with "
        "DistributedDataParallel.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = p.add_argument
    add("--model", default="digits_resnet", help="a network builder of cnnbook")
    add(
        "--data",
        default="digits",
        help="'digits', a .pt file of tensors x_train, y_train (x_test, y_test), "
        "or a folder of class folders (ImageFolder; with train/ and val/ "
        "subfolders, val/ is the test set)",
    )
    add(
        "--image-size",
        type=int,
        default=None,
        help="side of the images the network sees (None: 8 for the digits, "
        "224 for a folder); the digits are resized up to it",
    )
    add("--epochs", type=int, default=3, help="passes over the training set")
    add(
        "--batch-size",
        type=int,
        default=64,
        help="the global batch, split evenly across the processes",
    )
    add("--lr", type=float, default=0.1, help="peak learning rate (cosine decay)")
    add("--momentum", type=float, default=0.9, help="SGD momentum, in [0, 1)")
    add("--weight-decay", type=float, default=5e-4, help="L2 penalty")
    add(
        "--no-bias-decay",
        action="store_true",
        help="no weight decay on biases and BN parameters",
    )
    add(
        "--warmup-steps",
        type=int,
        default=0,
        help="raise the learning rate linearly over the first N steps",
    )
    add(
        "--label-smoothing",
        type=float,
        default=0.0,
        help="share of the target spread over all classes, in [0, 1)",
    )
    add(
        "--accumulate",
        type=int,
        default=1,
        help="split each process's share into N micro-batches, one "
        "optimiser step for all",
    )
    add(
        "--clip-grad-norm",
        type=float,
        default=None,
        help="clip the gradients' global norm to this value (None: no clipping)",
    )
    add(
        "--amp",
        action="store_true",
        help="mixed precision: bfloat16 autocast on the CPU, float16 with a "
        "gradient scaler on CUDA",
    )
    add("--channels-last", action="store_true", help="NHWC memory format")
    add("--seed", type=int, default=0, help="weights, shuffle and augmentation")
    add(
        "--sync-bn",
        action="store_true",
        help="normalise with the statistics of the global batch (SyncBatchNorm)",
    )
    add(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="cuda: one GPU per process, NCCL; cpu: gloo; auto: cuda if there "
        "is a GPU for every process on this machine",
    )
    add("--workers", type=int, default=0, help="data loading processes per process")
    add(
        "--output-dir",
        default=None,
        help="folder for last.pt, best.pt and metrics.jsonl; a run resumes "
        "from its last.pt",
    )
    add(
        "--checkpoint-every",
        type=int,
        default=None,
        help="save last.pt every N steps (None: at the end of every epoch)",
    )
    add("--print-freq", type=int, default=10, help="log a line every N steps")
    add(
        "--test-only",
        metavar="CHECKPOINT",
        default=None,
        help="evaluate this checkpoint on the test set and exit",
    )
    add(
        "--max-steps",
        type=int,
        default=None,
        help="stop after N steps of the schedule (a shortened run)",
    )
    add(
        "--measure-comm",
        action="store_true",
        help="before training, time all-reduces of growing size and one "
        "forward+backward, and log them",
    )
    # For the appendix's checks and the tests only: hidden from --help.
    add("--record", default=None, help=argparse.SUPPRESS)
    add("--float64", action="store_true", help=argparse.SUPPRESS)
    add("--kill-at-step", type=int, default=None, help=argparse.SUPPRESS)
    add("--kill-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def _bad(name: str, requirement: str, value: Any) -> ArgumentError:
    return ArgumentError(f"--{name.replace('_', '-')} must be {requirement}, "
                         f"got {value!r}")


def check_args(args: argparse.Namespace, world_size: int) -> None:
    """Raise ``ArgumentError`` (a ValueError) naming the first bad argument."""
    for name in ("epochs", "batch_size", "image_size", "checkpoint_every",
                 "max_steps", "print_freq", "accumulate", "kill_at_step"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise _bad(name, "a positive integer", value)
    for name in ("workers", "warmup_steps", "seed", "kill_rank"):
        value = getattr(args, name)
        if value is not None and value < 0:
            raise _bad(name, "0 or more", value)
    if args.seed >= 2**31:
        raise _bad("seed", "below 2**31", args.seed)
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise _bad("lr", "a positive number", args.lr)
    if not 0 <= args.momentum < 1:
        raise _bad("momentum", "in [0, 1)", args.momentum)
    if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        raise _bad("weight_decay", "0 or more", args.weight_decay)
    if not 0 <= args.label_smoothing < 1:
        raise _bad("label_smoothing", "in [0, 1)", args.label_smoothing)
    if args.clip_grad_norm is not None and not (
        math.isfinite(args.clip_grad_norm) and args.clip_grad_norm > 0
    ):
        raise _bad("clip_grad_norm", "a positive number", args.clip_grad_norm)
    if args.batch_size % (world_size * args.accumulate):
        raise ArgumentError(
            f"--batch-size {args.batch_size} does not split evenly across "
            f"{world_size} processes x --accumulate {args.accumulate}"
        )
    if args.amp and args.float64:
        raise ArgumentError("--amp computes in 16 bits: it excludes --float64")
    if args.data.endswith(".pt") and not Path(args.data).is_file():
        raise ArgumentError(f"--data {args.data!r}: no such file")
    if (args.data != "digits" and not args.data.endswith(".pt")
            and not Path(args.data).is_dir()):
        raise ArgumentError(
            f"--data {args.data!r}: no such folder (give 'digits' or a folder "
            "of class folders of images)"
        )
    if args.output_dir is not None and Path(args.output_dir).exists() and not (
        Path(args.output_dir).is_dir()
    ):
        raise ArgumentError(f"--output-dir {args.output_dir!r} is not a folder")
    if args.test_only is not None and not Path(args.test_only).is_file():
        raise ArgumentError(f"--test-only {args.test_only!r}: no such file")
    check_model(args.model)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ArgumentError("--device cuda, but PyTorch sees no CUDA GPU")
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if args.device == "cuda" and torch.cuda.device_count() < local_world_size:
        raise ArgumentError(
            f"--device cuda with {local_world_size} processes on this machine "
            f"but {torch.cuda.device_count()} GPU(s): NCCL needs one GPU per "
            "process (--nproc-per-node <= the number of GPUs, or --device cpu)"
        )


def parse_args(
    argv: Sequence[str] | None = None, world_size: int | None = None
) -> argparse.Namespace:
    """Parse and check the command line; a bad argument exits with a message."""
    p = parser()
    args = p.parse_args(argv)
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", 1))
    try:
        check_args(args, world_size)
        if args.image_size is None:   # the data's own size; 224 for image folders
            args.image_size = 224
            if args.data == "digits":
                args.image_size = 8
            elif args.data.endswith(".pt"):
                saved = read_tensors(args.data, mmap=True)
                args.image_size = saved["x_train"].shape[-1]
    except ArgumentError as error:
        p.error(str(error))
    return args


# --------------------------------------------------------------------- processes


def pick_device(device: str) -> torch.device:
    """This process's device: its own GPU with ``cuda`` (or ``auto`` when every
    process on this machine gets one), else the CPU.

    ``auto`` never puts two processes on one GPU: NCCL refuses two ranks on the
    same device, so with fewer GPUs than processes they train on the CPU.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    use_cuda = device == "cuda" or (
        device == "auto"
        and torch.cuda.is_available()
        and torch.cuda.device_count() >= local_world_size
    )
    return torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")


def attempt_store() -> dist.Store | None:
    """A store of keys for this attempt only, when torchrun shares its own.

    torchrun's agent hosts the store in which the processes find each other
    (``TORCHELASTIC_USE_AGENT_STORE``) and keeps it across the restarts of
    ``--max-restarts``, keys and all; PyTorch's ``env://`` uses it without a
    prefix per attempt, so a restarted process can read the address of a process
    that died and fail with "Connection refused" (pytorch/pytorch#135712). On one
    machine all the processes share the agent's restart count, and a prefix made
    of it gives each attempt fresh keys. On several machines the counts differ
    (pytorch/pytorch#108158): there ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``
    makes torchrun start a new store for every attempt. ``None``: use ``env://``.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", 0))
    if int(os.environ.get("GROUP_WORLD_SIZE", 1)) > 1:
        if restarts:
            raise ArgumentError(
                "torchrun --max-restarts on several machines needs "
                "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in the environment of "
                "every torchrun (see the docstring of attempt_store)"
            )
        return None
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        int(os.environ["WORLD_SIZE"]),
        is_master=False,
        timeout=datetime.timedelta(minutes=10),
    )
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"cnnbook.train/attempt_{attempt}/", store)


def setup_distributed(device: str) -> tuple[int, int, torch.device]:
    """Join the process group that torchrun set up; return rank, world size, device.

    torchrun tells each process its place through environment variables (RANK,
    WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). Started without torchrun, the
    script trains alone.
    """
    here = pick_device(device)
    if here.type == "cuda":
        torch.cuda.set_device(here)
    if "WORLD_SIZE" not in os.environ:
        return 0, 1, here
    backend = "nccl" if here.type == "cuda" else "gloo"
    store = attempt_store()
    if store is None:
        dist.init_process_group(backend=backend)
    else:
        dist.init_process_group(
            backend=backend,
            store=store,
            rank=int(os.environ["RANK"]),
            world_size=int(os.environ["WORLD_SIZE"]),
        )
    return dist.get_rank(), dist.get_world_size(), here


def all_sum(values: Sequence[float], device: torch.device) -> list[float]:
    """The sum over the processes of each value (itself when training alone)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


# --------------------------------------------------------------------- checkpoints


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's random generators: Python's, NumPy's, PyTorch's, the GPU's,
    as plain Python values (which ``all_gather_object`` and ``weights_only``
    loading both accept)."""
    name, key, *rest = np.random.get_state()

    def as_bytes(state: torch.Tensor) -> bytes:
        return state.numpy().tobytes()

    return {
        "python": random.getstate(),
        "numpy": (name, key.tolist(), *rest),
        "torch": as_bytes(torch.get_rng_state()),
        "cuda": (as_bytes(torch.cuda.get_rng_state(device))
                 if device.type == "cuda" else None),
    }


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore what :func:`rng_state` saved."""

    def as_tensor(state: bytes) -> torch.Tensor:
        return torch.frombuffer(bytearray(state), dtype=torch.uint8)

    random.setstate(state["python"])
    name, key, *rest = state["numpy"]
    np.random.set_state((name, np.array(key, dtype=np.uint32), *rest))
    torch.set_rng_state(as_tensor(state["torch"]))
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(as_tensor(state["cuda"]), device)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` so that it survives a crash of the machine.

    Write a new file, flush it to the disk, rename it over the old one, and flush
    the folder (which holds the name): killed at any point, ``path`` is the old
    checkpoint or the new one, never a mixture.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as file:
        torch.save(state, file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(partial, path)
    if hasattr(os, "O_DIRECTORY"):             # POSIX: the rename itself
        folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def read_checkpoint(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The checkpoint at ``path``; ``ArgumentError`` if it is another run's."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    differ = [
        f"--{name.replace('_', '-')} {getattr(args, name)!r} (checkpoint: "
        f"{state['run'].get(name)!r})"
        for name in RUN_ARGUMENTS
        if state["run"].get(name) != getattr(args, name)
    ]
    if differ:
        raise ArgumentError(
            f"checkpoint {str(path)!r} belongs to another run: " + "; ".join(differ)
        )
    return state


def agree_on_checkpoint(
    path: Path | None, args: argparse.Namespace, rank: int, world_size: int,
    device: torch.device
) -> dict[str, Any] | None:
    """The checkpoint every process resumes from, or ``None`` to start afresh.

    Rank 0 decides: it reads ``path`` and broadcasts its step (0: none). Every
    other process must then read the same step from its own ``path`` (a shared
    file system); one that cannot raises ``RuntimeError`` instead of training from
    step 0 while the others resume.
    """
    state, step = None, 0
    if rank == 0 and path is not None and path.is_file():
        try:
            state = read_checkpoint(path, args)
            step = state["step"]
        except ArgumentError:
            step = -1                               # tell the others to stop too
            if world_size == 1:
                raise
            announce(step, device)
            raise
    if world_size > 1:
        step = announce(step, device)
    if step == -1:
        raise ArgumentError("rank 0 refused the checkpoint (see its message)")
    if rank != 0 and step > 0:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError) as error:
            raise RuntimeError(
                f"rank {rank}: cannot read {path} ({error}), from which rank 0 "
                f"resumes at step {step}"
            ) from error
        if state["step"] != step:
            raise RuntimeError(
                f"rank {rank}: {path} holds step {state['step']}, rank 0's step "
                f"{step}: the processes do not see the same file"
            )
    if state is not None and state["world_size"] != world_size:
        raise ArgumentError(
            f"checkpoint {str(path)!r} was written by {state['world_size']} "
            f"processes, not {world_size}: its random states cannot be dealt out"
        )
    return state


def announce(step: int, device: torch.device) -> int:
    """Rank 0's ``step``, in every process."""
    tensor = torch.tensor([step], dtype=torch.int64, device=device)
    dist.broadcast(tensor, src=0)
    return int(tensor.item())


def kill_self() -> None:
    """Die at once, as when the machine fails: no cleanup, nothing saved."""
    sys.stdout.flush()
    if hasattr(signal, "SIGKILL"):
        os.kill(os.getpid(), signal.SIGKILL)
    os._exit(137)


# --------------------------------------------------------------------- measuring


def measure_comm(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 device: torch.device, repeats: int = 5) -> dict[str, Any]:
    """Time one all-reduce of 4^4 to 4^12 float32 values and of as many as the
    network has gradients, and one forward+backward of the local batch (without any
    communication). Returns the median seconds of each, and what was measured.
    """
    num_gradients = sum(p.numel() for p in model.parameters() if p.requires_grad)
    sizes = sorted({4**k for k in range(4, 13)} | {num_gradients})

    def median_seconds(run: Callable[[], None]) -> float:
        run()                                                    # warm up
        times = []
        for _ in range(repeats):
            dist.barrier()                                       # start together
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            run()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2]

    allreduce = {}
    for size in sizes:
        tensor = torch.ones(size, device=device)
        allreduce[size] = median_seconds(lambda t=tensor: dist.all_reduce(t))

    def forward_backward() -> None:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    saved = {name: b.clone() for name, b in model.named_buffers()}
    compute = median_seconds(forward_backward)
    model.zero_grad(set_to_none=True)
    with torch.no_grad():            # the BN statistics as if nothing had been run
        for name, buffer in model.named_buffers():
            buffer.copy_(saved[name])
    return {"allreduce_seconds": {str(k): v for k, v in allreduce.items()},
            "num_gradients": num_gradients, "forward_backward_seconds": compute,
            "local_batch": len(x), "world_size": dist.get_world_size(),
            "backend": dist.get_backend()}


# --------------------------------------------------------------------- training


def epoch_batches(sampler: DistributedSampler, epoch: int, local_batch: int,
                  start: int, stop: int) -> list[list[int]]:
    """Dataset indices of this process's batches ``start`` to ``stop - 1`` of
    ``epoch``.

    The sampler shuffles the whole training set with its seed and the epoch, the
    same in every process, and deals the indices out in turn, so that the k-th
    batches of all the processes together hold the k-th ``batch_size`` indices of
    the shuffle.
    """
    sampler.set_epoch(epoch)
    mine = list(sampler)
    return [mine[i * local_batch:(i + 1) * local_batch] for i in range(start, stop)]


def schedule_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """The learning rate of ``step`` over ``--lr``: a linear warm-up over
    ``warmup_steps`` steps, then a cosine from 1 to 0 over the remaining ones."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * progress))


def parameter_groups(model: nn.Module, weight_decay: float,
                     no_bias_decay: bool) -> list[dict[str, Any]]:
    """The optimiser's parameter groups: with ``no_bias_decay``, the biases and the
    normalisation layers' scales and shifts (the one-dimensional parameters) get no
    weight decay."""
    if not no_bias_decay:
        return [{"params": list(model.parameters()), "weight_decay": weight_decay}]
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.ndim > 1],
             "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]


def count_correct(logits: torch.Tensor, y: torch.Tensor) -> tuple[int, int]:
    """How many of the batch's labels are the top-1 and among the top-5 scores
    (top-k with k the number of classes when there are fewer than 5)."""
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hits = top == y[:, None]
    return int(hits[:, 0].sum()), int(hits.any(1).sum())


def train(args: argparse.Namespace) -> None:
    """One process's part of the run (torchrun starts one per process)."""
    rank, world_size, device = setup_distributed(args.device)
    log = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    local_batch = args.batch_size // world_size
    dtype = torch.float64 if args.float64 else torch.float32
    torch.manual_seed(args.seed)               # the same initial weights everywhere
    channels = 1 if args.data == "digits" else input_channels(args.model)  # folders
    train_set, test_set, num_classes, in_channels = load_data(
        args.data, args.image_size, args.seed, channels)
    model = build_model(args.model, num_classes, in_channels)
    if args.sync_bn:   # PyTorch's has fused kernels but needs a GPU; the book's not
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            model = cnnbook.convert_sync_batchnorm(model)
    memory_format = (torch.channels_last if args.channels_last
                     else torch.contiguous_format)
    model = model.to(device, dtype, memory_format=memory_format)
    # Each process's own randomness (dropout, a random layer) differs: seed + rank.
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    torch.manual_seed(args.seed + rank)
    if args.test_only:
        return test_only(args, model, test_set, device, dtype, memory_format, log)
    steps_per_epoch = len(train_set) // args.batch_size
    if steps_per_epoch == 0:
        raise ArgumentError(f"--batch-size {args.batch_size} is larger than the "
                            f"training set ({len(train_set)} images)")
    total_steps = args.epochs * steps_per_epoch
    if args.warmup_steps >= total_steps:
        raise ArgumentError(f"--warmup-steps {args.warmup_steps} leaves no step "
                            f"of the {total_steps} for the cosine")
    last_step = min(total_steps, args.max_steps or total_steps)
    optimizer = torch.optim.SGD(
        parameter_groups(model, args.weight_decay, args.no_bias_decay),
        lr=args.lr, momentum=args.momentum)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: (
        schedule_factor(step, args.warmup_steps, total_steps)))
    # float16 needs its loss scaled against underflow; bfloat16 has float32's range.
    scaler = torch.amp.GradScaler(device.type,
                                  enabled=args.amp and device.type == "cuda")
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)

    out = Path(args.output_dir) if args.output_dir else None
    state = agree_on_checkpoint(out / LAST if out else None, args, rank,
                                world_size, device)
    step, best, totals = 0, -1.0, [0.0, 0.0, 0.0]   # epoch's loss, top-1, images
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        scaler.load_state_dict(state["scaler"])
        set_rng_state(state["ranks"][rank]["rng"], device)
        step, best, totals = state["step"], state["best"], state["ranks"][rank][
            "totals"]
        log(f"resumed from {out / LAST} at step {step}")
    if rank == 0 and out is not None:
        out.mkdir(parents=True, exist_ok=True)
        keep_metrics(out / METRICS, step)
    fresh = step == 0
    initial = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    ddp = model
    if world_size > 1:
        # DDP copies rank 0's weights and buffers to every process, and all-reduces
        # the gradients, bucket by bucket, while the backward pass runs.
        ddp = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    log(f"{args.model}, {world_size} process(es) on {device.type} "
        f"({dist.get_backend() if dist.is_initialized() else 'alone'}): batch "
        f"{args.batch_size} = {world_size} x {local_batch}, "
        f"{'SyncBatchNorm' if args.sync_bn else 'BatchNorm in each process'}")
    if args.measure_comm and world_size > 1:
        x, y = next(iter(DataLoader(train_set, batch_size=local_batch)))
        x = resize(x.to(device, dtype), args.image_size)
        comm = measure_comm(model, x, y.to(device), device)
        if rank == 0 and args.record:
            Path(args.record).mkdir(parents=True, exist_ok=True)
            (Path(args.record) / "comm.json").write_text(json.dumps(comm, indent=1))
        seconds = comm["allreduce_seconds"][str(comm["num_gradients"])]
        log(f"all-reduce of {comm['num_gradients']:,} gradients "
            f"{1e3 * seconds:.1f} ms, forward+backward of {local_batch} images "
            f"{1e3 * comm['forward_backward_seconds']:.1f} ms")

    sampler = DistributedSampler(train_set, num_replicas=world_size, rank=rank,
                                 shuffle=True, seed=args.seed, drop_last=True)
    every = args.checkpoint_every or steps_per_epoch
    autocast = torch.autocast(device.type, enabled=args.amp,
                              dtype=torch.float16 if device.type == "cuda"
                              else torch.bfloat16)
    if __name__ == "__main__":     # a process of its own (python -m cnnbook.train):
        gc.freeze()                # what is set up lives as long as the run too
    while step < last_step:
        epoch, done = divmod(step, steps_per_epoch)    # resumed: skip what is done
        stop = min(steps_per_epoch, last_step - epoch * steps_per_epoch)
        batches = epoch_batches(sampler, epoch, local_batch, done, stop)
        if isinstance(train_set, SeededSamples):
            train_set.epoch = epoch
        loader = DataLoader(train_set, batch_sampler=batches,
                            num_workers=args.workers,
                            pin_memory=device.type == "cuda")
        ddp.train()
        window = {"loss": 0.0, "steps": 0, "data": 0.0,
                  "start": time.perf_counter()}
        waited = time.perf_counter()
        for indices, (x, y) in zip(batches, loader):
            window["data"] += time.perf_counter() - waited
            x = resize(x.to(device, dtype, non_blocking=True), args.image_size)
            x = x.contiguous(memory_format=memory_format)
            y = y.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            loss, correct = 0.0, 0
            micro = list(zip(x.chunk(args.accumulate), y.chunk(args.accumulate)))
            for k, (xs, ys) in enumerate(micro):
                # DDP all-reduces the gradients in the last micro-batch's backward
                last = k == len(micro) - 1
                with (contextlib.nullcontext() if last or ddp is model
                      else ddp.no_sync()):
                    with autocast:
                        logits = ddp(xs)
                    part = criterion(logits.to(dtype), ys) / len(micro)
                    scaler.scale(part).backward()
                loss += part.item()
                correct += count_correct(logits.detach(), ys)[0]
            if args.record and step == 0:
                record_first_step(Path(args.record), rank, model, initial, indices,
                                  loss)
            if args.clip_grad_norm is not None:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            schedule.step()
            step += 1
            totals = [totals[0] + loss * len(y), totals[1] + correct,
                      totals[2] + len(y)]
            window["loss"] += loss
            window["steps"] += 1
            if step % args.print_freq == 0:
                seconds = time.perf_counter() - window["start"]
                log(f"epoch {epoch + 1} step {step}/{last_step} "
                    f"loss {window['loss'] / window['steps']:.4f} "
                    f"lr {optimizer.param_groups[0]['lr']:.4g} "
                    f"{window['steps'] * args.batch_size / seconds:.0f} images/s "
                    f"data {1e3 * window['data'] / window['steps']:.1f} ms/step")
                window = {"loss": 0.0, "steps": 0, "data": 0.0,
                          "start": time.perf_counter()}
            epoch_end = step % steps_per_epoch == 0 or step == last_step
            if epoch_end:
                summary, totals = end_epoch(args, model, test_set, device, dtype,
                                            memory_format, epoch, step, totals,
                                            optimizer.param_groups[0]["lr"])
                log(", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                              for k, v in summary.items()))
                improved = summary.get("test_top1", -1.0) > best
                best = max(best, summary.get("test_top1", -1.0))
            if out is not None and (step % every == 0 or epoch_end):
                ranks = [{"rng": rng_state(device), "totals": totals}]
                if world_size > 1:
                    ranks = [None] * world_size
                    dist.all_gather_object(ranks, {"rng": rng_state(device),
                                                   "totals": totals})
                if rank == 0:
                    checkpoint = {
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "schedule": schedule.state_dict(),
                        "scaler": scaler.state_dict(), "step": step, "best": best,
                        "world_size": world_size, "ranks": ranks,
                        "run": {name: getattr(args, name)
                                for name in RUN_ARGUMENTS}}
                    if epoch_end:         # the epoch's line, then its checkpoint
                        with open(out / METRICS, "a") as file:
                            file.write(json.dumps(summary) + "\n")
                    save_checkpoint(out / LAST, checkpoint)
                    if epoch_end and improved:
                        save_checkpoint(out / BEST, checkpoint)
                    log(f"step {step}: saved {LAST}"
                        + (f" and {BEST}" if epoch_end and improved else ""))
            if (fresh and step == args.kill_at_step
                    and args.kill_rank in (None, rank)):    # None: every process
                log(f"step {step}: rank {rank} killed (--kill-at-step)")
                print(f"step {step}: rank {rank} kills itself (SIGKILL)",
                      file=sys.stderr, flush=True)
                if args.kill_rank is None and world_size > 1:
                    # torchrun stops the others as soon as one process dies: one
                    # that lags by a moment would be stopped before it said so.
                    dist.barrier()
                kill_self()
            waited = time.perf_counter()
    if dist.is_initialized():
        dist.destroy_process_group()


def keep_metrics(path: Path, step: int) -> None:
    """Drop the lines of ``path`` written after ``step``: a run killed between an
    epoch's line and its checkpoint writes that line again when it resumes."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(line for line in lines
                            if json.loads(line)["step"] <= step))


def end_epoch(args: argparse.Namespace, model: nn.Module, test_set: Dataset | None,
              device: torch.device, dtype: torch.dtype,
              memory_format: torch.memory_format, epoch: int, step: int,
              totals: list[float], lr: float) -> tuple[dict[str, Any], list[float]]:
    """The epoch's summary over all processes (the part before a resume included,
    through the totals saved in the checkpoint), and the totals reset for the
    next epoch."""
    loss_sum, correct, images = all_sum(totals, device)
    summary: dict[str, Any] = {"epoch": epoch + 1, "step": step,
                               "train_loss": loss_sum / images,
                               "train_top1": correct / images, "lr": lr}
    if test_set is not None:
        summary.update(evaluate(model, test_set, args.image_size, args.workers,
                                device, dtype, memory_format))
    return summary, [0.0, 0.0, 0.0]


def test_only(args: argparse.Namespace, model: nn.Module, test_set: Dataset | None,
              device: torch.device, dtype: torch.dtype,
              memory_format: torch.memory_format, log: Callable[..., None]
              ) -> None:
    """Evaluate the weights of the checkpoint ``--test-only`` on the test set."""
    if test_set is None:
        raise ArgumentError(f"--test-only: --data {args.data!r} has no test set "
                            "(a val/ folder)")
    state = torch.load(args.test_only, map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state["model"])
    except (KeyError, RuntimeError) as error:
        raise ArgumentError(f"--test-only {args.test_only!r} holds no weights of "
                            f"--model {args.model}") from error
    result = evaluate(model, test_set, args.image_size, args.workers, device,
                      dtype, memory_format)
    log(json.dumps({"checkpoint": str(args.test_only), "step": state.get("step"),
                    **result}))
    if dist.is_initialized():
        dist.destroy_process_group()


@torch.no_grad()
def evaluate(model: nn.Module, test_set: Dataset, image_size: int, workers: int,
             device: torch.device, dtype: torch.dtype = torch.float32,
             memory_format: torch.memory_format = torch.contiguous_format
             ) -> dict[str, float]:
    """Loss, top-1 and top-5 accuracy on the test set; each process evaluates every
    world_size-th image."""
    rank, world_size = 0, 1
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
        for buffer in model.buffers():    # rank 0's BN statistics, as DDP does
            dist.broadcast(buffer, src=0)
    shard = Subset(test_set, range(rank, len(test_set), world_size))
    totals = [0.0, 0.0, 0.0, float(len(shard))]
    with cnnbook.model_mode(model, training=False):   # BN: running statistics
        for x, y in DataLoader(shard, batch_size=256, num_workers=workers):
            x = resize(x.to(device, dtype), image_size)
            logits = model(x.contiguous(memory_format=memory_format))
            y = y.to(device)
            top1, top5 = count_correct(logits, y)
            totals[0] += F.cross_entropy(logits, y, reduction="sum").item()
            totals[1] += top1
            totals[2] += top5
    loss, top1, top5, images = all_sum(totals, device)
    return {"test_loss": loss / images, "test_top1": top1 / images,
            "test_top5": top5 / images}


def record_first_step(folder: Path, rank: int, model: nn.Module,
                      initial: dict[str, torch.Tensor], indices: Iterable[int],
                      loss: float) -> None:
    """Save what this process saw and computed in the first step, before the update:
    ``rank{rank}.pt`` in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({
        "rank": rank, "indices": torch.tensor(list(indices)), "loss": loss,
        "initial": initial,
        "gradients": {name: p.grad.cpu().clone()
                      for name, p in model.named_parameters()},
        "buffers": {name: b.cpu().clone() for name, b in model.named_buffers()},
    }, folder / f"rank{rank}.pt")


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the command line and train: ``python -m cnnbook.train`` runs this."""
    args = parse_args(argv)
    try:
        train(args)
    except ArgumentError as error:   # found on reading the data or the checkpoint
        parser().error(str(error))


if __name__ == "__main__":
    # The process lives as long as the run: its modules' objects too. Move them out
    # of the garbage collector's sight (train() freezes the set-up's, once built),
    # so that its collections, and the last one at exit, skip them.
    gc.freeze()
    main()
