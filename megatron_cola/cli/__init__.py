"""Command-line entry points (the top layer): each module's ``main(argv) -> int`` is what a
``tools/<name>.py`` script runs (a thin wrapper: all logic lives here), as do the console scripts in
``setup.py``. They parse flags, call the library,
and print a ``MegatronColaError`` as one line without a traceback."""
