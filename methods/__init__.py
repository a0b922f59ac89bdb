"""Training methods, one file each, behind the ``Method`` interface and the ``METHODS`` registry."""

from . import joint as _joint  # noqa: F401  (registration)
from . import midas as _midas  # noqa: F401
from . import mixup as _mixup  # noqa: F401
from . import ogm as _ogm  # noqa: F401
from . import ogm_ge as _ogm_ge  # noqa: F401
from . import opm as _opm  # noqa: F401
from . import powmix as _powmix  # noqa: F401
from . import unimodal as _unimodal  # noqa: F401
from .base import METHODS, Method, MethodContext, StepOutput, build_method, register_method

__all__ = ["METHODS", "Method", "MethodContext", "StepOutput", "build_method", "register_method"]
