"""modgen: a modular research engine for LLM generation with Dynamic SplitFuse."""

from modgen.engine import Engine
from modgen.llm import LLM
from modgen.outputs import RequestOutput
from modgen.pipelines import Pipeline, pipeline
from modgen.registry import register
from modgen.sampling_params import BadRequestError, SamplingParams

__all__ = [
    "LLM",
    "BadRequestError",
    "Engine",
    "Pipeline",
    "RequestOutput",
    "SamplingParams",
    "pipeline",
    "register",
]
