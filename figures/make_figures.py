"""Draw the book's diagrams into figures/*.svg (run by `make figures`).

Each diagram is one function below; the chapters include the SVG files with a `{figure}`
directive. Plots of measured quantities are drawn inside the chapters instead, with the same
style file (notebooks/cnnbook/book.mplstyle), so the numbers they show are computed where they are used.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("svg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

HERE = Path(__file__).resolve().parent
# The style ships with the book's module, so that chapters find it wherever they run.
plt.style.use(HERE.parent / "notebooks" / "cnnbook" / "book.mplstyle")
PALETTE = plt.rcParams["axes.prop_cycle"].by_key()["color"]
PLAIN = "#E8EEF4"
PLUG = PALETTE[3]


def box(ax: plt.Axes, x: float, y: float, w: float, h: float, text: str,
        color: str = PLAIN, edge: str = "#333333", size: float = 9) -> None:
    """A rounded box with centred text; (x, y) is the centre."""
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h,
                                boxstyle="round,pad=0.02,rounding_size=0.08",
                                facecolor=color, edgecolor=edge, linewidth=1.2, zorder=3))
    ax.text(x, y, text, ha="center", va="center", fontsize=size, zorder=4)


def arrow(ax: plt.Axes, start: tuple[float, float], end: tuple[float, float],
          style: str = "-|>", **kwargs: object) -> None:
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle=style, mutation_scale=10,
                                 color="#333333", linewidth=1.2, shrinkA=0, shrinkB=0, **kwargs))


def resnet_skeleton(path: Path) -> None:
    """The ResNet skeleton (left) and the bottleneck with the book's plug points (right)."""
    fig, ax = plt.subplots(figsize=(10.5, 6.2))
    ax.set_xlim(0, 12.6)
    ax.set_ylim(0, 10.4)
    ax.set_axis_off()
    ax.grid(False)

    # Left: the skeleton, top to bottom.
    x = 2.2
    stages = [
        ("input image", "3 x 224 x 224", None),
        ("stem: 7x7 conv /2, BN, ReLU,\n3x3 max pool /2", "64 x 56 x 56", "stem_layer"),
        ("layer1: 3 blocks", "256 x 56 x 56", "block"),
        ("layer2: 4 blocks, first /2", "512 x 28 x 28", "block"),
        ("layer3: 6 blocks, first /2", "1024 x 14 x 14", "block"),
        ("layer4: 3 blocks, first /2", "2048 x 7 x 7", "block"),
        ("global average pool", "2048", None),
        ("fully connected", "1000", None),
    ]
    ys = [9.8 - i * 1.25 for i in range(len(stages))]
    for (label, shape, plug), y in zip(stages, ys):
        edge = PLUG if plug else "#333333"
        box(ax, x, y, 3.4, 0.8, label, edge=edge)
        ax.text(x + 1.85, y, shape, ha="left", va="center", fontsize=8, color="#444444")
        if plug:
            ax.text(x - 1.85, y, plug, ha="right", va="center", fontsize=8, color=PLUG)
    for y0, y1 in zip(ys, ys[1:]):
        arrow(ax, (x, y0 - 0.4), (x, y1 + 0.4))
    ax.text(x, 10.35, "ResNet(block, layers=[3, 4, 6, 3])", ha="center", fontsize=10, weight="bold")

    # Right: the bottleneck block.
    bx = 7.7
    ax.text(bx, 10.35, "Bottleneck(in_channels, channels, stride)", ha="center", fontsize=10,
            weight="bold")
    rows = [
        ("x", 9.7, None, None),
        ("1x1 conv, BN, ReLU", 8.7, None, None),
        ("3x3 conv (stride, groups), BN, ReLU", 7.5, "SKConv, SplitAttention", "groups: ResNeXt"),
        ("1x1 conv (x4 channels), BN", 6.3, None, None),
        ("attn_layer", 5.1, "SEBlock / CBAM", None),
        ("+", 3.9, None, None),
        ("ReLU", 2.9, None, None),
    ]
    for label, y, note, note2 in rows:
        if label == "x":
            ax.text(bx, y, "input x", ha="center", va="center", fontsize=9)
            continue
        if label == "+":
            ax.add_patch(plt.Circle((bx, y), 0.25, facecolor="white", edgecolor="#333333", linewidth=1.2))
            ax.text(bx, y, "+", ha="center", va="center", fontsize=12)
            continue
        edge = PLUG if note else "#333333"
        box(ax, bx, y, 3.3, 0.7, label, edge=edge, size=8.5)
        if note:
            ax.text(bx + 1.75, y + (0.12 if note2 else 0), note, ha="left", va="center",
                    fontsize=8, color=PLUG)
        if note2:
            ax.text(bx + 1.75, y - 0.45, note2, ha="left", va="center", fontsize=8, color=PLUG)
    chain = [9.5, 8.7, 7.5, 6.3, 5.1]
    for y0, y1 in zip(chain, chain[1:]):
        arrow(ax, (bx, y0 - (0.2 if y0 == 9.5 else 0.35)), (bx, y1 + 0.35))
    arrow(ax, (bx, 5.1 - 0.35), (bx, 3.9 + 0.25))
    arrow(ax, (bx, 3.9 - 0.25), (bx, 2.9 + 0.35))
    arrow(ax, (bx, 2.9 - 0.35), (bx, 2.1))
    ax.text(bx, 1.95, "output: (B, 4 x channels, H / stride, W / stride)", ha="center", va="top", fontsize=8)
    # The shortcut: identity, or the downsample_layer in the first block of a stage.
    sx = 11.9
    ax.plot([bx + 0.45, sx, sx], [9.7, 9.7, 3.9], color="#333333", linewidth=1.2)
    arrow(ax, (sx, 3.9), (bx + 0.25, 3.9))
    box(ax, sx, 6.3, 1.15, 1.3, "shortcut:\nidentity or\n1x1 conv /s,\nBN", edge=PLUG, size=7.5)
    ax.text(sx, 5.5, "downsample_layer", ha="center", va="top", fontsize=8, color=PLUG)

    fig.savefig(path, metadata={"Date": None})
    plt.close(fig)


