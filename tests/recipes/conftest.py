import contextlib

import _common
import pytest


@pytest.fixture
def interrupt_at(monkeypatch):
    """Stop a recipe run at one unit of work, as if it were killed there.

    ``with interrupt_at(12): main(cfg)`` sets ``_common.run.STOP_AT`` for the
    block and expects the run to raise :class:`_common.Interrupted`.
    """

    @contextlib.contextmanager
    def at(step):
        monkeypatch.setattr(_common.run, "STOP_AT", step)
        try:
            with pytest.raises(_common.Interrupted, match=f"at step {step} "):
                yield
        finally:
            monkeypatch.setattr(_common.run, "STOP_AT", None)

    return at
