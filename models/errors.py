"""The one exception type for mistakes a user can make (bad spec, bad path, bad input).

Every layer raises it with a single readable sentence; the CLI prints it as `error: ...`
and the app shows it with `st.error`, never as a traceback.
"""


class InputError(ValueError):
    """A problem with what the user asked for, stated in one sentence. `detail` is the sentence for the
    operator (the CLI prints it): it may name what a visitor of the app must not see, such as the
    server's folders and settings; by default the same sentence."""

    def __init__(self, message: str, detail: str | None = None):
        super().__init__(message)
        self.detail = detail or message


class KernelCannotCompute(InputError):
    """The chosen kernel does not implement this model's MLP (its activation); the reference kernel
    runs any. The app offers to switch; the CLI says the sentence."""
