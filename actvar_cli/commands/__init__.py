"""The command layer: one module per command, between the CLI and the library.

Each module takes a request dataclass and returns a result object. It resolves names, picks
the runtime (device and dtype), loads and checks every input once (``loading.load_models``),
then calls library functions that take models, not file names. Nothing here prints: the CLI
renders the result, and ``result.to_dict()`` is what ``--json`` prints.
"""
