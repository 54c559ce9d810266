"""``python -m sage_llm`` and the ``sage-llm`` script: the command line
(:mod:`sage_llm.cli`), loaded with a Ctrl-C answered as any other problem is, in one line
(its imports take a moment; a Ctrl-C then had printed a traceback)."""

import sys


def main() -> None:
    """Console-script entry point: load the command line and run it."""
    try:
        from sage_llm.cli import main as run
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted (SIGINT)\n")
        raise SystemExit(130) from None
    run()


if __name__ == "__main__":
    main()
