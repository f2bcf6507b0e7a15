"""Time the book's networks against the reference libraries' implementations: ``make bench``.

Each of the book's seven 50-layer networks (saved in ``cnnbook`` by its chapter) is timed
against the same network as torchvision or timm builds it: one forward and backward pass in
training mode, on the same input, on the machine's CPU threads (``--threads``), the two models
interleaved in several rounds with ``torch.utils.benchmark`` (``cnnbook.time_forward_backward``),
so a slow spell of the machine falls on both alike. The ratio (book / reference; below 1 means
the book is faster) is the median of the rounds' ratios, given with their interquartile range
and count. The table is printed and written into the package,
``notebooks/cnnbook/benchmarks/DEVICE.csv``, where the closing chapter reads it (with
``importlib.resources``, so it is found from a clone and from an installed module alike). Its
header names the device, the date, the versions, the command, and the hash of the module's
code (``cnnbook.networks_hash``): the chapter refuses a table measured with other code.

On the CPU the networks run in float32, on a small input (2 images of 112x112, where launching
operators weighs) and in the papers' setting (224x224, a batch that keeps every core busy). On
a CUDA GPU they run at 224x224 in batches of 64 and 128, in float32 and in the setting a GPU
trains in, channels-last memory layout with automatic mixed precision (bfloat16 where the GPU
supports it, else float16).

Where a ratio is above ``--profile-above`` (1.05), both models of the pair are profiled with
``cnnbook.profile_step`` and the operators (and on a GPU the kernels) whose call counts or self
times differ most are printed: that is where the book's block spends the time the reference
saves. ``--control`` adds, for each network, the reference timed against a second instance of
itself: the ratio that measurement noise and the order of the two models alone give.

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
# The table records a hash of these networks' code, in the closing chapter's order.
BOOK_BUILDERS = [getattr(cnnbook, book) for book, _, _ in PAIRS.values()]

FIELDS = [
    "network",
    "reference",
    "setting",
    "batch",
    "size",
    "threads",
    "rounds",
    "book_ms",
    "reference_ms",
    "ratio",
    "ratio_iqr",
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


def batch_and_size(text: str) -> tuple[int, int]:
    """``"8x224"`` -> ``(8, 224)``: a batch of 8 images of 224x224."""
    try:
        batch, size = (int(n) for n in text.split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected BATCHxSIZE, got {text!r}") from None
    return batch, size


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
    return f"CPU: {model}"


def profile_pair(
    book: nn.Module, reference: nn.Module, x: torch.Tensor, steps: int = 3, top: int = 10
) -> None:
    """Print where the two models' training steps differ, operator by operator (and on
    a GPU, kernel by kernel).

    The two are profiled in alternation, one step each in turn, so a slow spell of the
    machine falls on both. Operators called a different number of times are structural
    differences (the book does other or more work) and come first; then the operators
    whose self time differs most.
    """
    totals: list[list[dict[str, list[float]]]] = [[{}, {}], [{}, {}]]
    for _ in range(steps):
        for model, total in zip((book, reference), totals):
            profiled = cnnbook.profile_step(model, x)
            for table, seen in zip(total, (profiled.operators, profiled.kernels)):
                for key, (ms, calls) in seen.items():
                    time_count = table.setdefault(key, [0.0, 0])
                    time_count[0] += ms / steps
                    time_count[1] += calls
    for what, ours, theirs in zip(("operator", "GPU kernel"), *totals):
        if ours or theirs:
            print_differences(what, ours, theirs, steps, top)


def print_differences(
    what: str,
    ours: dict[str, list[float]],
    theirs: dict[str, list[float]],
    steps: int,
    top: int,
) -> None:
    zero = [0.0, 0]

    def differs(key: str) -> bool:
        return ours.get(key, zero)[1] != theirs.get(key, zero)[1]

    def gap(key: str) -> float:
        return ours.get(key, zero)[0] - theirs.get(key, zero)[0]

    keys = sorted(set(ours) | set(theirs), key=lambda k: (not differs(k), -gap(k)))
    print(f"    {what:44s} {'book ms':>8s} {'calls':>5s} {'ref. ms':>8s} {'calls':>5s}")
    for key in keys[:top]:
        (t_ours, n_ours), (t_ref, n_ref) = ours.get(key, zero), theirs.get(key, zero)
        print(f"    {key[:44]:44s} {t_ours:8.2f} {int(n_ours) // steps:5d} {t_ref:8.2f} "
              f"{int(n_ref) // steps:5d}")
    total_ours = sum(t for t, _ in ours.values())
    total_ref = sum(t for t, _ in theirs.values())
    print(f"    {'all, per step':44s} {total_ours:8.2f} {'':5s} {total_ref:8.2f}")


def bench_device(args: argparse.Namespace, device: torch.device) -> Path:
    inputs = args.cuda_inputs if device.type == "cuda" else args.cpu_inputs
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    threads = args.threads or torch.get_num_threads()
    print(f"\n{device_name(device)}: inputs {', '.join(f'{b}x{s}' for b, s in inputs)}; "
          f"{args.min_run_time} s per model in {args.rounds} rounds, {threads} threads")
    rows = []
    for network, (builder_name, reference_name, build_reference) in PAIRS.items():
        if args.only and network not in args.only:
            continue
        torch.manual_seed(0)
        book = getattr(cnnbook, builder_name)().to(device)
        reference = build_reference().to(device)
        pairs = [(network, reference_name, book, reference)]
        if args.control:  # the reference against itself: noise and order alone
            pairs.append((f"{network} (A/A control)", reference_name,
                          build_reference().to(device), reference))
        for batch, size in inputs:
            x = torch.randn(batch, 3, size, size, device=device)
            for setting in settings(device):
                for name, ref_name, first, second in pairs:
                    rows.append(time_pair(args, name, ref_name, first, second, x,
                                          setting, threads))
            del x
        del book, reference, pairs
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return write_table(rows, device, threads, args)


def time_pair(
    args: argparse.Namespace,
    network: str,
    reference_name: str,
    book: nn.Module,
    reference: nn.Module,
    x: torch.Tensor,
    setting: str,
    threads: int,
) -> dict[str, object]:
    """Time one pair in one setting, print its row (and its profile where the book is
    slower), and return the row."""
    book_s, x_s = prepare(book, x, setting)
    reference_s, _ = prepare(reference, x, setting)
    times = cnnbook.time_forward_backward(
        {"book": book_s, "reference": reference_s},
        x_s,
        min_run_time=args.min_run_time,
        rounds=args.rounds,
        num_threads=threads,
    )
    ratio = times.ratio("book", "reference")
    book_params = cnnbook.count_parameters(book)
    reference_params = cnnbook.count_parameters(reference)
    row = dict(
        network=network,
        reference=reference_name,
        setting=setting,
        batch=len(x),
        size=x.shape[-1],
        threads=times.num_threads,
        rounds=ratio.n,
        book_ms=f"{times['book'] * 1e3:.2f}",
        reference_ms=f"{times['reference'] * 1e3:.2f}",
        ratio=f"{ratio.median:.3f}",
        ratio_iqr=f"{ratio.iqr:.3f}",
        book_params=book_params,
        reference_params=reference_params,
    )
    slower = ratio.median > args.profile_above
    flag = f"  <- above {args.profile_above}" if slower else ""
    print(f"  {network:15s} {setting:18s} {len(x):4d}x{x.shape[-1]} "
          f"book {row['book_ms']:>8s} ms, {reference_name} {row['reference_ms']:>8s} ms, "
          f"ratio {ratio}{flag}")
    if book_params != reference_params:
        print(f"    note: {book_params:,} parameters against the reference's "
              f"{reference_params:,}")
    if slower and not args.no_profile:
        profile_pair(book_s, reference_s, x_s)
    return row


def write_table(
    rows: list[dict[str, object]],
    device: torch.device,
    threads: int,
    args: argparse.Namespace,
) -> Path:
    import timm
    import torchvision

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{device.type}.csv"
    command = " ".join(["python tools/bench.py", *sys.argv[1:]])
    if len(sys.argv) == 1:
        command = f"make bench ({command})"
    tf32 = ""
    if device.type == "cuda":
        tf32 = f"; TF32 convolutions {'on' if torch.backends.cudnn.allow_tf32 else 'off'}"
    header = [
        "The CNN Blocks Book: forward+backward time in training mode, the book's network "
        "against the reference library's (ratio = book / reference; below 1: the book is "
        "faster)",
        f"device: {device_name(device)}; load average {os.getloadavg()[0]:.1f} at the end, "
        f"on {os.cpu_count()} cores (higher: other programs shared the machine){tf32}",
        f"date: {datetime.date.today().isoformat()}",
        f"versions: torch {torch.__version__}, torchvision {torchvision.__version__}, "
        f"timm {timm.__version__}, Python {platform.python_version()}",
        f"networks: {cnnbook.networks_hash(BOOK_BUILDERS)} (cnnbook.networks_hash(): "
        "SHA-256 of the networks' code, first 16 hex digits)",
        f"command: {command}",
        f"timing: torch.utils.benchmark on {threads} threads, the two models interleaved in "
        f"{args.rounds} rounds of {args.min_run_time / args.rounds:.2f} s each (at least one "
        "step after a warm-up step); book_ms, reference_ms: medians of the rounds; ratio: "
        "median of the rounds' ratios, ratio_iqr: their interquartile range",
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
    parser.add_argument("--cpu-inputs", type=batch_and_size, nargs="+",
                        default=[(2, 112), (8, 224)], metavar="BATCHxSIZE",
                        help="CPU inputs (default: 2x112 8x224)")
    parser.add_argument("--cuda-inputs", type=batch_and_size, nargs="+",
                        default=[(64, 224), (128, 224)], metavar="BATCHxSIZE",
                        help="GPU inputs (default: 64x224 128x224)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: torch.get_num_threads())")
    parser.add_argument("--min-run-time", type=float, default=10.0,
                        help="seconds of timing per model, split over the rounds")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--control", action="store_true",
                        help="also time each reference against a second instance of itself")
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
