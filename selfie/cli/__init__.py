"""The command line: `selfie <verb>`, one module per verb, kept apart from the library it calls."""
