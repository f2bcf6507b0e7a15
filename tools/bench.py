"""Time the book's networks against the reference libraries' implementations: ``make bench``.

Each of the book's seven 50-layer networks (saved in ``cnnbook`` by its chapter) is timed
against the same network as torchvision or timm builds it: one forward and backward pass in
training mode, on the same input, the two models interleaved in several rounds with
``torch.utils.benchmark`` (``cnnbook.time_forward_backward``), so a slow spell of the machine
falls on both alike. The table of ratios (book / reference; below 1 means the book is faster)
is printed and written into the package, ``notebooks/cnnbook/benchmarks/DEVICE.csv``, where the
closing chapter reads it (with ``importlib.resources``, so it is found from a clone and from
an installed module alike). The file names the device, the date, the versions and the command.

On the CPU the networks run in float32. On a CUDA GPU they run twice: in float32 and in the
setting a GPU trains in, channels-last memory layout with automatic mixed precision
(bfloat16 where the GPU supports it, else float16).

Where a ratio is above ``--profile-above`` (1.05), both models of the pair are profiled with
``torch.profiler`` and the operators whose self time differs most are printed: that is where
the book's block spends the time the reference saves.

Not part of ``make test``: timings depend on the machine and take a while.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import logging
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.autograd import DeviceType

ROOT = Path(__file__).resolve().parent.parent
# The worktree's module, not one installed from another folder.
sys.path.insert(0, str(ROOT / "notebooks"))

import cnnbook  # noqa: E402

OUT_DIR = ROOT / "notebooks" / "cnnbook" / "benchmarks"


def timm_cbam_resnet50(**kwargs: object) -> nn.Module:
    """timm has no ``cbam_resnet50``; its ResNet builds one from its CBAM attention layer,
    placed where SE goes (after the last BN of the residual branch), as the paper places it."""
    from timm.models.resnet import Bottleneck, ResNet

    return ResNet(
        block=Bottleneck, layers=(3, 4, 6, 3), block_args=dict(attn_layer="cbam"), **kwargs
    )


def timm_model(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False)

    return build


def torchvision_model(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return getattr(torchvision.models, name)()

    return build


# network: (the book's builder in cnnbook, the reference's name, the reference's builder)
PAIRS: dict[str, tuple[str, str, Callable[[], nn.Module]]] = {
    "ResNet-50": ("resnet50", "torchvision resnet50", torchvision_model("resnet50")),
    "ResNeXt-50": (
        "resnext50_32x4d",
        "torchvision resnext50_32x4d",
        torchvision_model("resnext50_32x4d"),
    ),
    "SE-ResNet-50": ("se_resnet50", "timm seresnet50", timm_model("seresnet50")),
    "SE-ResNeXt-50": (
        "se_resnext50_32x4d",
        "timm seresnext50_32x4d",
        timm_model("seresnext50_32x4d"),
    ),
    "SKNet-50": ("sknet50", "timm skresnext50_32x4d", timm_model("skresnext50_32x4d")),
    "ResNeSt-50": ("resnest50", "timm resnest50d", timm_model("resnest50d")),
    "CBAM-ResNet-50": ("cbam_resnet50", "timm resnet50 + cbam", timm_cbam_resnet50),
}

FIELDS = [
    "network",
    "reference",
    "setting",
    "batch",
    "size",
    "book_ms",
    "reference_ms",
    "ratio",
    "book_params",
    "reference_params",
]


class Autocast(nn.Module):
    """Runs ``model`` under CUDA automatic mixed precision and returns float32 logits."""

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.model = model
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", dtype=self.dtype):
            return self.model(x).float()


def settings(device: torch.device) -> list[str]:
    return ["fp32"] if device.type == "cpu" else ["fp32", "channels_last+amp"]


def prepare(
    model: nn.Module, x: torch.Tensor, setting: str
) -> tuple[nn.Module, torch.Tensor]:
    """The model and input for one setting: float32 as built, or channels-last with AMP."""
    if setting == "fp32":
        return model, x
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    model = model.to(memory_format=torch.channels_last)
    return Autocast(model, dtype), x.contiguous(memory_format=torch.channels_last)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"CUDA GPU: {torch.cuda.get_device_name(device)}"
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"CPU: {model}, {torch.get_num_threads()} threads"


def profile_pair(
    book: nn.Module, reference: nn.Module, x: torch.Tensor, steps: int = 3, top: int = 10
) -> None:
    """Print where the two models' training steps differ, operator by operator.

    The two are profiled in alternation, one step each in turn, so a slow spell of the
    machine falls on both. Operators called a different number of times are structural
    differences (the book does other or more work) and come first; then the operators
    whose self time differs most.
    """
    from torch.profiler import ProfilerActivity, profile

    # Kineto, the profiler's engine, logs its start and stop to stderr; above 5 it is silent.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    activities = [ProfilerActivity.CPU]
    if x.is_cuda:
        activities.append(ProfilerActivity.CUDA)
    # Operators only (events on the CPU side); on a GPU, the time of their kernels.
    attr = "self_device_time_total" if x.is_cuda else "self_cpu_time_total"
    totals: list[dict[str, list[float]]] = [{}, {}]
    for model in (book, reference):
        model(x).sum().backward()  # warm up outside the profile
    for _ in range(steps):
        for model, total in zip((book, reference), totals):
            with profile(activities=activities) as prof:
                model(x).sum().backward()
                if x.is_cuda:
                    torch.cuda.synchronize()
            for e in prof.key_averages():
                if e.device_type == DeviceType.CPU:
                    time_count = total.setdefault(e.key, [0.0, 0])
                    time_count[0] += getattr(e, attr) / steps / 1e3  # ms per step
                    time_count[1] += e.count
    ours, theirs = totals
    zero = [0.0, 0]

    def differs(key: str) -> bool:
        return ours.get(key, zero)[1] != theirs.get(key, zero)[1]

    def gap(key: str) -> float:
        return ours.get(key, zero)[0] - theirs.get(key, zero)[0]

    keys = sorted(set(ours) | set(theirs), key=lambda k: (not differs(k), -gap(k)))
    print(f"    {'operator':44s} {'book ms':>8s} {'calls':>5s} {'ref. ms':>8s} {'calls':>5s}")
    for key in keys[:top]:
        (t_ours, n_ours), (t_ref, n_ref) = ours.get(key, zero), theirs.get(key, zero)
        print(f"    {key[:44]:44s} {t_ours:8.2f} {n_ours // steps:5d} {t_ref:8.2f} "
              f"{n_ref // steps:5d}")
    total_ours = sum(t for t, _ in ours.values())
    total_ref = sum(t for t, _ in theirs.values())
    print(f"    {'all operators, per step':44s} {total_ours:8.2f} {'':5s} {total_ref:8.2f}")


def bench_device(args: argparse.Namespace, device: torch.device) -> Path:
    batch, size = (args.cuda_batch, args.cuda_size) if device.type == "cuda" else (
        args.batch,
        args.size,
    )
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    print(f"\n{device_name(device)}: batch {batch} at {size}x{size}, "
          f"min_run_time {args.min_run_time} s per model in {args.rounds} rounds")
    rows = []
    for network, (builder_name, reference_name, build_reference) in PAIRS.items():
        if args.only and network not in args.only:
            continue
        builder = getattr(cnnbook, builder_name)
        torch.manual_seed(0)
        book = builder().to(device)
        reference = build_reference().to(device)
        book_params = cnnbook.count_parameters(book)
        reference_params = cnnbook.count_parameters(reference)
        x = torch.randn(batch, 3, size, size, device=device)
        for setting in settings(device):
            book_s, x_s = prepare(book, x, setting)
            reference_s, _ = prepare(reference, x, setting)
            times = cnnbook.time_forward_backward(
                {"book": book_s, "reference": reference_s},
                x_s,
                min_run_time=args.min_run_time,
                rounds=args.rounds,
            )
            ratio = times["book"] / times["reference"]
            row = dict(
                network=network,
                reference=reference_name,
                setting=setting,
                batch=batch,
                size=size,
                book_ms=f"{times['book'] * 1e3:.2f}",
                reference_ms=f"{times['reference'] * 1e3:.2f}",
                ratio=f"{ratio:.3f}",
                book_params=book_params,
                reference_params=reference_params,
            )
            rows.append(row)
            flag = f"  <- above {args.profile_above}" if ratio > args.profile_above else ""
            print(f"  {network:15s} {setting:18s} book {row['book_ms']:>8s} ms, "
                  f"{reference_name} {row['reference_ms']:>8s} ms, "
                  f"ratio {ratio:.3f}{flag}")
            if book_params != reference_params:
                print(f"    note: {book_params:,} parameters against the reference's "
                      f"{reference_params:,}")
            if ratio > args.profile_above and not args.no_profile:
                profile_pair(book_s, reference_s, x_s)
        del book, reference
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return write_table(rows, device, batch, size, args)


def write_table(
    rows: list[dict[str, object]],
    device: torch.device,
    batch: int,
    size: int,
    args: argparse.Namespace,
) -> Path:
    import timm
    import torchvision

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{device.type}.csv"
    command = " ".join(["python tools/bench.py", *sys.argv[1:]])
    if len(sys.argv) == 1:
        command = f"make bench ({command})"
    header = [
        "The CNN Blocks Book: forward+backward time in training mode, the book's network "
        "against the reference library's (ratio = book / reference; below 1: the book is "
        "faster)",
        f"device: {device_name(device)}; load average {os.getloadavg()[0]:.1f} at the end, "
        f"on {os.cpu_count()} cores (higher: other programs shared the machine)",
        f"date: {datetime.date.today().isoformat()}",
        f"versions: torch {torch.__version__}, torchvision {torchvision.__version__}, "
        f"timm {timm.__version__}, Python {platform.python_version()}",
        f"command: {command}",
        f"timing: torch.utils.benchmark, the two models interleaved in {args.rounds} rounds "
        f"of {args.min_run_time / args.rounds:.2f} s each, median; batch {batch} at "
        f"{size}x{size}",
    ]
    with path.open("w", newline="") as f:
        for line in header:
            f.write(f"# {line}\n")
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path}")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="auto: the CPU, and a CUDA GPU too when one is present",
    )
    parser.add_argument("--batch", type=int, default=2, help="CPU batch size")
    parser.add_argument("--size", type=int, default=112, help="CPU image size")
    parser.add_argument("--cuda-batch", type=int, default=32, help="GPU batch size")
    parser.add_argument("--cuda-size", type=int, default=224, help="GPU image size")
    parser.add_argument("--min-run-time", type=float, default=3.0,
                        help="seconds of timing per model, split over the rounds")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--profile-above", type=float, default=1.05,
                        help="profile the pairs whose ratio is above this")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--only", nargs="*", choices=list(PAIRS), help="networks to time")
    parser.add_argument("--out", type=Path, default=OUT_DIR,
                        help="folder for DEVICE.csv (default: inside the package)")
    args = parser.parse_args()
    # torch.utils.benchmark imports cpp_extension, which warns on a CUDA build of PyTorch
    # without a CUDA runtime; it does not concern timing.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)

    devices = []
    if args.device in ("auto", "cpu"):
        devices.append(torch.device("cpu"))
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA GPU is available")
        devices.append(torch.device("cuda"))
    for device in devices:
        bench_device(args, device)


if __name__ == "__main__":
    main()
