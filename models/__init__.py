"""docpipe models: architectures, checkpoint loading and a paged-KV inference engine.

Pure torch (no Ray): a plain script can load a model and generate text::

    from models import LLM, SamplingParams
    llm = LLM("smollm2-135m-instruct")
    out = llm.chat([[{"role": "user", "content": "Hi"}]], SamplingParams(max_tokens=32))
"""

from models.config import ModelConfig, tiny_config
from models.engine.engine import EngineConfig, LLMEngine
from models.engine.sampling import SamplingParams
from models.engine.sequence import RequestOutput
from models.errors import ModelLoadError
from models.llm import LLM
from models.loading import LoadedModel, load_model

__all__ = [
    "LLM",
    "EngineConfig",
    "LLMEngine",
    "LoadedModel",
    "ModelConfig",
    "ModelLoadError",
    "RequestOutput",
    "SamplingParams",
    "load_model",
    "tiny_config",
]
