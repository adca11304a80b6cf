"""bytelift: turn a pretrained subword causal LM into a byte-level LM (the Bolmo method).

One byte's path from text to logits:
  tokenization.py   text -> byte ids + longest-suffix subword ids (expanded ids)
  mlstm.py          the recurrent cell and block of the local encoder/decoder
  modeling.py       embeddings -> encoder -> boundary predictor -> pooling -> global model -> depooling
                    -> decoder -> fused head
Importing bytelift registers its config, model and tokenizer with the transformers Auto classes.
"""

__version__ = "0.1.0"

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from bytelift.configuration import ByteliftConfig
from bytelift.modeling import ByteliftForCausalLM, count_parameters, fold_fused_logprobs
from bytelift.tokenization import ByteTokenizer

AutoConfig.register(ByteliftConfig.model_type, ByteliftConfig, exist_ok=True)
AutoModelForCausalLM.register(ByteliftConfig, ByteliftForCausalLM, exist_ok=True)
AutoTokenizer.register(ByteliftConfig, tokenizer_class=ByteTokenizer, exist_ok=True)

__all__ = [
    "ByteTokenizer",
    "ByteliftConfig",
    "ByteliftForCausalLM",
    "count_parameters",
    "fold_fused_logprobs",
    "__version__",
]