def resnext_forms(path: Path) -> None:
    """The three equivalent forms of the ResNeXt-50 block of stage 1 (Fig. 3 of Xie et al., 2017).

    Boxes read "input channels, kernel, output channels", as in the paper; BN and ReLU after
    each convolution are left out, as there.
    """
    fig, ax = plt.subplots(figsize=(11.5, 6.6))
    ax.set_xlim(0, 15.4)
    ax.set_ylim(1.6, 10.6)
    ax.set_aspect("equal")
    ax.set_axis_off()
    ax.grid(False)
    top, bus, add_y = 9.7, 9.05, 3.0
    rows = [8.2, 7.0, 5.8]

    def plus(x: float, y: float) -> None:
        ax.add_patch(plt.Circle((x, y), 0.22, facecolor="white", edgecolor="#333333",
                                linewidth=1.2, zorder=3))
        ax.text(x, y, "+", ha="center", va="center", fontsize=11, zorder=4)

    def residual(x_in: float, x_add: float, x_side: float) -> None:
        """Input text, shortcut down the side, the addition and the output."""
        ax.text(x_in, top + 0.05, "256-d in", ha="center", va="bottom", fontsize=8.5)
        ax.plot([x_in, x_side, x_side], [top - 0.05, top - 0.05, add_y], color="#333333",
                linewidth=1.2)
        arrow(ax, (x_side, add_y), (x_add + 0.22, add_y))
        plus(x_add, add_y)
        arrow(ax, (x_add, add_y - 0.22), (x_add, add_y - 0.75))
        ax.text(x_add, add_y - 0.8, "256-d out", ha="center", va="top", fontsize=8.5)

    def fan_out(x_in: float, xs: list[float]) -> None:
        """The input runs down to a bus that feeds the top box of every path."""
        ax.plot([x_in, x_in], [top - 0.05, bus], color="#333333", linewidth=1.2)
        ax.plot([xs[0], xs[-1]], [bus, bus], color="#333333", linewidth=1.2)
        for x, name in zip(xs, ["path 1", "path 2", "path 32"]):
            arrow(ax, (x, bus), (x, rows[0] + 0.3))
            ax.text(x + 0.08, (bus + rows[0] + 0.3) / 2, name, ha="left", va="center",
                    fontsize=7, color="#444444")

    def column(x: float, labels: list[str], grouped_row: int | None = None) -> None:
        for i, (label, y) in enumerate(zip(labels, rows)):
            edge = PLUG if i == grouped_row else "#333333"
            width = 1.05 if len(label) <= 12 else 1.4 if len(label) <= 14 else 2.6
            box(ax, x, y, width, 0.6, label, edge=edge, size=7.5)
            if i:
                arrow(ax, (x, rows[i - 1] - 0.3), (x, y + 0.3))

    # (a) split, transform, merge: 32 paths of three convolutions, summed.
    xa = [0.8, 2.05, 3.9]
    x_a = 2.35
    ax.text(x_a, 10.55, "(a) aggregated transformations", ha="center", va="top",
            fontsize=10, weight="bold")
    fan_out(x_a, xa)
    for x in xa:
        column(x, ["256, 1x1, 4", "4, 3x3, 4", "4, 1x1, 256"])
        arrow(ax, (x, rows[-1] - 0.3), (x_a, 4.3 + 0.22))
    ax.text(2.98, rows[1], "...", ha="center", va="center", fontsize=12)
    plus(x_a, 4.3)
    ax.text(x_a + 0.35, 4.3, "sum of 32", ha="left", va="center", fontsize=7.5)
    arrow(ax, (x_a, 4.3 - 0.22), (x_a, add_y + 0.22))
    residual(x_a, x_a, 4.85)

    # (b) early concatenation: 32 paths of two convolutions, concatenated, one 1x1.
    xb = [6.0, 7.25, 9.1]
    x_b = 7.55
    ax.text(x_b, 10.55, "(b) early concatenation", ha="center", va="top", fontsize=10,
            weight="bold")
    fan_out(x_b, xb)
    for x in xb:
        column(x, ["256, 1x1, 4", "4, 3x3, 4"])
        arrow(ax, (x, rows[1] - 0.3), (x_b, rows[2] + 0.3))
    ax.text(8.18, rows[1], "...", ha="center", va="center", fontsize=12)
    box(ax, x_b, rows[2], 2.6, 0.6, "concatenate: 128", size=7.5)
    box(ax, x_b, 4.35, 1.4, 0.6, "128, 1x1, 256", size=7.5)
    arrow(ax, (x_b, rows[2] - 0.3), (x_b, 4.35 + 0.3))
    arrow(ax, (x_b, 4.35 - 0.3), (x_b, add_y + 0.22))
    residual(x_b, x_b, 10.05)

    # (c) grouped convolution: one column, the 3x3 with 32 groups.
    xc = 12.6
    ax.text(xc, 10.55, "(c) grouped convolution", ha="center", va="top", fontsize=10,
            weight="bold")
    arrow(ax, (xc, top - 0.05), (xc, rows[0] + 0.3))
    column(xc, ["256, 1x1, 128", "128, 3x3, 128, groups = 32", "128, 1x1, 256"],
           grouped_row=1)
    ax.text(xc, rows[1] - 0.36, "32 groups of 4 channels", ha="center", va="top", fontsize=7,
            color=PLUG, bbox=dict(facecolor="white", edgecolor="none", pad=0.5), zorder=5)
    arrow(ax, (xc, rows[2] - 0.3), (xc, add_y + 0.22))
    residual(xc, xc, 14.6)

    # The forms compute the same function.
    for x in (5.3, 10.45):
        ax.text(x, 6.4, "=", ha="center", va="center", fontsize=22, color="#444444")

    fig.savefig(path, metadata={"Date": None})
    plt.close(fig)


