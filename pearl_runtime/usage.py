"""Errors a user fixes at the command line: one stderr line naming the cause and exit 2 (argparse's
code for a usage error), never a traceback unless debugging (--debug, --log-level debug or
PEARL_LOG_LEVEL=debug). Every entry point runs inside `user_errors`."""
import sys
import traceback
from contextlib import contextmanager

from pearl_runtime import envs
from pearl_runtime.errors import PearlError

EXIT_USAGE = 2


def pop_debug(argv: list[str]) -> tuple[list[str], bool]:
    """`argv` without --debug (a flag of every entry point, before any `--`), and whether to debug."""
    cut = argv.index("--") if "--" in argv else len(argv)
    head = argv[:cut]
    debug = "--debug" in head or _level_flag(head) == "debug"
    debug = debug or str(envs.get("PEARL_LOG_LEVEL") or "").lower() == "debug"
    return [a for a in head if a != "--debug"] + argv[cut:], debug


def _level_flag(argv: list[str]) -> str | None:
    for i, a in enumerate(argv):
        if a == "--log-level" and i + 1 < len(argv):
            return argv[i + 1].lower()
        if a.startswith("--log-level="):
            return a.split("=", 1)[1].lower()
    return None


def describe(error: BaseException, address: str | None = None) -> str | None:
    """The one line for an error the user can act on; None for anything else (a bug keeps its traceback)."""
    if isinstance(error, PearlError):
        return str(error)
    grpc = sys.modules.get("grpc")
    if grpc is not None and isinstance(error, grpc.RpcError) and hasattr(error, "code"):
        where = f"{address}: " if address else ""
        details = " ".join((error.details() or "").split())
        return f"{where}{error.code().name}: {details}" if details else f"{where}{error.code().name}"
    return None


@contextmanager
def user_errors(prog: str, debug: bool = False, address: str | None = None):
    """Turn a user's error raised inside into `<prog>: error: <cause>` on stderr and exit 2;
    with `debug` the traceback comes first."""
    try:
        yield
    except Exception as e:
        line = describe(e, address)
        if line is None:
            raise
        if debug:
            traceback.print_exc()
        print(f"{prog}: error: {line}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_USAGE) from None
