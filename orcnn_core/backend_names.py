"""The names of the inference back-ends, the names refused with their reason, and the
error for a back-end that cannot run. Torch-free, so that the ROS node can declare its
``backend`` parameter (and a command line can check a name) before it loads torch; the
back-ends themselves are in :mod:`orcnn_core.backends`."""

from orcnn_core.errors import InputError

__all__ = ["BACKENDS", "REFUSED", "BackendError", "check_backend_name"]

BACKENDS = ("eager", "torchscript", "onnxruntime", "tensorrt")
#: Names that are not back-ends, with the measured reason.
REFUSED = {
    "compile": "torch.compile is not offered as a back-end: on the bundled model (2-core "
               "CPU) it compiled for 50-165 s before the first result, recompiled for every "
               "new detection count (7-56 s each) up to torch's recompile limit, and then "
               "ran no faster than eager; use torchscript or onnxruntime",
}


class BackendError(InputError):
    """The back-end asked for is unknown, refused, or cannot run here (a package or the
    device it needs is missing); the message says which and why."""


def check_backend_name(name) -> str:
    """``name`` when it is one of :data:`BACKENDS`, else :class:`BackendError` listing them."""
    if name in BACKENDS:
        return name
    if name in REFUSED:
        raise BackendError(f"backend {name!r}: {REFUSED[name]}")
    raise BackendError(f"backend {name!r} is unknown; choose one of {', '.join(BACKENDS)}")
