"""The `meterstream` command's entry point: the CLI, or a clear word when only the SDK is installed."""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from meterstream.cli import main as cli_main
    except ModuleNotFoundError as exc:  # `pip install meterstream` is the SDK alone
        sys.stderr.write(
            f"error: the meterstream command needs the server extra ({exc.name} is not installed): "
            "pip install 'meterstream[server]'\n"
        )
        raise SystemExit(2) from None
    cli_main()
