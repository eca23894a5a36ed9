"""sdi_core: framework-agnostic Step-Decomposed Influence (TensorSketch, algebra, references).

Imports NumPy and array-api-compat only; never torch or jax.
"""
from .factors import FactorUse, ParamInfo, SDIError
from .specs import Exact, FeatureLayout, SketchPlan, TensorSketch
from .features import Checkpoint, CheckpointInfo, Features

__version__ = "0.1.0"
