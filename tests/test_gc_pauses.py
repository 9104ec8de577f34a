"""The collector off the serving path: start-up objects frozen, long collections logged."""
import gc
import logging

import pytest

from pearl_runtime import gc_pauses


@pytest.fixture
def unfrozen():
    yield
    gc.unfreeze()


def test_freeze_takes_the_start_up_heap_out_of_collections(unfrozen, monkeypatch, caplog):
    monkeypatch.delenv("PEARL_GC_FREEZE", raising=False)
    junk = [[i] for i in range(1000)]   # alive now, so frozen with the rest
    with caplog.at_level(logging.INFO, logger="pearl_runtime.gc_pauses"):
        frozen = gc_pauses.freeze()
    assert frozen > len(junk) and gc.get_freeze_count() > len(junk)
    walked = {id(o) for o in gc.get_objects(generation=2)}   # what a full collection visits
    assert not any(id(x) in walked for x in junk)
    assert "froze" in caplog.text


def test_freeze_can_be_turned_off(unfrozen, monkeypatch, caplog):
    monkeypatch.setenv("PEARL_GC_FREEZE", "0")
    gc.unfreeze()
    with caplog.at_level(logging.INFO, logger="pearl_runtime.gc_pauses"):
        assert gc_pauses.freeze() == 0
    assert gc.get_freeze_count() == 0 and "not frozen" in caplog.text


def test_pauses_count_collections_and_log_the_long_ones(caplog):
    pauses = gc_pauses.GcPauses(slow_ms=0.0)   # every collection counts as long
    gc.callbacks.append(pauses)
    try:
        with caplog.at_level(logging.INFO, logger="pearl_runtime.gc_pauses"):
            gc.collect(2)
            gc.collect(0)
    finally:
        gc.callbacks.remove(pauses)
    count, ms = pauses.take()
    assert count == 2 and ms > 0
    assert pauses.take() == (0, 0.0)
    assert "gc pause" in caplog.text and "generation 2" in caplog.text


def test_a_short_collection_is_not_logged(caplog):
    pauses = gc_pauses.GcPauses(slow_ms=1e9)
    gc.callbacks.append(pauses)
    try:
        with caplog.at_level(logging.INFO, logger="pearl_runtime.gc_pauses"):
            gc.collect(0)
    finally:
        gc.callbacks.remove(pauses)
    assert pauses.take()[0] == 1 and "gc pause" not in caplog.text
