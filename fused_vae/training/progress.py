"""tqdm progress bars (tqdm is in the ``train`` extra; without it bars are silently off)."""

from __future__ import annotations


class _NoBar:
    def __init__(self, *args, **kwargs):
        pass

    def update(self, n=1):
        pass

    def set_postfix(self, *args, **kwargs):
        pass

    def close(self):
        pass


def progress_bar(**kwargs):
    """``tqdm.auto.tqdm(**kwargs)``, or an object with the same methods that shows nothing
    when tqdm is not installed."""
    try:
        from tqdm.auto import tqdm
    except ModuleNotFoundError:  # pragma: no cover - tqdm is in the train extra
        return _NoBar()
    return tqdm(**kwargs)
