"""Progress on stderr: log lines, or a tqdm bar on a terminal."""

import os
import sys


def log(message):
    print(message, file=sys.stderr, flush=True)


def _terminal_width():
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns if sys.stderr.isatty() else 0
    except (OSError, ValueError):
        return 0


class Progress:
    """A tqdm bar on a terminal when tqdm is installed, else one line per step on stderr."""

    def __init__(self, total):
        self.total, self.done, self.bar = total, 0, None
        if _terminal_width() > 0:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, file=sys.stderr, unit="config", dynamic_ncols=True)
            except ImportError:
                pass

    def step(self, text, short):
        """Logs `text`; a bar shows `short` only."""
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix_str(short, refresh=False)
            self.bar.update(1)
        else:
            log(f"[{self.done}/{self.total}] {text}")

    def close(self):
        if self.bar is not None:
            self.bar.close()
