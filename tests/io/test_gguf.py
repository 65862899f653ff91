"""GGUF checkpoints read as the Hugging Face checkpoint of the same model: names, shapes, the
q/k un-permutation, dequantization (F32, F16, Q8_0, Q4_1) against the same model written as
safetensors; a merge with GGUF inputs loads with from_pretrained; bad files are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from epimer.cli import main  # noqa: E402
from epimer.errors import InputError  # noqa: E402
from epimer.io.gguf import NAMES, unpermute_rows  # noqa: E402
from epimer.io.reader import open_checkpoint  # noqa: E402

Q = gguf.GGMLQuantizationType
HEADS, KV = 4, 2


def tiny_llama(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=HEADS, num_key_value_heads=KV, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg).eval()


def permute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's permutation of q/k rows (what its converter writes)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, state: dict[str, torch.Tensor], types: dict[str, object]) -> dict[str, torch.Tensor]:
    """Write ``state`` (HF names) as a llama GGUF, each tensor in ``types[kind]`` (default F32);
    returns what a correct reader must give back: permute, quantize, dequantize, un-permute."""
    to_gguf = {}
    for g, h in NAMES["llama"].items():
        for i in range(2):
            to_gguf[h.format(i=i)] = g.format(i=i)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV)
    want = {}
    for name, t in state.items():
        x = t.detach().numpy().astype(np.float32)
        heads = HEADS if "q_proj" in name else KV if "k_proj" in name else None
        if heads:
            x = permute_rows(x, heads)
        kind = next((k for k in types if k in name), None)
        qtype = types[kind] if kind else Q.F32
        if qtype in (Q.F32, Q.F16):
            data = x.astype(np.float16 if qtype == Q.F16 else np.float32)
            w.add_tensor(to_gguf[name], data)
            back = data.astype(np.float32)
        else:
            data = gguf.quantize(x, qtype)
            w.add_tensor(to_gguf[name], data, raw_shape=data.shape, raw_dtype=qtype)
            back = gguf.dequantize(data, qtype)
        back = torch.from_numpy(back.copy()).reshape(t.shape)
        want[name] = unpermute_rows(back, heads) if heads else back
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return want


TYPES = {"embed_tokens": Q.Q8_0, "q_proj": Q.Q4_1, "k_proj": Q.Q8_0, "mlp.up_proj": Q.Q4_1, "o_proj": Q.F16}


def test_gguf_reads_as_the_hf_checkpoint(tmp_path) -> None:
    model = tiny_llama()
    state = {k: v for k, v in model.state_dict().items()}
    want = write_gguf(tmp_path / "m.gguf", state, TYPES)
    ck = open_checkpoint(tmp_path / "m.gguf")
    assert sorted(ck.names()) == sorted(state)
    for name, t in state.items():
        got = ck.get(name)
        assert got.dtype == torch.float32 and tuple(got.shape) == tuple(t.shape), name
        assert torch.equal(got, want[name]), name
        if not any(k in name for k in TYPES):  # F32 tensors come back exactly
            assert torch.equal(got, t), name
    # the un-permutation inverts llama.cpp's on every shape used here
    for heads in (HEADS, KV):
        x = torch.randn(heads * 8, 5)
        assert torch.equal(unpermute_rows(torch.from_numpy(permute_rows(x.numpy(), heads)), heads), x)


def test_merge_of_gguf_models_loads_and_equals_the_safetensors_merge(tmp_path) -> None:
    base, tasks = tiny_llama(0), [tiny_llama(1), tiny_llama(2)]
    dense = {}
    for name, m in [("base", base), ("task_0", tasks[0]), ("task_1", tasks[1])]:
        # the reference: the same (dequantized) values written as a Hugging Face folder
        values = write_gguf(tmp_path / f"{name}.gguf", m.state_dict(), {"q_proj": Q.Q8_0})
        m.load_state_dict(values)
        m.save_pretrained(tmp_path / name)
        dense[name] = values
    cfgs = {
        "gguf.yaml": {"base_model": "base.gguf", "models": ["task_0.gguf", "task_1.gguf"]},
        "hf.yaml": {"base_model": "base", "models": ["task_0", "task_1"]},
    }
    for file, cfg in cfgs.items():
        cfg.update(method="tsv_m", parameters={"rank_fraction": 0.5})
        (tmp_path / file).write_text(yaml.safe_dump(cfg))
    runner = CliRunner()
    for file in cfgs:
        res = runner.invoke(main, ["merge", str(tmp_path / file), "-o", str(tmp_path / f"out_{file}"), "-q"])
        assert res.exit_code == 0, res.output
    a, b = open_checkpoint(tmp_path / "out_gguf.yaml"), open_checkpoint(tmp_path / "out_hf.yaml")
    assert sorted(a.names()) == sorted(b.names())
    for n in a.names():
        assert torch.equal(a.get(n), b.get(n)), n
    # with the base folder's config beside it, the GGUF merge is a loadable model
    for f in ("config.json", "generation_config.json"):
        if (tmp_path / "base" / f).exists():
            (tmp_path / "out_gguf.yaml" / f).write_bytes((tmp_path / "base" / f).read_bytes())
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out_gguf.yaml")
    out = merged.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 6)


def test_bad_gguf_files_are_refused(tmp_path) -> None:
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + b"\x00" * 20)
    with pytest.raises(InputError, match="junk.gguf: not a readable GGUF file"):
        open_checkpoint(tmp_path / "junk.gguf")
    for arch, tensor, message in [("gpt2", "token_embd.weight", "architecture 'gpt2' is not supported"),
                                  ("llama", "blk.0.attn_qkv.weight", "'blk.0.attn_qkv.weight' has no Hugging Face name")]:
        w = gguf.GGUFWriter(str(tmp_path / f"{arch}.gguf"), arch)
        w.add_head_count(2)
        w.add_tensor(tensor, np.zeros((4, 4), dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with pytest.raises(InputError, match=message):
            open_checkpoint(tmp_path / f"{arch}.gguf")


def write_full_gguf(path, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A tiny llama GGUF with the metadata and tokenizer a conversion needs (gpt2-style BPE)."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *letters, "Ġ", *[f"Ġ{c}" for c in letters]]
    tokens += [f"<extra_{i}>" for i in range(64 - len(tokens))]
    merges = [f"Ġ {c}" for c in letters]
    to_gguf = {h.format(i=i): g.format(i=i) for g, h in NAMES["llama"].items() for i in range(2)}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(64)
    w.add_embedding_length(64)
    w.add_feed_forward_length(128)
    w.add_block_count(2)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV)
    w.add_rope_dimension_count(64 // HEADS)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(64)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(2)
    want = {}
    for name, t in state.items():
        x = t.detach().numpy().astype(np.float32)
        heads = HEADS if "q_proj" in name else KV if "k_proj" in name else None
        w.add_tensor(to_gguf[name], permute_rows(x, heads) if heads else x)
        want[name] = t.detach().clone()
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return want


def test_convert_gguf_to_a_folder_that_from_pretrained_loads(tmp_path) -> None:
    model = tiny_llama(3)
    state = {k: v for k, v in model.state_dict().items()}
    want = write_full_gguf(tmp_path / "m.gguf", state)
    res = CliRunner().invoke(main, ["convert-gguf", str(tmp_path / "m.gguf"), "-o", str(tmp_path / "hf"), "-q"])
    assert res.exit_code == 0, res.output
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert loaded.config.num_key_value_heads == KV and loaded.config.vocab_size == 64
    got = loaded.state_dict()
    for name, t in want.items():
        assert torch.equal(got[name], t), name
    ids = torch.tensor([[5, 9, 30, 12]])
    assert torch.allclose(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok.decode(tok("hello world", add_special_tokens=False)["input_ids"]) == "hello world"
    # an existing folder is refused without --overwrite, and left as it was
    res = CliRunner().invoke(main, ["convert-gguf", str(tmp_path / "m.gguf"), "-o", str(tmp_path / "hf"), "-q"])
    assert res.exit_code == 2 and "already exists" in res.output
