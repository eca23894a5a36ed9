"""sdi_core: framework-agnostic Step-Decomposed Influence (TensorSketch, algebra, references).

Imports NumPy and array-api-compat only; never torch or jax.
"""
from .factors import FactorUse, ParamInfo, SDIError, StackedUse
from .specs import Exact, FeatureLayout, SketchPlan, TensorSketch
from .coverage import Coverage
from .features import Checkpoint, CheckpointInfo, Features
from .countsketch import HashTable, countsketch
from .sketch import choose_route, outer_features
from .engine import SketchEngine, StreamingSketcher, sketch_uses, use_features
from .weights import checkpoint_id
from . import driver
from .algebra import InfluenceResult, TopK, influence, self_influence

__version__ = "0.1.0"

__all__ = [
    "Coverage",
    "Checkpoint",
    "CheckpointInfo",
    "Exact",
    "FactorUse",
    "FeatureLayout",
    "Features",
    "HashTable",
    "InfluenceResult",
    "ParamInfo",
    "SDIError",
    "SketchEngine",
    "SketchPlan",
    "StackedUse",
    "StreamingSketcher",
    "TensorSketch",
    "TopK",
    "checkpoint_id",
    "choose_route",
    "countsketch",
    "influence",
    "outer_features",
    "self_influence",
    "sketch_uses",
    "use_features",
]
