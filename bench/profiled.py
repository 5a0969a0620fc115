"""``twistd`` under cProfile: ``python -m bench.profiled OUT.prof [twistd args]``.

Used by ``python -m bench --profile``. twistd ends a signalled process by
sending itself the signal again with the default handler, which would lose
the profile; here it returns normally instead, and the profile is written.
"""

import cProfile
import sys

from twisted.application import app
from twisted.scripts.twistd import run


def main():
    out = sys.argv[1]
    sys.argv = ["twistd", *sys.argv[2:]]
    app._exitWithSignal = lambda sig: None
    profile = cProfile.Profile()
    profile.enable()
    try:
        run()
    except SystemExit:
        pass
    finally:
        profile.disable()
        profile.dump_stats(out)


if __name__ == "__main__":
    main()
