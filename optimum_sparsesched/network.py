"""Whether a failed request to the Hugging Face Hub never reached a server (offline mode, no network, a refused or
timed-out connection, an unknown host), as opposed to a server's answer (401, 404, ...) or any other failure.

Publishing (:func:`optimum_sparsesched.push_to_hub`) and lm-eval's dataset downloads (:func:`.eval.zero_shot.zero_shot`)
turn such a failure into one ``ConnectionError`` naming what could not be reached; the command line prints it as
``error: ...`` and exits 2. huggingface_hub raises ``OfflineModeIsEnabled`` (a ``ConnectionError``) under
``HF_HUB_OFFLINE=1``, its HTTP client's transport errors otherwise (httpx/httpx2: ``ConnectError``, ``ReadTimeout``,
…; requests: ``ConnectionError``); `datasets` wraps them in its own ``ConnectionError``.
"""

from __future__ import annotations

#: class names (anywhere in an exception's MRO) of the HTTP clients' errors raised before any server answered
TRANSPORT_ERRORS = frozenset({"TransportError", "NetworkError", "TimeoutException", "ConnectError", "ConnectTimeout",
                              "ProxyError", "ConnectionError", "Timeout"})


def unreachable(exc: BaseException) -> str | None:
    """One line saying why a hub request reached no server (from ``exc`` or the exceptions it was raised from),
    or None when a server answered (an HTTP error carries its ``response``) or the failure is of another kind."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if getattr(current, "response", None) is not None:
            return None  # an HTTP answer: the server was reached
        names = {c.__name__ for c in type(current).__mro__}
        if isinstance(current, (ConnectionError, TimeoutError)) or names & TRANSPORT_ERRORS:
            text = next((line.strip() for line in str(current).splitlines() if line.strip()), "")
            return f"{type(current).__name__}: {text[:200]}" if text else type(current).__name__
        current = current.__cause__ or current.__context__
    return None


def hub_endpoint(endpoint: str | None = None) -> str:
    """The Hub URL a request goes to: ``endpoint``, else huggingface_hub's (``HF_ENDPOINT``)."""
    if endpoint:
        return endpoint.rstrip("/")
    from huggingface_hub import constants

    return constants.ENDPOINT
