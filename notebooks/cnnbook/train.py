"""Train a network of the book on several processes with DistributedDataParallel.

``torchrun`` starts one copy of this script per process (one per GPU, or a few on a
CPU)::

    torchrun --standalone --nproc_per_node=2 -m cnnbook.train --model digits_resnet

Each process holds a replica of the network and trains it on its own share of
every batch; DistributedDataParallel (DDP) averages the gradients across the
processes during the backward pass, so that every replica takes the same optimiser
step. ``--sync-bn`` makes BatchNorm normalise with the statistics of the whole batch
rather than with those of each process's share. A run writes a checkpoint every
``--checkpoint-every`` steps and, started again with the same command, resumes from
it. The appendix "Training on several processes" of The CNN Blocks Book explains
every part of this file; ``python -m cnnbook.train --help`` lists the options.

Hand-written, not generated (unlike ``cnnbook/__init__.py``): edit it directly.
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

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
    "seed",
    "sync_bn",
)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


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


# --------------------------------------------------------------------- data


def load_data(
    data: str, image_size: int
) -> tuple[Dataset, Dataset | None, int, int]:
    """The training and test sets, the number of classes and of image channels.

    ``data`` is ``digits`` (scikit-learn's 8x8 digits, 1 channel; the batches are
    resized to ``image_size`` on the device) or a folder of class folders of images
    (torchvision's ImageFolder, 3 channels, crops of ``image_size``); a folder with
    ``train`` and ``val`` subfolders gives both sets.
    """
    if data == "digits":
        x_train, y_train, x_test, y_test = cnnbook.load_digits_split()
        return TensorDataset(x_train, y_train), TensorDataset(x_test, y_test), 10, 1
    root = Path(data)
    if not root.is_dir():
        raise ArgumentError(
            f"--data {data!r}: no such folder (give 'digits' or a folder of "
            "class folders of images)"
        )
    try:
        from torchvision import datasets, transforms
    except ImportError as error:
        raise ArgumentError(
            f"--data {data!r}: reading image folders needs torchvision "
            "(pip install torchvision)"
        ) from error
    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_transform = transforms.Compose(
        [
            transforms.RandomResizedCrop(image_size),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            normalize,
        ]
    )
    test_transform = transforms.Compose(
        [
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
    return train_set, test_set, len(train_set.classes), 3


def resize(x: torch.Tensor, image_size: int) -> torch.Tensor:
    """A batch ``(B, C, H, W)`` resized to ``(B, C, image_size, image_size)``."""
    if x.shape[-1] == image_size and x.shape[-2] == image_size:
        return x
    return F.interpolate(
        x, size=(image_size, image_size), mode="bilinear", align_corners=False
    )


# --------------------------------------------------------------------- arguments


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="torchrun --nproc_per_node=N -m cnnbook.train",
        description="Train a network of The CNN Blocks Book with "
        "DistributedDataParallel.",
    )
    p.add_argument(
        "--model",
        default="digits_resnet",
        help="a network builder of cnnbook (default: digits_resnet)",
    )
    p.add_argument(
        "--data",
        default="digits",
        help="'digits', or a folder of class folders (ImageFolder; with train/ "
        "and val/ subfolders, val/ is the test set)",
    )
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="side of the images the network sees (default: 8 for the digits, "
        "224 for a folder); the digits are resized up to it",
    )
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument(
        "--batch-size",
        type=int,
        default=64,
        help="the global batch, split evenly across the processes (default: 64)",
    )
    p.add_argument(
        "--lr", type=float, default=0.1, help="peak learning rate (cosine decay)"
    )
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--sync-bn",
        action="store_true",
        help="normalise with the statistics of the global batch (SyncBatchNorm)",
    )
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="cuda: one GPU per process, nccl; cpu: gloo (default: cuda if any)",
    )
    p.add_argument(
        "--workers", type=int, default=0, help="data loading processes per process"
    )
    p.add_argument(
        "--checkpoint",
        default=None,
        help="checkpoint file; if it exists, the run resumes from it",
    )
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=None,
        help="save every N steps (default: at the end of every epoch)",
    )
    p.add_argument(
        "--record",
        default=None,
        help="folder: save each process's batch, gradients and BN buffers of the "
        "first step (rank{r}.pt) for inspection",
    )
    p.add_argument(
        "--measure-comm",
        action="store_true",
        help="before training, time all-reduces of growing size and one "
        "forward+backward (written to RECORD/comm.json with --record)",
    )
    p.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="stop after N steps of the schedule (a shortened run, for tests)",
    )
    p.add_argument(
        "--kill-after-steps",
        type=int,
        default=None,
        help="to test resuming: after N steps every process kills itself (SIGKILL)",
    )
    return p


def check_args(args: argparse.Namespace, world_size: int) -> None:
    """Raise ``ArgumentError`` (a ValueError) naming the first bad argument."""
    for name in (
        "epochs",
        "batch_size",
        "image_size",
        "checkpoint_every",
        "max_steps",
        "kill_after_steps",
    ):
        value = getattr(args, name)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ArgumentError(
                f"--{name.replace('_', '-')} must be a positive integer, "
                f"got {value!r}"
            )
    if args.workers < 0:
        raise ArgumentError(f"--workers must be 0 or more, got {args.workers}")
    if not args.lr > 0:
        raise ArgumentError(f"--lr must be positive, got {args.lr}")
    if args.batch_size % world_size:
        raise ArgumentError(
            f"--batch-size {args.batch_size} does not split evenly across "
            f"{world_size} processes"
        )
    if args.data != "digits" and not Path(args.data).is_dir():
        raise ArgumentError(
            f"--data {args.data!r}: no such folder (give 'digits' or a folder "
            "of class folders of images)"
        )
    check_model(args.model)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ArgumentError("--device cuda, but PyTorch sees no CUDA GPU")
    if args.device == "cuda" and torch.cuda.device_count() < int(
        os.environ.get("LOCAL_WORLD_SIZE", 1)
    ):
        raise ArgumentError(
            f"--device cuda with {os.environ['LOCAL_WORLD_SIZE']} processes on "
            f"this machine but {torch.cuda.device_count()} GPUs: NCCL needs one "
            "GPU per process (use --nproc_per_node <= the number of GPUs)"
        )


def parse_args(
    argv: Sequence[str] | None = None, world_size: int | None = None
) -> argparse.Namespace:
    """Parse and check the command line; a bad argument exits with a message."""
    p = parser()
    args = p.parse_args(argv)
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", 1))
    if args.image_size is None:
        args.image_size = 8 if args.data == "digits" else 224
    try:
        check_args(args, world_size)
    except ArgumentError as error:
        p.error(str(error))
    return args


# --------------------------------------------------------------------- processes


def setup_distributed(device: str) -> tuple[int, int, torch.device]:
    """Join the process group that torchrun set up; return rank, world size, device.

    torchrun tells each process its place through environment variables (RANK,
    WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). Started without torchrun, the
    script trains alone.
    """
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    here = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if "WORLD_SIZE" not in os.environ:
        return 0, 1, here
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), here


def all_mean(values: Sequence[float], device: torch.device) -> list[float]:
    """The mean over the processes of each value (itself when training alone)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(tensor)
        tensor /= dist.get_world_size()
    return tensor.tolist()


class Progress:
    """A progress bar in a terminal (tqdm's, if installed); silent otherwise."""

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        self.bar = None
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(
                    total=total, initial=initial, unit="step", leave=False
                )
            except ImportError:
                self.bar = _SimpleBar(total, initial)

    def update(self, loss: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {loss:.3f}")
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _SimpleBar:
    def __init__(self, total: int, initial: int) -> None:
        self.total, self.n, self.postfix = total, initial, ""

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def update(self, steps: int) -> None:
        self.n += steps
        done = round(30 * self.n / self.total)
        print(
            f"\r[{'#' * done}{'.' * (30 - done)}] {self.n}/{self.total} "
            f"{self.postfix}",
            end="",
            file=sys.stderr,
            flush=True,
        )

    def close(self) -> None:
        print(file=sys.stderr)


# --------------------------------------------------------------------- checkpoints


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically: killed while writing, the old file
    stays as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save(state, partial)
    os.replace(partial, path)


def load_checkpoint(
    path: Path, args: argparse.Namespace, device: torch.device
) -> dict[str, Any] | None:
    """The checkpoint at ``path``, if any; ``ValueError`` if it is another run's."""
    if not path.is_file():
        return None
    state = torch.load(path, map_location=device, weights_only=True)
    differ = [
        f"--{name.replace('_', '-')} {getattr(args, name)!r} (checkpoint: "
        f"{state['run'][name]!r})"
        for name in RUN_ARGUMENTS
        if state["run"].get(name) != getattr(args, name)
    ]
    if differ:
        raise ArgumentError(
            f"--checkpoint {str(path)!r} belongs to another run: "
            + "; ".join(differ)
        )
    return state


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


def train(args: argparse.Namespace) -> None:
    """One process's part of the run (torchrun starts one per process)."""
    rank, world_size, device = setup_distributed(args.device)
    log = print if rank == 0 else (lambda *args, **kwargs: None)
    local_batch = args.batch_size // world_size
    torch.manual_seed(args.seed)               # the same initial weights everywhere
    train_set, test_set, num_classes, in_channels = load_data(args.data,
                                                              args.image_size)
    model = build_model(args.model, num_classes, in_channels).to(device)
    if args.sync_bn:   # PyTorch's has fused kernels but needs a GPU; the book's not
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            model = cnnbook.convert_sync_batchnorm(model)
    steps_per_epoch = len(train_set) // args.batch_size
    if steps_per_epoch == 0:
        raise ArgumentError(f"--batch-size {args.batch_size} is larger than the "
                         f"training set ({len(train_set)} images)")
    total_steps = args.epochs * steps_per_epoch
    last_step = min(total_steps, args.max_steps or total_steps)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr,
                                momentum=args.momentum,
                                weight_decay=args.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(             # cosine, from lr to 0
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total_steps)))

    step = 0
    checkpoint = Path(args.checkpoint) if args.checkpoint else None
    state = load_checkpoint(checkpoint, args, device) if checkpoint else None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        step = state["step"]
        log(f"resumed from {checkpoint.name} at step {step}")
    initial = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    ddp = model
    if world_size > 1:
        # DDP copies rank 0's weights and buffers to every process, and all-reduces
        # the gradients, bucket by bucket, while the backward pass runs.
        ddp = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    log(f"{args.model}, {world_size} process(es) on {device.type}: batch "
        f"{args.batch_size} = {world_size} x {local_batch}, "
        f"{'SyncBatchNorm' if args.sync_bn else 'BatchNorm in each process'}")
    if args.measure_comm and world_size > 1:
        x, y = next(iter(DataLoader(train_set, batch_size=local_batch)))
        x, y = resize(x.to(device), args.image_size), y.to(device)
        comm = measure_comm(model, x, y, device)
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
    steps_run = 0
    while step < last_step:
        epoch, done = divmod(step, steps_per_epoch)    # resumed: skip what is done
        stop = min(steps_per_epoch, last_step - epoch * steps_per_epoch)
        batches = epoch_batches(sampler, epoch, local_batch, done, stop)
        loader = DataLoader(train_set, batch_sampler=batches,
                            num_workers=args.workers,
                            pin_memory=device.type == "cuda")
        progress = Progress(total_steps, step, enabled=rank == 0)
        ddp.train()
        losses, start = [], time.perf_counter()
        for indices, (x, y) in zip(batches, loader):
            x = resize(x.to(device, non_blocking=True), args.image_size)
            y = y.to(device, non_blocking=True)
            loss = F.cross_entropy(ddp(x), y)    # mean over this process's share
            optimizer.zero_grad(set_to_none=True)
            loss.backward()                        # DDP averages the gradients here
            if args.record and step == 0:
                record_first_step(Path(args.record), rank, model, initial, indices,
                                  loss)
            optimizer.step()
            schedule.step()
            step += 1
            steps_run += 1
            losses.append(loss.item())
            progress.update(losses[-1])
            due = step % every == 0 or step == last_step
            if checkpoint and rank == 0 and due:
                save_checkpoint(checkpoint, {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict(), "step": step,
                    "world_size": world_size,
                    "run": {name: getattr(args, name) for name in RUN_ARGUMENTS}})
                log(f"step {step}: saved {checkpoint.name}")
            if steps_run == args.kill_after_steps:
                log(f"step {step}: killed (--kill-after-steps)")
                kill_self()
        progress.close()
        mean_loss, = all_mean([sum(losses) / len(losses)], device)
        message = (f"epoch {epoch + 1}/{args.epochs}, step {step}: "
                   f"loss {mean_loss:.3f}")
        if test_set is not None:
            accuracy = evaluate(model, test_set, args.image_size, args.workers,
                                device)
            message += f", test accuracy {accuracy:.1%}"
        log(f"{message} ({time.perf_counter() - start:.1f} s)")
    if dist.is_initialized():
        dist.destroy_process_group()


@torch.no_grad()
def evaluate(model: nn.Module, test_set: Dataset, image_size: int, workers: int,
             device: torch.device) -> float:
    """Accuracy on the test set; each process evaluates every world_size-th
    image."""
    rank, world_size = 0, 1
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
        for buffer in model.buffers():    # rank 0's BN statistics, as DDP does
            dist.broadcast(buffer, src=0)
    shard = Subset(test_set, range(rank, len(test_set), world_size))
    correct = 0
    with cnnbook.model_mode(model, training=False):   # BN: running statistics
        for x, y in DataLoader(shard, batch_size=256, num_workers=workers):
            x = resize(x.to(device), image_size)
            correct += (model(x).argmax(1).cpu() == y).sum().item()
    total = torch.tensor([correct, len(shard)], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(total)
    return (total[0] / total[1]).item()


def record_first_step(folder: Path, rank: int, model: nn.Module,
                      initial: dict[str, torch.Tensor], indices: Iterable[int],
                      loss: torch.Tensor) -> None:
    """Save what this process saw and computed in the first step, before the update:
    ``rank{rank}.pt`` in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({
        "rank": rank, "indices": torch.tensor(list(indices)), "loss": loss.item(),
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
    main()