def sk_convolution(path: Path) -> None:
    """Split, fuse and select of the selective kernel convolution (Fig. 1 of Li et al., 2019).

    Drawn for M = 2 paths on the first stage of SKNet-50: 128 channels, 32 groups, d = 32.
    """
    fig, ax = plt.subplots(figsize=(10.5, 4.6))
    ax.set_xlim(0, 15.2)
    ax.set_ylim(0, 6.6)
    ax.set_axis_off()
    ax.grid(False)
    top, bottom, mid = 4.6, 1.6, 3.1

    # Three shaded phases.
    for x0, x1, label in ((1.2, 5.6, "Split"), (5.6, 10.35, "Fuse"), (10.35, 15.1, "Select")):
        ax.add_patch(plt.Rectangle((x0, 0.25), x1 - x0 - 0.1, 5.9, facecolor="#F6F6F6",
                                   edgecolor="none", zorder=0))
        ax.text((x0 + x1) / 2, 6.35, label, ha="center", va="center", fontsize=11,
                weight="bold")

    def plus(x: float, y: float, sign: str = "+") -> None:
        ax.add_patch(plt.Circle((x, y), 0.22, facecolor="white", edgecolor="#333333",
                                linewidth=1.2, zorder=3))
        ax.text(x, y, sign, ha="center", va="center", fontsize=11, zorder=4)

    # Input and the two paths.
    ax.text(0.55, mid, "X\n128 x H x W", ha="center", va="center", fontsize=9)
    ax.plot([1.1, 1.45, 1.45], [mid, mid, top], color="#333333", linewidth=1.2)
    ax.plot([1.45, 1.45], [mid, bottom], color="#333333", linewidth=1.2)
    arrow(ax, (1.45, top), (1.75, top))
    arrow(ax, (1.45, bottom), (1.75, bottom))
    box(ax, 3.3, top, 3.1, 0.9, "3x3 conv, 32 groups\nBN, ReLU", edge=PALETTE[0], size=8.5)
    box(ax, 3.3, bottom, 3.1, 0.9, "3x3 conv, dilation 2 (5x5 field)\n32 groups, BN, ReLU",
        edge=PALETTE[1], size=8)
    ax.text(5.05, top + 0.3, "U1", ha="left", va="bottom", fontsize=9, color=PALETTE[0])
    ax.text(5.05, bottom - 0.3, "U2", ha="left", va="top", fontsize=9, color=PALETTE[1])

    # Fuse: sum, pool, fc.
    arrow(ax, (4.85, top), (6.0, top))
    arrow(ax, (4.85, bottom), (6.0, bottom))
    ax.plot([6.0, 6.2, 6.2], [top, top, mid + 0.22], color="#333333", linewidth=1.2)
    ax.plot([6.0, 6.2, 6.2], [bottom, bottom, mid - 0.22], color="#333333", linewidth=1.2)
    plus(6.2, mid)
    ax.text(6.35, mid + 0.2, "U", ha="left", va="bottom", fontsize=9)
    arrow(ax, (6.42, mid), (6.75, mid))
    box(ax, 7.45, mid, 1.3, 0.9, "global\navg pool", size=8.5)
    ax.text(7.45, mid - 0.6, "s: 128", ha="center", va="top", fontsize=8, color="#444444")
    arrow(ax, (8.1, mid), (8.45, mid))
    box(ax, 9.3, mid, 1.55, 0.9, "fc 128 -> 32\nBN, ReLU", size=8.5)
    ax.text(9.3, mid - 0.6, "z: d = 32", ha="center", va="top", fontsize=8, color="#444444")

    # Select: two fc heads, softmax across paths, weighted sum.
    arrow(ax, (10.08, mid), (10.55, mid))
    box(ax, 11.35, mid, 1.5, 1.5, "fc 32 -> 2 x 128\nsoftmax\nacross paths\n(per channel)",
        edge=PLUG, size=8)
    ax.plot([11.35, 11.35], [mid + 0.75, top], color="#333333", linewidth=1.2)
    ax.plot([11.35, 11.35], [mid - 0.75, bottom], color="#333333", linewidth=1.2)
    ax.text(11.5, top + 0.12, "a", ha="left", va="bottom", fontsize=9, color=PALETTE[0])
    ax.text(11.5, bottom - 0.12, "b = 1 - a", ha="left", va="top", fontsize=9,
            color=PALETTE[1])
    # U1 and U2 travel along the top and bottom to their products.
    ax.plot([6.0, 6.0], [top, 5.55], color=PALETTE[0], linewidth=1.0, linestyle="--")
    ax.plot([6.0, 12.6, 12.6], [5.55, 5.55, top + 0.22], color=PALETTE[0], linewidth=1.0,
            linestyle="--")
    ax.plot([6.0, 6.0], [bottom, 0.65], color=PALETTE[1], linewidth=1.0, linestyle="--")
    ax.plot([6.0, 12.6, 12.6], [0.65, 0.65, bottom - 0.22], color=PALETTE[1], linewidth=1.0,
            linestyle="--")
    plus(12.6, top, "x")
    plus(12.6, bottom, "x")
    arrow(ax, (11.35, top), (12.38, top))
    arrow(ax, (11.35, bottom), (12.38, bottom))
    ax.plot([12.82, 13.4, 13.4], [top, top, mid + 0.22], color="#333333", linewidth=1.2)
    ax.plot([12.82, 13.4, 13.4], [bottom, bottom, mid - 0.22], color="#333333", linewidth=1.2)
    plus(13.4, mid)
    arrow(ax, (13.62, mid), (13.95, mid))
    ax.text(14.55, mid, "V\n128 x H x W", ha="center", va="center", fontsize=9)

    fig.savefig(path, metadata={"Date": None})
    plt.close(fig)


