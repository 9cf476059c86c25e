"""What the pipeline tests share: a directory input of short texts."""

from __future__ import annotations

import pytest

from pipelines import sources


@pytest.fixture
def text_inventory(tmp_path):
    """`text_inventory(n)`: a directory input of `n` short texts, opened."""

    def make(n: int) -> sources.Inventory:
        media = tmp_path / "media"
        media.mkdir(exist_ok=True)
        for i in range(n):
            (media / f"{i:02d}.txt").write_text(f"note number {i}")
        return sources.open_input(str(media), str(tmp_path / "staging"))

    return make
