"""2:4 detection and the clear errors of the semi-structured conversion (the conversion itself needs CUDA)."""

import pytest
import torch

from conftest import CALIBRATION_TEXT, tiny_model
from optimum_sparsesched import SparseScheduleConfig, compress, from_semi_structured, to_semi_structured
from optimum_sparsesched.formats.semi_structured import is_2_4, two_four_linears


def test_is_2_4_on_hand_made_weights():
    w = torch.randn(8, 16)
    assert not is_2_4(w)
    pruned = w.clone().reshape(8, 4, 4)
    pruned[..., 1] = 0
    pruned[..., 3] = 0
    assert is_2_4(pruned.reshape(8, 16))
    sparser = pruned.clone()
    sparser[..., 0] = 0  # 1:4 is still "at most 2 of 4"
    assert is_2_4(sparser.reshape(8, 16))
    three = pruned.clone()
    three[0, 2, 1] = 1.0  # one group of one row with 3 nonzeros
    assert not is_2_4(three.reshape(8, 16))
    shifted = torch.cat([torch.ones(8, 2), pruned.reshape(8, 16)[:, :-2]], 1)  # 2:4 but not aligned on groups
    assert not is_2_4(shifted)
    assert not is_2_4(torch.zeros(8, 6))  # inputs not a multiple of 4
    assert is_2_4(torch.zeros(8, 8))


@pytest.fixture(scope="module")
def pruned_2_4(tokenizer):
    model = tiny_model("llama")
    cfg = SparseScheduleConfig(sparsity=0.5, pattern="2:4", dataset=str(CALIBRATION_TEXT), num_samples=2, seq_len=32)
    compress(model, cfg, tokenizer=tokenizer)
    return model, cfg


def test_detects_every_pruned_linear_and_not_the_dense_ones(pruned_2_4):
    model, cfg = pruned_2_4
    assert set(two_four_linears(model)) == set(cfg.results.layer_sparsities)  # lm_head and embeddings are dense
    assert not two_four_linears(tiny_model("llama"))


def test_float32_weights_are_refused_naming_the_dtypes(pruned_2_4):
    model, _ = pruned_2_4
    with pytest.raises(ValueError, match=r"torch.float32; .*need torch.float16 or torch.bfloat16"):
        to_semi_structured(model)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_without_cuda_the_conversion_is_refused_naming_cuda(pruned_2_4):
    import copy

    model = copy.deepcopy(pruned_2_4[0]).half()
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        to_semi_structured(model)
    assert not any(type(p) is not torch.nn.Parameter for p in model.parameters())  # nothing converted


def test_no_2_4_weight_is_refused():
    with pytest.raises(ValueError, match="no nn.Linear weight .* 2:4 pattern.*pattern='2:4'"):
        to_semi_structured(tiny_model("llama", dtype=torch.float16))


def test_from_semi_structured_leaves_dense_models_alone():
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    from_semi_structured(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="semi-structured sparse tensors need CUDA")
def test_round_trip_on_cuda(pruned_2_4):
    import copy

    model = copy.deepcopy(pruned_2_4[0]).half().cuda()
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    to_semi_structured(model)
    ids = torch.randint(1, 500, (1, 32), device="cuda")
    assert torch.isfinite(model(input_ids=ids).logits).all()
    from_semi_structured(model)
    assert all(torch.equal(dense[k], v) for k, v in model.state_dict().items())
