"""Plain-text formatting shared by the interactive screens and ``--once``."""

SPARK_LEVELS = "▁▂▃▄▅▆▇█"
BAR_EIGHTHS = " ▏▎▍▌▋▊▉"
NO_VALUE = "—"


def plural(count, singular, plural_form=None):
    """``1 node``, ``0 nodes``, ``2 nodes``; ``plural_form`` for irregular words."""
    word = singular if count == 1 else (plural_form or singular + "s")
    return f"{count} {word}"


def human_bytes(n):
    """Prompt sizes: exact below 1 KiB, then one decimal in binary units."""
    if n is None:
        return NO_VALUE
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024.0
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}"


def human_age(seconds):
    """An age short enough for a table cell: 0.4s, 12s, 3m05s, 2h03m, 3d05h."""
    if seconds is None:
        return NO_VALUE
    seconds = max(0.0, seconds)
    if seconds < 10:
        return f"{seconds:.1f}s"
    if seconds < 60:
        return f"{int(seconds)}s"
    if seconds < 3600:
        minutes, rest = divmod(int(seconds), 60)
        return f"{minutes}m{rest:02d}s"
    if seconds < 86400:
        hours, rest = divmod(int(seconds), 3600)
        return f"{hours}h{rest // 60:02d}m"
    days, rest = divmod(int(seconds), 86400)
    return f"{days}d{rest // 3600:02d}h"


def human_lag(milliseconds):
    if milliseconds is None:
        return NO_VALUE
    if milliseconds < 1000:
        return f"{milliseconds:.0f}ms"
    return human_age(milliseconds / 1000.0)


def sparkline(values):
    """One character per value, scaled from 0 to the largest value; ``None``
    (no sample in that time slice) is a blank, so gaps stay visible."""
    present = [v for v in values if v is not None]
    top = max(present, default=0)
    chars = []
    for value in values:
        if value is None:
            chars.append(" ")
        elif top <= 0:
            chars.append(SPARK_LEVELS[0])
        else:
            index = round(value / top * (len(SPARK_LEVELS) - 1))
            chars.append(SPARK_LEVELS[min(index, len(SPARK_LEVELS) - 1)])
    return "".join(chars)


def bar(fraction, width):
    """A horizontal bar ``width`` cells wide, filled to ``fraction`` (0..1) in
    eighths of a cell."""
    fraction = min(max(fraction, 0.0), 1.0)
    eighths = round(fraction * width * 8)
    full, partial = divmod(eighths, 8)
    text = "█" * full + (BAR_EIGHTHS[partial] if partial else "")
    return text.ljust(width)
