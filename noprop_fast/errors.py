"""Errors a user can cause: a `UserError` (a bad config key, a missing data folder, a corrupt file)
is one line and a non-zero exit (`cli_main`); anything else is a bug and keeps its traceback."""
import signal


class UserError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""


class ConfigError(UserError):
    """An unknown config key, a bad value, or a config file that cannot be read."""


class DataError(UserError):
    """A missing data folder or file, or a file whose header or size does not match its format."""


class Terminated(BaseException):
    """SIGTERM: raised where the process is, unwinding like Ctrl-C (a checkpoint being written
    removes its temporary file; the last one stays)."""


def _terminated(signum, frame):
    raise Terminated()


def cli_main(run, argv, interrupted: str) -> int:
    """Run a CLI's `run(argv)`: a UserError is one line on stderr and exit 2, Ctrl-C exit 130,
    SIGTERM exit 143 (a multi-process session installs its own SIGTERM handler for its span)."""
    import sys
    previous = None
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        try:
            previous = signal.signal(signal.SIGTERM, _terminated)
        except ValueError:  # not the main thread: leave signals alone
            pass
    try:
        run(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted; {interrupted}", file=sys.stderr)
        return 130
    except Terminated:
        print(f"terminated (SIGTERM); {interrupted}", file=sys.stderr)
        return 143
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0
