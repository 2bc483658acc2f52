"""A pure-PyTorch Llama 3 with activation-capture and splice hooks, and loaders for Meta, HF and GGUF checkpoints."""

from llama_3.args import ModelArgs, RopeScaling
from llama_3.checkpoints import LoadedModel, default_model_path, load_model, load_tokenizer
from llama_3.errors import LlamaInputError, PipelineInputError
from llama_3.hooks import HOOK_KINDS, HookPoint, Splice, default_capture_layer
from llama_3.model import Transformer
from llama_3.tokenizer import Tokenizer

__all__ = [
    "ModelArgs",
    "RopeScaling",
    "LoadedModel",
    "default_model_path",
    "load_model",
    "load_tokenizer",
    "PipelineInputError",
    "LlamaInputError",
    "HOOK_KINDS",
    "HookPoint",
    "Splice",
    "default_capture_layer",
    "Transformer",
    "Tokenizer",
]
