"""One error type for bad user input.

Every message names the offending field and the fix, on one line, so the CLI can print it and exit non-zero.
"""


class ConfigError(ValueError):
    """Bad user input (config value, path, file contents, observation shape...).

    Args:
        field: the name of the offending field / key / path component.
        problem: what is wrong with it.
        fix: what the user should do instead.
    """

    def __init__(self, field: str, problem: str, fix: str):
        self.field, self.problem, self.fix = field, problem, fix
        super().__init__(f"{field}: {problem} -> {fix}")

    def __reduce__(self):  # picklable with its three fields (vector-env workers send errors to the parent)
        return type(self), (self.field, self.problem, self.fix)
