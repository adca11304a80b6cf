"""`bytelift transfer`: global model + scale·(POST − BASE), checks before anything is written, the output folder."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import bytelift  # noqa: F401  (registers the Auto classes)
from bytelift.cli import main
from bytelift.modeling import ByteliftForCausalLM
from bytelift.transfer import transfer
from tests.test_chat_template import EOS_TEMPLATE
from tests.tiny_models import tiny_config, tiny_source
from tests.tiny_tokenizers import make_bytelevel_tokenizer

SCALE = 0.5


def _perturbed(model, seed: int, std: float = 0.05):
    """`model` with every parameter moved by Gaussian noise (a stand-in for a fine-tune)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * std)
    return model


def _save(model, tokenizer, folder):
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """BASE, POST (BASE moved; its tokenizer gains a chat template) and a byte model of BASE whose global model
    and local modules were moved too (as training moves them), all saved as folders."""
    root = tmp_path_factory.mktemp("transfer")
    tok = make_bytelevel_tokenizer()
    base = tiny_source("llama", tok, seed=0)
    byte_model = _perturbed(ByteliftForCausalLM.from_source(base, tok, local_heads=4), seed=1)
    byte_dir = root / "bytes"
    byte_model.save_pretrained(byte_dir)
    base = tiny_source("llama", tok, seed=0)  # from_source took over the first one's transformer
    post_tok = make_bytelevel_tokenizer()
    post_tok.chat_template = EOS_TEMPLATE
    return {
        "root": root, "tok": tok, "byte_dir": str(byte_dir), "base": _save(base, tok, root / "base"),
        "post": _save(_perturbed(tiny_source("llama", tok, seed=0), seed=2), post_tok, root / "post"),
    }


def _params(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


@pytest.mark.parametrize("embedding_delta, head_delta", [(False, True), (True, False)])
def test_transfer_adds_the_scaled_delta_to_the_global_model_only(setup, embedding_delta, head_delta):
    out = setup["root"] / f"out-{embedding_delta}-{head_delta}"
    transfer(setup["byte_dir"], setup["base"], setup["post"], out, scale=SCALE,
             subword_embedding_delta=embedding_delta, prior_head_delta=head_delta)
    before = ByteliftForCausalLM.from_pretrained(setup["byte_dir"])
    after = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(after, ByteliftForCausalLM) and (out / "model.safetensors").is_file()
    base = AutoModelForCausalLM.from_pretrained(setup["base"])
    post = AutoModelForCausalLM.from_pretrained(setup["post"])
    base_p, post_p = _params(base.model), _params(post.model)
    new_p = _params(after)
    for name, old in _params(before).items():
        new = new_p[name]
        if name.startswith("global_model."):
            key = name.removeprefix("global_model.")
            torch.testing.assert_close(new, old + SCALE * (post_p[key] - base_p[key]), rtol=0, atol=1e-6)
            assert not torch.equal(new, old)
        elif name == "prior_head.weight":
            delta = post.lm_head.weight - base.lm_head.weight
            torch.testing.assert_close(new, old + SCALE * delta if head_delta else old, rtol=0, atol=1e-6)
        elif name == "encoder.subword_embedding.weight":
            rows = base.model.embed_tokens.weight.shape[0] - 3  # the tokenizer's rows (3 padding rows after)
            delta = post_p["embed_tokens.weight"][:rows] - base_p["embed_tokens.weight"][:rows]
            expected = old.clone()
            if embedding_delta:
                expected[:rows] += SCALE * delta
            torch.testing.assert_close(new, expected, rtol=0, atol=1e-6)
        else:  # the local modules are untouched
            assert torch.equal(new, old), name
    assert after.config.transfers == [{
        "base": setup["base"], "post": setup["post"], "scale": SCALE, "subword_embedding_delta": embedding_delta,
        "prior_head_delta": head_delta, "chat_template": "post",
    }]
    # POST's chat template came along: the transferred model chats as POST was tuned to.
    assert after.tokenizer.end_of_turn == setup["tok"].eos_token
    rendered = after.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert rendered == "<|bos|>user\nhi<|endoftext|>\n"


def _other_source(setup, name: str, arch: str = "llama", tokenizer=None, **config_changes) -> str:
    tok = tokenizer or setup["tok"]
    ids = {k: getattr(tok, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    config = tiny_config(arch, len(tok) + 3, special_ids=ids)
    for key, value in config_changes.items():
        setattr(config, key, value)
    return _save(AutoModelForCausalLM.from_config(config), tok, setup["root"] / name)


@pytest.mark.parametrize("kind, message", [
    ("arch", "is a qwen2 model"),
    ("shape", r"mlp\.gate_proj\.weight has shape \(96, 64\)"),
    ("config", "rms_norm_eps=0.001"),
    ("tokenizer", "tokenizer has .* at id"),
])
def test_mismatches_are_refused_before_anything_is_written(setup, kind, message):
    if kind == "arch":
        post = _other_source(setup, "post-qwen2", arch="qwen2")
    elif kind == "shape":
        post = _other_source(setup, "post-wider", intermediate_size=96)
    elif kind == "config":
        post = _other_source(setup, "post-eps", rms_norm_eps=1e-3)
    else:
        post = _other_source(setup, "post-vocab", tokenizer=make_bytelevel_tokenizer(vocab_size=790))
    out = setup["root"] / f"refused-{kind}"
    with pytest.raises(ValueError, match=message) as err:
        transfer(setup["byte_dir"], setup["base"], post, out)
    assert str(err.value).startswith(f"--post {post}")  # names the checkpoint
    assert not out.exists() and not list(setup["root"].glob(f"refused-{kind}*"))


def test_cli(setup, capsys):
    out = setup["root"] / "cli-out"
    args = ["transfer", setup["byte_dir"], "--base", setup["base"], "--post", setup["post"], "--output", str(out)]
    assert main(args + ["--scale", "2"]) == 0
    assert AutoModelForCausalLM.from_pretrained(out).config.transfers[0]["scale"] == 2.0
    assert main(args) == 2  # the output exists: refused, untouched
    assert "already exists" in capsys.readouterr().err
    assert main(["transfer", setup["byte_dir"], "--base", setup["base"], "--post", str(setup["root"] / "nothing"),
                 "--output", str(setup["root"] / "cli-missing")]) == 2
    assert not (setup["root"] / "cli-missing").exists()
