"""Every chapter keeps its tensors on the device it chose, checked without a GPU.

A chapter picks ``device`` once (``choose_device``) and must create every tensor there or move
it explicitly; a CPU tensor that meets a GPU tensor fails only on a GPU, which CI does not
have. This test runs each chapter with ``CNNBOOK_DEVICE=meta``: PyTorch's ``meta`` device
keeps shapes and dtypes but no values, and it refuses to mix with the CPU just as CUDA does.
Reading a value out of a meta tensor (``item``, ``numpy``, ``cpu``, ...) gives ones instead of
failing, so that a chapter runs on as far as it can; the checks on values then fail, and those
failures are ignored. What fails the test is an error that says two devices met.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import jupytext
import nbclient
import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
CHAPTERS = sorted((ROOT / "notebooks").glob("*.md"))

# Errors that mean a tensor of one device met a tensor of another.
MIXED_DEVICES = re.compile(
    r"is not on the expected device|Expected all tensors to be on the same device"
    r"|found at least two devices|attribute 'device' do not match"
)

# Run before the chapter: values read out of a meta tensor become ones, and each cell stops
# after its first OPERATIONS_PER_CELL PyTorch calls, since a training loop or a gradcheck only
# repeats the placements of its first steps, and would take minutes on the meta device.
OPERATIONS_PER_CELL = 5_000
FAKE_VALUES = f"OPERATIONS_PER_CELL = {OPERATIONS_PER_CELL}\n" + '''
import numpy as _np
import torch as _torch
from torch.overrides import TorchFunctionMode as _Mode


def _ones(t, device="cpu"):
    return _torch.ones(t.shape, dtype=t.dtype, device=device)


class _EnoughForThisCell(Exception):
    """A cell's first operations show how it places its tensors: the rest repeat them."""


class _FakeMetaValues(_Mode):
    calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        _FakeMetaValues.calls += 1
        if _FakeMetaValues.calls > OPERATIONS_PER_CELL:
            raise _EnoughForThisCell
        this = args[0] if args else None
        if isinstance(this, _torch.Tensor) and this.is_meta:
            T = _torch.Tensor
            if func is T.__bool__:
                return True
            if func in (T.item, T.__float__, T.__int__, T.__index__):
                return 1.0 if this.dtype.is_floating_point else 1
            if func is T.tolist:
                return _ones(this).tolist()
            if func in (T.numpy, T.__array__):
                return _np.ones(tuple(this.shape), dtype=_ones(this).numpy().dtype)
            if func is T.cpu:
                return _ones(this)
            if func is T.__format__:
                return format(1.0, *args[1:])
            if func is T.to:
                target = [a for a in list(args[1:]) + [kwargs.get("device")]
                          if isinstance(a, (str, _torch.device))]
                if target and _torch.device(target[0]).type == "cpu":
                    return _ones(this).to(*args[1:], **kwargs)
        if func is _torch.Tensor.copy_ and len(args) > 1:
            source = args[1]
            if isinstance(source, _torch.Tensor) and source.is_meta and not this.is_meta:
                return this.fill_(1)
        return func(*args, **kwargs)


def _reset(*args):
    _FakeMetaValues.calls = 0


get_ipython().events.register("pre_run_cell", _reset)
_FakeMetaValues().__enter__()
'''


@pytest.mark.parametrize("chapter", CHAPTERS, ids=[c.stem for c in CHAPTERS])
def test_chapter_keeps_its_device(chapter: Path, tmp_path: Path) -> None:
    notebook = jupytext.read(chapter)
    notebook.cells.insert(0, nbformat.v4.new_code_cell(FAKE_VALUES))
    env = dict(os.environ, CNNBOOK_DEVICE="meta")
    client = nbclient.NotebookClient(
        notebook,
        timeout=300,
        kernel_name="python3",
        allow_errors=True,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute(env=env)
    mixed = [
        f"cell {index}: {output['ename']}: {output['evalue'][:200]}"
        for index, cell in enumerate(notebook.cells)
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        if output.get("output_type") == "error"
        and MIXED_DEVICES.search(output.get("evalue", ""))
    ]
    assert not mixed, "tensors on two devices met:\n" + "\n".join(mixed)
