"""gpt: the data pipeline and every model of Karpathy's "Let's build GPT" lecture, on tinytensor."""
from .data import (DATA_SHA256, DATA_URL, DEFAULT_DATA_PATH, PROJECT_ROOT, CharDataset, DataError,
                   get_batch, load_text)
from .interop import lecture_state_dict, load_lecture_state_dict
from .model import (MODELS, BigramLanguageModel, GPTConfig, GPTLanguageModel, KVCache, build_model,
                    sample_next)
from .token_files import TokenDataset, build_token_files
from .tokenizer import BPETokenizer, CharTokenizer, tokenizer_from_json

__all__ = ["CharTokenizer", "BPETokenizer", "tokenizer_from_json", "CharDataset", "TokenDataset",
           "build_token_files", "DataError", "load_text", "get_batch", "PROJECT_ROOT",
           "DEFAULT_DATA_PATH", "DATA_URL", "DATA_SHA256", "GPTConfig", "GPTLanguageModel",
           "BigramLanguageModel", "KVCache", "MODELS", "build_model", "sample_next",
           "lecture_state_dict", "load_lecture_state_dict"]
