"""The one exception type for problems the user can fix (bad path, bad flag, bad file).

The CLI prints these as a single line; anything else is a bug and keeps its traceback.
"""


class SBDError(ValueError):
    pass
