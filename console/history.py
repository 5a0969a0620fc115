"""Recent samples of a number (in-flight requests of a cluster or an engine),
kept for a time window and cut into equal time slices for a sparkline."""

from collections import deque


class History:
    def __init__(self, window_seconds):
        self.window = float(window_seconds)
        self._series = {}  # key -> deque of (time, value), oldest first

    def record(self, key, when, value):
        samples = self._series.setdefault(key, deque())
        if samples and when < samples[-1][0]:
            return  # out of order (a slow poll finishing late); keep series monotone
        samples.append((when, value))

    def prune(self, now):
        horizon = now - self.window
        for key in list(self._series):
            samples = self._series[key]
            while samples and samples[0][0] < horizon:
                samples.popleft()
            if not samples:
                del self._series[key]

    def slices(self, key, now, count):
        """``count`` values covering the window up to ``now``, oldest first:
        the largest sample of each slice (a short burst stays visible), or
        ``None`` where nothing was sampled."""
        width = self.window / count
        start = now - self.window
        cells = [None] * count
        for when, value in self._series.get(key, ()):
            if when < start or when > now:
                continue
            index = min(int((when - start) / width), count - 1)
            if cells[index] is None or value > cells[index]:
                cells[index] = value
        return cells

    def latest(self, key):
        samples = self._series.get(key)
        return samples[-1][1] if samples else None
