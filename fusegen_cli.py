"""The ``fusegen-cli`` entry point. Loading torch, transformers and fusegen takes seconds on a
small machine, before any command can say anything; this module (outside the ``fusegen``
package, whose import is that slow part) prints a line on stderr when the loading runs past
half a second, then runs ``fusegen.cli.main``."""

import os
import sys
import threading
import time

PROG = "fusegen-cli"


def main() -> int:
    after = float(os.environ.get("FUSEGEN_STARTUP_NOTE_S", "0.5"))
    start = time.perf_counter()
    loaded = threading.Event()
    noted = threading.Event()

    def note() -> None:
        if not loaded.wait(after):
            print(f"{PROG}: loading torch, transformers and fusegen ...", file=sys.stderr, flush=True)
            noted.set()

    threading.Thread(target=note, daemon=True).start()
    from fusegen.cli import main as run   # the slow import

    loaded.set()
    if noted.is_set():
        print(f"{PROG}: loaded in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    return run()


if __name__ == "__main__":
    sys.exit(main())
