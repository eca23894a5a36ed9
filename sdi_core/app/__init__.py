"""The ``sdi`` application: command line, demo pipeline, algorithmic tasks and reports.

Apart from the library: ``sdi_core``'s sketches, engine, store and algebra
never import ``sdi_core.app``.  Frameworks are reached only through the
backends registered under the ``sdi.backends`` entry-point group
(:mod:`sdi_core.app.backends`), loaded when a command asks for one.
"""
