"""What every backend shares: one lock, apply / restore through its weight editors, and
``render`` / ``side_by_side`` (apply a mix, then generate, atomically).

A backend subclass says how to generate (``generate(prompt, label=..., **settings)`` returning a
result with ``switch_s`` and ``apply`` fields) and, when it has more than one edited model,
which editors it holds (``editors``) and how a mix is routed to them (``_apply``).

Isolation: one ``threading.RLock`` per backend instance is held around apply + generate in
``render``/``side_by_side`` (and around every ``apply``/``restore``), so concurrent requests
never see each other's weights; they are served one at a time.
"""

from __future__ import annotations

import threading

from ..mix import ApplyStats, Mix, WeightEditor


class Backend:
    """A model whose weights take mixes. Subclasses set ``self.editor`` and define ``generate``."""

    editor: WeightEditor

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._fused: Mix | None = None  # the mix last fused through apply/render (None: base or unknown)

    # -- weights ----------------------------------------------------------------------------
    def editors(self) -> list[WeightEditor]:
        """Every weight editor of this backend (one per edited model)."""
        return [self.editor]

    def _apply(self, mix: Mix | None) -> ApplyStats:
        """Fuse ``mix`` (caller holds the lock)."""
        return self.editor.apply(mix)

    def apply(self, mix: Mix | None) -> ApplyStats:
        """Fuse ``mix`` (None = base). See ``devec_core.mix.WeightEditor.apply``."""
        with self.lock:
            self._fused = None  # unknown until the switch is complete
            stats = self._apply(mix)
            self._fused = mix or Mix.base()
            return stats

    def restore(self) -> int:
        """Give back bit-identical base weights. Returns the number of tensors written."""
        with self.lock:
            self._fused = None
            return sum(ed.restore() for ed in self.editors())

    def is_fused(self, mix: Mix | None) -> bool:
        """True when ``mix`` is the mix fused now (same source object, same active terms): applying
        it again would write nothing."""
        now, mix = getattr(self, "_fused", None), mix or Mix.base()
        if now is None:
            return False
        if not now.active() and not mix.active():
            return True
        return now.source is mix.source and now.active() == mix.active()

    # -- outputs ----------------------------------------------------------------------------
    def generate(self, prompt, label: str = "", **settings):
        raise NotImplementedError

    def _finish(self, res, mix: Mix | None, stats: ApplyStats):
        """Fill in what ``render`` knows about the switch."""
        res.switch_s, res.apply = stats.seconds, stats
        return res

    def render(self, prompt, mix: Mix | None, **settings):
        """Apply ``mix`` and generate, atomically with respect to other requests on this backend.

        Args:
            prompt: as in ``generate``.
            mix: the mix (None = base).
            **settings: ``generate`` keyword arguments.

        Returns:
            The result with ``switch_s`` and ``apply`` filled in.
        """
        with self.lock:
            stats = self.apply(mix)
            res = self.generate(prompt, label=(mix.label if mix else "base"), **settings)
        return self._finish(res, mix, stats)

    def side_by_side(self, prompt, mixes: list[Mix | None], **settings) -> list:
        """Render one prompt under each mix with the same seed and settings (under one lock).

        Args:
            prompt: as in ``generate``.
            mixes: two or more mixes (None = base).
            **settings: ``generate`` keyword arguments, shared by every mix.

        Returns:
            One result per mix, in order.
        """
        if not mixes:
            raise ValueError("side_by_side needs at least one mix; got []")
        with self.lock:
            # the mix fused now (e.g. the left side when only DeVec's sliders moved, or both when
            # only the prompt or seed changed) is rendered first: one switch fewer. Each render
            # seeds its own generation, so the order changes no output.
            order = list(range(len(mixes)))
            now = next((i for i in order if self.is_fused(mixes[i])), 0)
            order.insert(0, order.pop(now))
            out: list = [None] * len(mixes)
            for i in order:
                out[i] = self.render(prompt, mixes[i], **settings)
            return out
