"""Data positions across a change of world size or DataLoader workers (elastic resume): within an epoch every
good sample is trained on once, none twice, however often the layout changes mid-epoch."""

from __future__ import annotations

from collections import Counter
from itertools import islice

import pytest

from r2d2ds.config import DataConfig
from r2d2ds.data import TrainStream
from r2d2ds.data.shards import remap_positions


def _cfg(train: str, workers: int) -> DataConfig:
    return DataConfig(train=train, image_size=32, micro_batch=4, shuffle_buffer=16, max_text_len=16,
                      num_workers=workers)


def _good_keys(synth_dir, tok) -> Counter:
    one = TrainStream(DataConfig(train=str(synth_dir), image_size=32, micro_batch=1, shuffle_buffer=0,
                                 max_text_len=16), tok, max_epochs=1)
    return Counter(k for b in one for k in b["key"])


def _run(synth_dir, tok, phases, epochs: int) -> tuple[Counter, int]:
    """Train through `phases` of (world, workers, batches per rank; None: to the end), every rank taking the
    same number of batches as lock-step training does; each phase resumes from every rank's saved state."""
    seen: Counter = Counter()
    tail = 0
    states: list[dict] | None = None
    for world, workers, batches in phases:
        cfg = _cfg(str(synth_dir), workers)
        saved = []
        for rank in range(world):
            stream = TrainStream(cfg, tok, rank=rank, world=world, seed=3, max_epochs=epochs)
            if states is not None:
                mine = next((s for s in states if s["rank"] == rank), states[0])
                stream.load_state_dict(mine, all_states=states)
            for batch in islice(stream, batches):
                seen.update(batch["key"])
            saved.append(stream.state_dict())
            tail += stream.tail_dropped
        states = saved
    return seen, tail


@pytest.mark.parametrize("phases", [
    [(2, 2, 7), (1, 1, 9), (2, 2, None)],  # the 2 -> 1 -> 2 ranks, workers changing too
    [(1, 2, 5), (3, 0, 4), (2, 1, 6), (1, 0, None)],
])
def test_layout_changes_mid_epoch_cover_the_epoch_once(synth_dir, synth_tokenizer, phases):
    good = _good_keys(synth_dir, synth_tokenizer)
    seen, tail = _run(synth_dir, synth_tokenizer, phases, epochs=1)
    assert set(seen) <= set(good)
    assert max(seen.values()) == 1, [k for k, n in seen.items() if n > 1][:5]  # nothing twice
    assert sum(seen.values()) + tail == len(good)  # nothing skipped (a slot's last partial batch is the tail)


def test_layout_change_while_slots_are_in_different_epochs(synth_dir, synth_tokenizer):
    # 6 shards over 4 slots: slots of 40 samples reach epoch 1 while slots of 80 are still in epoch 0. The epoch
    # 1 streams those have not started must still be read (under the old layout) after the change.
    good = _good_keys(synth_dir, synth_tokenizer)
    seen, tail = _run(synth_dir, synth_tokenizer, [(2, 2, 24), (1, 1, 10), (2, 1, None)], epochs=2)
    assert set(seen) == set(good)
    assert max(seen.values()) == 2  # each epoch once
    assert sum(seen.values()) + tail == 2 * len(good)


def test_remap_deals_the_remainders_evenly_and_continues_after_the_newest_epoch():
    def state(rank, slots):
        return {"world": 2, "rank": rank, "num_workers": 2, "seed": 0, "shuffle_buffer": 8, "resampled": False,
                "num_shards": 6, "slots": slots}
    states = [state(0, [[0, 5, 1], [1, 3, 1]]), state(1, [[0, 9, 2], [0, 0, 0]])]  # older [epoch, consumed, b]
    one = remap_positions(states, rank=0, world=1, workers=2)
    segs = sorted(seg for s in one for seg in s["segments"])
    # the four epoch-0 streams (base slots 0-3 of 4) from where they stopped, and slot 1's epoch 0 is done,
    # its epoch 1 is started: the epoch-1 streams of the other three slots are still to be read
    assert [seg for seg in segs if seg[0] == 0] == [[0, 4, 0, 5], [0, 4, 2, 9], [0, 4, 3, 0]]
    assert [seg for seg in segs if seg[0] == 1] == [[1, 4, 0, 0], [1, 4, 1, 3], [1, 4, 2, 0], [1, 4, 3, 0]]
    assert all(s["next_epoch"] == 2 for s in one)
    two = [remap_positions(states, rank=r, world=2, workers=1) for r in range(2)]
    counts = [len(s["segments"]) for r in two for s in r]
    assert sum(counts) == 7 and max(counts) - min(counts) <= 1
