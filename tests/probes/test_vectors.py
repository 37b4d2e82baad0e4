import numpy as np
import pytest
import torch

from probes.directions import (decode_latent_vector, mean_difference, residual_steering_vectors,
                               sae_latent_direction, sae_steering_vectors)
from probes.rows import LabelledRows
from probes.vectors import SteeringVector, VectorSet


def _vec(values, layer=2, **meta):
    return SteeringVector(torch.tensor(values, dtype=torch.float32), layer, {"model": "m", **meta})


def test_arithmetic_and_meta():
    a, b = _vec([1.0, 2.0], category="safety"), _vec([3.0, -1.0], category="incomplete")
    assert torch.equal((a + b).vector, torch.tensor([4.0, 1.0]))
    assert torch.equal((a - b).vector, torch.tensor([-2.0, 3.0]))
    assert torch.equal((-a).vector, torch.tensor([-1.0, -2.0]))
    assert torch.equal((2 * a).vector, (a * 2).vector) and torch.equal((a / 2).vector, torch.tensor([0.5, 1.0]))
    s = a + b
    assert s.meta["model"] == "m" and s.meta["category"] == "(safety)+(incomplete)" and len(s.meta["operands"]) == 2
    assert (a * 3).meta["scale"] == 3.0 and (a * 3).meta["norm"] == pytest.approx(3 * np.sqrt(5))
    assert a.norm() == pytest.approx(np.sqrt(5)) and a.unit().norm() == pytest.approx(1.0)
    assert a.vector.dtype == torch.float32 and a.d_model == 2


