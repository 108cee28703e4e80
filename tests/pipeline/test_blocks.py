"""Block discovery and input capture: replaying the captured inputs through the (unpruned) blocks reproduces the
model's own hidden states, for every family, Gemma-3 with a sliding window shorter than the sequence included."""

import pytest
import torch

from conftest import FAMILIES, tiny_model
from optimum_sparsesched.pipeline.blocks import capture_block_inputs, find_decoder_blocks, run_block
from optimum_sparsesched.pipeline.plan import compressible_modules

BLOCK_PATHS = {"llama": "model.layers", "qwen2": "model.layers", "gemma3": "model.layers",
               "opt": "model.decoder.layers", "gpt2": "transformer.h", "bloom": "transformer.h"}


@pytest.mark.parametrize("family", FAMILIES)
def test_find_decoder_blocks(family):
    model = tiny_model(family)
    name, blocks = find_decoder_blocks(model)
    assert name == BLOCK_PATHS[family]
    assert len(blocks) == model.config.get_text_config().num_hidden_layers
    assert len(compressible_modules(blocks[0])) >= 4


@pytest.mark.parametrize("family", FAMILIES)
def test_replay_reproduces_hidden_states(family):
    model = tiny_model(family)
    seq_len = 48  # gemma3's sliding window is 16
    windows = torch.randint(1, 500, (3, seq_len), generator=torch.Generator().manual_seed(0))
    captured = capture_block_inputs(model, windows, "cpu")
    _, blocks = find_decoder_blocks(model)
    assert len(captured.hidden) == 3
    for w, row in enumerate(windows):
        with torch.no_grad():
            reference = model(input_ids=row.unsqueeze(0), output_hidden_states=True, use_cache=False).hidden_states
        h = captured.hidden[w]
        torch.testing.assert_close(h, reference[0])
        for i, block in enumerate(blocks):
            with torch.no_grad():
                h = run_block(block, h, captured.args[i], captured.kwargs[i], "cpu", captured.returns_tuple)
            if i + 1 < len(blocks):  # the last entry of hidden_states has the final norm applied
                torch.testing.assert_close(h, reference[i + 1], rtol=1e-5, atol=1e-5)


def test_gemma3_blocks_get_their_own_masks():
    model = tiny_model("gemma3")
    windows = torch.randint(1, 500, (1, 48))
    captured = capture_block_inputs(model, windows, "cpu")
    sliding, full = captured.kwargs[0], captured.kwargs[1]
    # sliding and global layers get different rotary tables (different rope bases) and masks
    assert not torch.equal(sliding["position_embeddings"][0], full["position_embeddings"][0])
    m_s, m_f = sliding.get("attention_mask"), full.get("attention_mask")
    assert m_s is not None and (m_f is None or not torch.equal(m_s, m_f))


def test_capture_restores_block_forwards():
    model = tiny_model("llama")
    capture_block_inputs(model, torch.randint(1, 500, (1, 16)), "cpu")
    _, blocks = find_decoder_blocks(model)
    assert all("forward" not in b.__dict__ for b in blocks)
    out = model(input_ids=torch.randint(1, 500, (1, 16))).logits
    assert torch.isfinite(out).all()
