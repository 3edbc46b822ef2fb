"""Batches of whole examples: next-fit packing, segments and positions restarting per
example, too-long examples, and packed == unpacked loss on a tiny random model."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxfit.data.text import default_text_config, prepare_text_data, train_batches
from jaxfit.data.text import eval_batches as make_eval_batches
from jaxfit.data.text.packing import pack_rows
from jaxfit.losses import cross_entropy
from jaxfit.models.gpt2 import GPT2Config, GPT2LMHeadModel
from jaxfit.models.llama import LlamaConfig, LlamaForCausalLM

CHATML = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def test_next_fit_rows():
    lengths = np.array([5, 3, 9, 2, 4])  # positions used: 4, 2, 8, 1, 3
    rows = pack_rows(np.arange(5), lengths, seq_len=8, packing=True)
    assert [r.tolist() for r in rows] == [[0, 1], [2], [3, 4]]
    assert [r.tolist() for r in pack_rows(np.array([1, 3]), lengths, 8, False)] == [[1], [3]]


def _chat_file(path, n=24, seed=0):
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for _ in range(n):
        turns = []
        for _turn in range(int(rng.integers(1, 4))):
            a, b = (int(x) for x in rng.integers(0, 20, 2))
            turns += [
                {"role": "user", "content": f"What is {a} plus {b}?"},
                {"role": "assistant", "content": f"{a} plus {b} is {a + b}."},
            ]
        rows.append({"messages": turns})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _data(tmp_path, packing: bool, **kw):
    c = default_text_config()
    c.update(
        path=str(_chat_file(tmp_path / "chat.jsonl")),
        format="chat",
        chat_template=CHATML,
        val_fraction=0.25,
        packing=packing,
        **kw,
    )
    c.tokenizer.vocab_size = 300
    return prepare_text_data(c, tmp_path / "run")


def test_packed_rows_restart_segments_and_positions(tmp_path):
    data = _data(tmp_path, packing=True)
    seq_len = 256
    it = train_batches(data.train, batch_size=4, seq_len=seq_len, seed=3)
    starts = data.train.document_starts()
    assert it.examples == data.train.meta["documents"] == len(starts) - 1
    assert it.num_rows < it.examples  # several conversations share a row
    b = it.batch(0)
    for r, row in enumerate(it.row_indices(0)):
        examples = it.rows[row]
        seg, pos = b["segment_ids"][r], b["positions"][r]
        at = 0
        for k, e in enumerate(examples, start=1):
            n = int(starts[e + 1] - starts[e]) - 1
            tokens = data.train.tokens[starts[e] : starts[e + 1]]
            assert (seg[at : at + n] == k).all() and pos[at : at + n].tolist() == list(range(n))
            assert b["input_ids"][r, at : at + n].tolist() == tokens[:-1].tolist()
            assert b["labels"][r, at : at + n].tolist() == tokens[1:].tolist()
            mask = data.train.loss_mask[starts[e] + 1 : starts[e + 1]]
            assert b["loss_mask"][r, at : at + n].tolist() == mask.tolist()
            at += n
        assert (seg[at:] == 0).all() and (b["loss_mask"][r, at:] == 0).all()
    # resumable: a batch is a function of (seed, step)
    again = train_batches(data.train, batch_size=4, seq_len=seq_len, seed=3, start_step=5)
    assert all((again.batch(5)[k] == it.batch(5)[k]).all() for k in b)
    state = it.get_state()
    it.set_state(state)
    with pytest.raises(ValueError, match="num_rows"):
        it.set_state({**state, "num_rows": 1})


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_packed_and_unpacked_give_the_same_loss(tmp_path, family, jit_fast):
    seq_len = 256
    packed = _data(tmp_path / "p", packing=True)
    unpacked = _data(tmp_path / "u", packing=False)
    vocab = packed.tokenizer.vocab_size
    if family == "llama":
        model = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=vocab,
                hidden_size=32,
                intermediate_size=48,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
            )
        )
    else:
        model = GPT2LMHeadModel(
            GPT2Config(vocab_size=vocab, n_positions=seq_len, n_embd=32, n_layer=2, n_head=4)
        )
    params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]

    @jit_fast
    def loss(batch):
        logits = model.apply(
            {"params": params},
            batch["input_ids"],
            segment_ids=batch["segment_ids"],
            positions=batch["positions"],
        )
        return cross_entropy(logits, batch["labels"], batch["loss_mask"])

    def total(data):
        batches = make_eval_batches(data.validation, batch_size=4, seq_len=seq_len)
        sums = [jax.device_get(loss(b)) for b in batches]
        return sum(float(s) for s, _ in sums), sum(float(n) for _, n in sums), len(batches)

    (s_packed, n_packed, rows_packed), (s_plain, n_plain, rows_plain) = (
        total(packed),
        total(unpacked),
    )
    assert (
        n_packed
        == n_plain
        == make_eval_batches(unpacked.validation, batch_size=4, seq_len=seq_len).num_loss_tokens
    )
    assert rows_packed < rows_plain  # fewer batches for the same examples
    np.testing.assert_allclose(s_packed, s_plain, rtol=2e-5)
