"""Training methods, one file each, behind the ``Method`` interface and the ``METHODS`` registry."""

from . import agm as _agm  # noqa: F401
from . import amco as _amco  # noqa: F401
from . import cml as _cml  # noqa: F401
from . import dgl as _dgl  # noqa: F401
from . import gblending as _gblending  # noqa: F401
from . import greedy as _greedy  # noqa: F401
from . import inforeg as _inforeg  # noqa: F401
from . import joint as _joint  # noqa: F401  (registration)
from . import lemda as _lemda  # noqa: F401
from . import lfm as _lfm  # noqa: F401
from . import mbsd as _mbsd  # noqa: F401
from . import mcr as _mcr  # noqa: F401
from . import midas as _midas  # noqa: F401
from . import mixup as _mixup  # noqa: F401
from . import mla as _mla  # noqa: F401
from . import mmcosine as _mmcosine  # noqa: F401
from . import mmpareto as _mmpareto  # noqa: F401
from . import ogm as _ogm  # noqa: F401
from . import ogm_ge as _ogm_ge  # noqa: F401
from . import opm as _opm  # noqa: F401
from . import pmr as _pmr  # noqa: F401
from . import powmix as _powmix  # noqa: F401
from . import reconboost as _reconboost  # noqa: F401
from . import relearning as _relearning  # noqa: F401
from . import remix as _remix  # noqa: F401
from . import smv as _smv  # noqa: F401
from . import ume as _ume  # noqa: F401
from . import umt as _umt  # noqa: F401
from . import unimodal as _unimodal  # noqa: F401
from .base import METHODS, Method, MethodContext, StepOutput, build_method, register_method

__all__ = ["METHODS", "Method", "MethodContext", "StepOutput", "build_method", "register_method"]
