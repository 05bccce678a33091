"""``python -m lorakit_plugins.wuerstchen convert-encoder SRC DST`` (see :mod:`.convert`)."""

from .convert import main

if __name__ == "__main__":
    raise SystemExit(main())
