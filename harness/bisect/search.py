"""The bisection itself, as `git bisect` does it on a line of commits: the first bad commit lies after the last good
one and at or before the first bad one; the next commit to try is the untried one nearest the middle of that
stretch; a skipped commit is stepped around, and when only skipped ones are left the answer is that stretch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Mark = Literal["good", "bad", "skip"]


@dataclass
class Search:
    n: int  # positions 0 (the good end) .. n-1 (the bad end)
    marks: dict[int, Mark] = field(default_factory=dict)

    def mark(self, i: int, mark: Mark) -> None:
        if not 0 <= i < self.n:
            raise IndexError(i)
        self.marks[i] = mark

    def stretch(self) -> tuple[int, int]:
        """(last good before the first bad, first bad)."""
        hi = min((i for i, m in self.marks.items() if m == "bad"), default=self.n - 1)
        lo = max((i for i, m in self.marks.items() if m == "good" and i < hi), default=0)
        return lo, hi

    def next(self) -> int | None:
        """The untried position nearest the stretch's middle (the lower of two), or None when the stretch is done."""
        lo, hi = self.stretch()
        untried = [i for i in range(lo + 1, hi) if i not in self.marks]
        return min(untried, key=lambda i: (abs(2 * i - lo - hi), i)) if untried else None

    def first_bad(self) -> list[int]:
        """The first bad position, or every position it could be when skipped ones hide it (oldest first)."""
        lo, hi = self.stretch()
        return [i for i in range(lo + 1, hi + 1) if self.marks.get(i) == "skip" or i == hi]

    def most_steps(self) -> int:
        """Steps between the ends a bisection without skips takes at most: ceil(log2(positions after good))."""
        return max(0, (self.n - 2).bit_length())
