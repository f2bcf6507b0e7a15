"""``cnnbook.time_forward_backward`` reports seconds per pass in every round.

The chapters print its ratios and do not assert them (they depend on the machine), so
a wrong count of passes in one round would go unseen there. A module that sleeps a
known time per pass gives a timing with a floor that no machine can beat.
"""

from __future__ import annotations

import time

import cnnbook
import torch
from torch import nn


class Sleeper(nn.Module):
    """A pass through this module takes at least ``seconds``."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds
        self.weight = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.seconds)
        return x * self.weight


def test_every_round_is_seconds_per_pass() -> None:
    # 1 ms: blocked_autorange times blocks of 10 or more passes, so a round that
    # reported a block instead of a pass would be 10 times too long.
    models = {"1 ms": Sleeper(0.001), "4 ms": Sleeper(0.004)}
    timings = cnnbook.time_forward_backward(
        models, torch.ones(1), min_run_time=0.4, rounds=4, num_threads=1
    )
    for name, model in models.items():
        rounds = timings.rounds[name]
        assert len(rounds) == 4
        # sleep() never wakes early; late wake-ups on a busy machine average out
        # over a block, far below a second pass per pass.
        assert all(model.seconds <= t < 2 * model.seconds + 0.002 for t in rounds), (
            name,
            rounds,
        )
    ratio = timings.ratio("4 ms", "1 ms")
    assert ratio.n == 4 and 1.5 < ratio.median < 4.5
