"""`python -m scratchlm.cli ...` (what torchrun runs).

Under torchrun (WORLD_SIZE > 1) the process leaves with ``os._exit`` once the command has
returned: everything is saved and the process group destroyed by then, and skipping the
interpreter's shutdown means no destructor runs while gloo's worker threads
(``pt_gloo_runloop``, ``gloo_tcp_loop``, joined only in ProcessGroupGloo's destructor) are
still alive: a rank that ran its destructors mid-shutdown could abort ("terminate called
without an active exception") and fail the whole job after it had succeeded.
"""

import os
import sys

from . import main


def _run() -> int:
    try:
        return main()
    except SystemExit as e:  # argparse's --help and usage errors
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # a bug: its traceback, then the same deterministic exit
        import traceback

        traceback.print_exc()
        return 1


if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    code = _run()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(main())
