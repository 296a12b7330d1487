"""The bundled Qwen (v1) architecture, registered with transformers' Auto* factories on import.

After `import qwen_model`, `AutoConfig/AutoModel/AutoModelForCausalLM/AutoTokenizer.from_pretrained(dir)`
build these classes for any `model_type: "qwen"` checkpoint without `trust_remote_code`: transformers
prefers a registered class defined outside the `transformers` package over the `auto_map` remote code of
config.json (and, unless `trust_remote_code=True` is passed, over the tokenizer's auto_map too), so no code
from the checkpoint directory is executed.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from .configuration_qwen import QWenConfig
from .modeling_qwen import QWenLMHeadModel, QWenModel, QWenPreTrainedModel
from .tokenization_qwen import QWenTokenizer

AutoConfig.register(QWenConfig.model_type, QWenConfig, exist_ok=True)
AutoModel.register(QWenConfig, QWenModel, exist_ok=True)
AutoModelForCausalLM.register(QWenConfig, QWenLMHeadModel, exist_ok=True)
AutoTokenizer.register(QWenConfig, tokenizer_class=QWenTokenizer, exist_ok=True)

__all__ = ["QWenConfig", "QWenLMHeadModel", "QWenModel", "QWenPreTrainedModel", "QWenTokenizer"]
