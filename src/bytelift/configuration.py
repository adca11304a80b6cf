"""ByteliftConfig: the byte-level model's hyper-parameters, with the source model's config nested inside.

Every default is the reference (Bolmo) value; sizes that depend on the source default to `None` and are
derived from the nested `source_config` (local width = source width, FFN ≈ 1.375 × width).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from bytelift.tokenization import BYTE_VOCAB_SIZE

# Reference local FFN sizes are 2816 for d=2048 and 5504 for d=4096: 1.375·d, rounded to a multiple of 64.
LOCAL_FFN_RATIO = 1.375
LOCAL_FFN_MULTIPLE = 64
# The predictor decides byte t from bytes <= t + lookahead. Past a few bytes a BPE boundary is nearly
# determined (benchmarks/boundary_ceiling.py); the cap keeps the rolled-back prompt tail short.
MAX_BOUNDARY_LOOKAHEAD = 8


class ByteliftConfig(PreTrainedConfig):
    r"""Configuration of a byteified causal LM.

    Args:
        source_config: the nested config of the source causal LM; its transformer becomes the global model.
        byte_vocab_size: V_b, the number of plain byte-side ids (specials + 256 bytes); the head has 2·V_b outputs.
        subword_vocab_size: rows of the subword (longest-suffix) embedding: the source vocabulary + 1 "no subword" row.
        local_hidden_size: d_l, width of the local encoder/decoder (default: the source width d_g).
        encoder_layers / decoder_layers: local mLSTM blocks before / after the global model (reference 1 / 4).
        local_heads: mLSTM heads (reference 16).
        local_ffn_size: SwiGLU hidden size of a local block (default ≈1.375·d_l, multiple of 64).
        local_norm_eps: eps of the local pre-norms and of the LM-head norm (reference 1e-6).
        local_post_norm_eps: eps of the norm after the encoder and before depooling (reference 1e-5).
        mlstm_chunk_size: chunk length of the chunkwise mLSTM form.
        mlstm_gate_soft_cap: gate pre-activations are soft-capped to ±this value.
        mlstm_igate_bias_init: input-gate bias at initialisation (−10 nearly disables the input gate at first).
        boundary_threshold: byte t ends a patch iff p_t > this (reference 0.5).
        boundary_lookahead: bytes of lookahead of the non-causal boundary predictor (reference 1; at most
            MAX_BOUNDARY_LOOKAHEAD): p_t compares the encoder states at t and t + lookahead, so the last
            `boundary_lookahead` bytes of a text are undecided and generation rolls that many prompt bytes back.
        boundary_cos_eps: cos is clipped to 1 − eps before log(1 − cos) so log p stays finite (reference 1e-3).
        decode_boundary_bias: added to the head's end-of-patch log-odds while decoding (0: the reference, a
            byte closes its patch iff p(end | byte) > 1/2). Training sets it (`calibrate_boundary_bias`) so
            that decoding closes patches as often as the predictor does on the same text.
        source_prior: the source-prior output path (`bytelift.prior`): the model keeps the source's LM head
            (`prior_head`) and adds, at every byte whose patch prefix is a prefix of some source token, the log
            of the trie marginal of its own global model's next-token distribution to the decoder's logits.
        prior_floor: mixing weight of a uniform distribution in the prior (symbols the vocabulary cannot spell
            from the current prefix keep probability ≥ prior_floor / 2·V_b).
        prior_vocab_rows: rows of the source LM head (the prior's token distribution).
        prior_head_bias: the source LM head has a bias.
        prior_logit_softcap: the source's final logit soft-cap (Gemma 2/3), applied before the softmax.
        boundary_trie_closure: predicted boundaries also end a patch wherever the source vocabulary forces it
            (the patch followed by the next byte is a prefix of no source token; `TokenTrie.close_boundaries`).
        token_exact_init: `from_source` initialises the encoder so that the pooled patch reproduces the
            source embedding of the longest-suffix token at its last byte (recorded for the record).
        source_name_or_path: where the source came from (informational).
        transfers: the post-training deltas added to the global model (`bytelift.transfer`), oldest first: each
            {"base", "post", "scale", "subword_embedding_delta", "prior_head_delta", "chat_template"}.
    """

    model_type = "bytelift"
    sub_configs_defaults = {"source_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

    source_config: dict | PreTrainedConfig | None = None
    byte_vocab_size: int = BYTE_VOCAB_SIZE
    subword_vocab_size: int | None = None
    local_hidden_size: int | None = None
    encoder_layers: int = 1
    decoder_layers: int = 4
    local_heads: int = 16
    local_ffn_size: int | None = None
    local_norm_eps: float = 1e-6
    local_post_norm_eps: float = 1e-5
    mlstm_chunk_size: int = 32  # measured fastest on CPU (benchmarks/mlstm.py); the function is the same
    mlstm_gate_soft_cap: float = 15.0
    mlstm_igate_bias_init: float = -10.0
    boundary_threshold: float = 0.5
    boundary_lookahead: int = 1
    boundary_cos_eps: float = 1e-3
    decode_boundary_bias: float = 0.0
    pooling_init_samples: int = 8192
    source_prior: bool = False
    prior_floor: float = 1e-3
    prior_vocab_rows: int | None = None
    prior_head_bias: bool = False
    prior_logit_softcap: float | None = None
    boundary_trie_closure: bool = False
    token_exact_init: bool = False
    source_name_or_path: str | None = None
    transfers: list | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        src = self.source_config
        if self.local_hidden_size is None:
            self.local_hidden_size = src.hidden_size
        if self.local_ffn_size is None:
            raw = LOCAL_FFN_RATIO * self.local_hidden_size
            self.local_ffn_size = max(LOCAL_FFN_MULTIPLE, int(round(raw / LOCAL_FFN_MULTIPLE)) * LOCAL_FFN_MULTIPLE)
        if self.subword_vocab_size is None:
            self.subword_vocab_size = src.vocab_size + 1
        if self.local_hidden_size % self.local_heads != 0 or (self.local_hidden_size // 2) % self.local_heads != 0:
            raise ValueError(
                f"local_hidden_size={self.local_hidden_size} must be divisible by 2·local_heads={2 * self.local_heads} "
                "(q/k are d/2 wide and split across heads)"
            )
        if self.source_prior and self.prior_vocab_rows is None:
            self.prior_vocab_rows = src.vocab_size
        if not 0.0 < self.prior_floor < 1.0:
            raise ValueError(f"prior_floor must be in (0, 1), got {self.prior_floor}")
        if type(self.boundary_lookahead) is not int or not 1 <= self.boundary_lookahead <= MAX_BOUNDARY_LOOKAHEAD:
            raise ValueError(f"boundary_lookahead must be an integer in [1, {MAX_BOUNDARY_LOOKAHEAD}], "
                             f"got {self.boundary_lookahead!r}")

    @property
    def global_hidden_size(self) -> int:
        """d_g, the source model's width."""
        return self.source_config.hidden_size

    @property
    def fused_vocab_size(self) -> int:
        """2·V_b: plain ids, then the same ids fused with "ends a patch"."""
        return 2 * self.byte_vocab_size

    @property
    def no_subword_id(self) -> int:
        """Row of the subword embedding used where no source token ends at a byte (starts at zero)."""
        return self.subword_vocab_size - 1

    @property
    def max_patches(self) -> int | None:
        """Longest patch sequence the global model accepts (its context length), if it declares one."""
        return getattr(self.source_config, "max_position_embeddings", None) or getattr(
            self.source_config, "n_positions", None
        )


def unknown_options(options: Iterable[str]) -> list[str]:
    """The names in `options` that are not ByteliftConfig fields, sorted: PretrainedConfig would keep them as
    silent attributes, so every entry point that takes model options refuses them by name."""
    return sorted(set(options) - set(ByteliftConfig.__annotations__))


# YAML 1.1 (PyYAML) reads a float without a dot, such as 1e-3, as a string; YAML 1.2 and Python read a number.
YAML_EXPONENT_FLOAT = re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$")


def load_yaml(text: str) -> Any:
    """`yaml.safe_load`, except that 1e-3 and its kind are floats: config files and KEY=VALUE options give
    learning rates that way."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", YAML_EXPONENT_FLOAT, list("-+0123456789"))
    return yaml.load(text, Loader=Loader)  # noqa: S506 - a SafeLoader