def se_block(path: Path) -> None:
    """The SE block (Hu et al., 2018): squeeze, excitation and scale, with the shape of the
    tensor under each arrow."""
    boxes = [  # label, group (colour)
        ("$U$\n$C{\\times}H{\\times}W$", "data"), ("global\navg pool", "squeeze"),
        ("FC\n$C \\to C/r$", "excite"), ("ReLU", "excite"),
        ("FC\n$C/r \\to C$", "excite"), ("sigmoid", "excite"),
        ("$\\times$\nscale", "scale"), ("$\\tilde{X}$\n$C{\\times}H{\\times}W$", "data")]
    # The shape each arrow carries, from the arrow after box 0 to the last one.
    shapes = ["$C{\\times}H{\\times}W$", "$C{\\times}1{\\times}1$",
              "$C/r{\\times}1{\\times}1$", "$C/r{\\times}1{\\times}1$",
              "$C{\\times}1{\\times}1$", "$s$: $C{\\times}1{\\times}1$",
              "$C{\\times}H{\\times}W$"]
    colours = {"data": PALETTE[7], "squeeze": PALETTE[0], "excite": PALETTE[1],
               "scale": PALETTE[2]}
    fig, ax = plt.subplots(figsize=(8, 2.1))
    ax.grid(False)
    step, width, height = 1.5, 1.15, 0.9
    for i, (label, group) in enumerate(boxes):
        colour = colours[group]
        ax.add_patch(FancyBboxPatch((i * step, 0), width, height, alpha=0.25,
                                    boxstyle="round,pad=0.03", facecolor=colour,
                                    edgecolor=colour))
        ax.text(i * step + width / 2, height / 2, label, ha="center", va="center",
                fontsize=10)
    for i, shape in enumerate(shapes):
        arrow(ax, (i * step + width, height / 2), ((i + 1) * step, height / 2))
        ax.text(i * step + (step + width) / 2, -0.15, shape, ha="center", va="top",
                fontsize=8.5)
    # U also goes to the scale: the weights multiply the map they came from.
    top, u_centre, scale_centre = height + 0.45, width / 2, 6 * step + width / 2
    ax.plot([u_centre, u_centre, scale_centre], [height + 0.05, top, top],
            color="#333333", linewidth=1.2)
    arrow(ax, (scale_centre, top), (scale_centre, height + 0.05))
    groups = [(1, 1, "squeeze"), (2, 5, "excitation"), (6, 6, "scale")]
    for first, last, name in groups:
        colour = colours["excite" if name == "excitation" else name]
        left, right = first * step, last * step + width
        ax.plot([left, left, right, right], [-0.6, -0.7, -0.7, -0.6], color=colour)
        ax.text((left + right) / 2, -0.8, name, ha="center", va="top", color=colour,
                fontsize=10)
    ax.set_xlim(-0.1, len(boxes) * step)
    ax.set_ylim(-1.15, top + 0.1)
    ax.set_aspect("equal")
    ax.axis("off")
    fig.savefig(path, metadata={"Date": None})
    plt.close(fig)


