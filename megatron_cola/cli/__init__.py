"""Command-line entry points (the top layer): each module's ``main(argv) -> int`` is what a
``tools/*.py`` script and its console script in ``setup.py`` run. They parse flags, call the library,
and print a ``MegatronColaError`` as one line without a traceback."""