def test_arithmetic_refuses_mismatches():
    a = _vec([1.0, 2.0])
    with pytest.raises(ValueError, match="layer 2 and layer 3"):
        a + _vec([1.0, 1.0], layer=3)
    with pytest.raises(ValueError, match="d_model 2 and 3"):
        a - _vec([1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="model 'm' and model 'other'"):
        a + SteeringVector(torch.ones(2), 2, {"model": "other"})
    with pytest.raises(ValueError, match="zero"):
        a / 0
    with pytest.raises(ValueError, match="zero steering vector"):
        _vec([0.0, 0.0]).unit()
    with pytest.raises(TypeError):
        a * a
    with pytest.raises(ValueError, match="NaN"):
        _vec([float("nan"), 1.0])


def test_save_load_round_trip(tmp_path):
    a = _vec([0.1, -0.2, 0.3], category="safety", splits={"extract": {"split_hash": "abc"}})
    a.save(tmp_path / "safety")
    loaded = SteeringVector.load(tmp_path / "safety", expected_layer=2)
    assert loaded == a
    with pytest.raises(ValueError, match="expected layer 5"):
        SteeringVector.load(tmp_path / "safety", expected_layer=5)
    with pytest.raises(FileNotFoundError):
        SteeringVector.load(tmp_path / "nothing")
    vs = VectorSet({"safety": a, "incomplete": -a})
    vs.save(tmp_path / "set")
    back = VectorSet.load(tmp_path / "set")
    assert list(back) == ["safety", "incomplete"] and back["incomplete"] == -a
    with pytest.raises(ValueError, match="layer"):
        VectorSet({"a": a, "b": _vec([1.0, 2.0, 3.0], layer=4)})


def _rows(x, cats, split="extract"):
    return LabelledRows(np.asarray(x, dtype=np.float32), np.array(cats), np.array([split] * len(cats)),
                        np.array([f"r{i}" for i in range(len(cats))]))


def test_mean_difference_matches_hand_computation():
    rows = _rows([[1, 2], [3, 4], [10, 0], [20, 2], [100, 100]],
                 ["benign", "benign", "safety", "safety", "contrast"])
    np.testing.assert_allclose(mean_difference(rows, "safety"), [15 - 2, 1 - 3])
    vs = residual_steering_vectors(rows, layer=4, model="tiny", categories=("safety",))
    assert vs["safety"].layer == 4 and vs["safety"].meta["space"] == "residual"
    assert vs["safety"].meta["n_rows"] == {"category": 2, "baseline": 2}
    np.testing.assert_allclose(vs["safety"].vector.numpy(), [13.0, -2.0])
    with pytest.raises(ValueError, match="'extract' split, got rows from 'eval'"):
        mean_difference(_rows([[1, 2], [3, 4]], ["benign", "safety"], "eval"), "safety")
    with pytest.raises(ValueError, match="no rows"):
        mean_difference(rows, "humanizing")


# latents: 6 features; rows 0-1 benign, rows 2-3 safety
Z = [[1.0, 0.0, 0.0, 0.0, 0.0, 0.5],
     [1.0, 0.0, 0.0, 0.2, 0.0, 0.5],
     [1.0, 2.0, 0.05, 0.0, 0.4, 0.0],
     [1.0, 4.0, 0.05, 0.0, 0.0, 0.0]]


def test_sae_filters_inactive_shared_and_topk():
    rows = _rows(Z, ["benign", "benign", "safety", "safety"])
    d = sae_latent_direction(rows, "safety", tau=0.1)
    # f0 shared (mean 1 in both), f2 inactive (0.05 <= tau), f3/f5 inactive in safety, f1/f4 kept
    assert d.kept.tolist() == [1, 4] and 0 in d.removed_shared.tolist() and 2 in d.removed_inactive.tolist()
    np.testing.assert_allclose(d.v_z, [0, 3.0, 0, 0, 0.2, 0])
    assert sae_latent_direction(rows, "safety", tau=0.1, top_k=1).kept.tolist() == [1]
    assert sae_latent_direction(rows, "safety", tau=0.1, restrict_to=[4, 0]).kept.tolist() == [4]
    # frequency rule: f4 fires in half the safety rows; f1 fires in all benign rows? no -> still kept
    assert sae_latent_direction(rows, "safety", tau=0.0, shared_frequency=0.4).kept.tolist() == [1, 2, 4]


def test_shared_by_frequency_only():
    # feature 0: low mean in benign (below tau) but fires often there -> shared only with shared_frequency
    z = [[0.05, 0.0], [0.05, 0.0], [1.0, 1.0], [1.0, 1.0]]
    rows = _rows(z, ["benign", "benign", "safety", "safety"])
    assert sae_latent_direction(rows, "safety", tau=0.1).kept.tolist() == [0, 1]
    assert sae_latent_direction(rows, "safety", tau=0.1, shared_frequency=0.5).kept.tolist() == [1]


def test_decode_and_sae_vectors():
    rows = _rows(Z, ["benign", "benign", "safety", "safety"])
    W_dec = np.arange(18, dtype=np.float64).reshape(6, 3) / 10
    vs, latents = sae_steering_vectors(rows, torch.tensor(W_dec), layer=1, model="tiny",
                                       categories=("safety",), tau=0.1)
    expected = 3.0 * W_dec[1] + 0.2 * W_dec[4]
    np.testing.assert_allclose(decode_latent_vector(latents["safety"].v_z, W_dec), expected)
    np.testing.assert_allclose(vs["safety"].vector.numpy(), expected, rtol=1e-6)
    assert vs["safety"].meta["space"] == "sae" and vs["safety"].meta["n_latents"] == 2
    # b_dec cancels: decoding means with an affine decoder gives the same difference
    b_dec = np.array([5.0, -1.0, 2.0])
    m_c, m_b = np.mean(np.array(Z)[2:], 0), np.mean(np.array(Z)[:2], 0)
    np.testing.assert_allclose((m_c @ W_dec + b_dec) - (m_b @ W_dec + b_dec), decode_latent_vector(m_c - m_b, W_dec))
    with pytest.raises(ValueError, match="d_sae"):
        decode_latent_vector(np.ones(5), W_dec)