def cbam_modules(path: Path) -> None:
    """CBAM's channel attention (top) and spatial attention (bottom), after Fig. 2 of
    Woo et al. (2018), as the CBAM chapter builds them."""
    fig, ax = plt.subplots(figsize=(9.6, 4.4))
    ax.set_xlim(0, 12)
    ax.set_ylim(0, 5.6)
    ax.set_axis_off()
    ax.grid(False)
    attention = "#F6D8C4"  # the layers that compute the maps

    def skip(y: float) -> None:
        """The input's path around the row, from its box to the product."""
        ax.plot([0.8, 0.8, 9.5], [y + 0.4, y + 1.05, y + 1.05], color="#333333", lw=1.2)
        arrow(ax, (9.5, y + 1.05), (9.5, y + 0.25))

    def row(y: float, title: str, boxes: list[tuple[float, float, float, str]],
            join: list[tuple[float, float]]) -> None:
        """A row: its title, the input's two pools, ``boxes`` and the arrows of ``join``."""
        ax.text(0.1, y + 1.25, title, fontsize=10, weight="bold")
        for x, w, h, text in boxes:
            learned = any(word in text for word in ("MLP", "conv", "sigmoid"))
            color = attention if learned else PLAIN
            box(ax, x, y, w, h, text, color=color, size=8.5)
        for dy in (0.55, -0.55):
            arrow(ax, (1.4, y), (1.85, y + dy))
        for x0, x1 in join:
            arrow(ax, (x0, y), (x1, y))
        skip(y)

    y = 4.1
    box(ax, 2.7, y + 0.55, 1.7, 0.6, "avg pool (H, W)\nC x 1 x 1", size=8.5)
    box(ax, 2.7, y - 0.55, 1.7, 0.6, "max pool (H, W)\nC x 1 x 1", size=8.5)
    for dy in (0.55, -0.55):
        arrow(ax, (3.55, y + dy), (4.05, y + dy * 0.5))
        arrow(ax, (5.95, y + dy * 0.5), (6.35, y + dy * 0.2))
    row(y, "channel attention",
        [(0.8, 1.2, 0.8, "F\nC x H x W"), (5.0, 1.9, 1.0, "shared MLP\nC -> C/r -> C"),
         (6.6, 0.5, 0.5, "+"), (8.0, 1.5, 0.8, "sigmoid\nM_c: C x 1 x 1"),
         (9.5, 0.5, 0.5, "x"), (11.0, 1.3, 0.8, "F'\nC x H x W")],
        [(6.85, 7.25), (8.75, 9.25), (9.75, 10.35)])

    y = 1.3
    box(ax, 2.7, y + 0.55, 1.7, 0.6, "mean over C\n1 x H x W", size=8.5)
    box(ax, 2.7, y - 0.55, 1.7, 0.6, "max over C\n1 x H x W", size=8.5)
    for dy in (0.55, -0.55):
        arrow(ax, (3.55, y + dy), (4.05, y + dy * 0.4))
    row(y, "spatial attention",
        [(0.8, 1.2, 0.8, "F'\nC x H x W"), (4.6, 1.1, 0.8, "concat\n2 x H x W"),
         (6.2, 1.5, 0.8, "7x7 conv, BN\n1 x H x W"),
         (8.0, 1.5, 0.8, "sigmoid\nM_s: 1 x H x W"), (9.5, 0.5, 0.5, "x"),
         (11.0, 1.3, 0.8, "F''\nC x H x W")],
        [(5.15, 5.45), (6.95, 7.25), (8.75, 9.25), (9.75, 10.35)])

    fig.savefig(path, metadata={"Date": None})
    plt.close(fig)


def main() -> None:
    resnet_skeleton(HERE / "resnet_skeleton.svg")
    resnext_forms(HERE / "resnext_forms.svg")
    sk_convolution(HERE / "sk_convolution.svg")
    se_block(HERE / "se_block.svg")
    cbam_modules(HERE / "cbam_modules.svg")


if __name__ == "__main__":
    main()
