"""The Readout value: names, the concatenation rule, selection.json both ways, aliases, candidates."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ddae_core.config import ConfigError
from ddae_core.readout import SELECTION_FILE, Readout, Selection, candidates, resolve_taps

# selection.json as the stages write it today (copied from a tiny end-to-end run): both start so, ...
_CLASS_NAMES = """{
  "class_names": [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot"
  ],
"""

# ... then the probe's ...
PROBE_SELECTION = _CLASS_NAMES + """  "data_checksum": "73b02034400ae35b4a0462dab2d56e027ac864dcabe9a5825ed053777a554518",
  "l2": 0.0001,
  "level": 11.0,
  "level_kind": "t",
  "network_hash": "8eaf4adb2cbe866dfd0a9627bf51d697b045bc1f90e7e32d346629bc32eb830d",
  "pool": 2,
  "seed": 0,
  "taps": [
    "mid.res1",
    "dec.16x16.res0"
  ],
  "test_acc": 0.735,
  "val_acc": 0.8333333333333334
}
"""

# ... and the finetune stage's head (no l2 or val_acc; kind; the fine-tuned network's hash)
FINETUNE_SELECTION = _CLASS_NAMES + """  "data_checksum": "73b02034400ae35b4a0462dab2d56e027ac864dcabe9a5825ed053777a554518",
  "kind": "finetune",
  "level": 11.0,
  "level_kind": "t",
  "network_hash": "1889858bf7ce9a7ab18e21443b880f9a86cf7bf5a9ecf7374385cd0c2d6f5436",
  "pool": 2,
  "seed": 0,
  "taps": [
    "mid.res1",
    "dec.16x16.res0"
  ],
  "test_acc": 0.725
}
"""


def test_json_round_trip_and_coercion():
    readout = Readout(["mid.res1", "dec.7x7.res0"], 11, 2, 3)  # list taps, int level: as JSON gives them
    assert readout == Readout(("mid.res1", "dec.7x7.res0"), 11.0, 2, 3)
    assert isinstance(readout.taps, tuple) and isinstance(readout.level, float)
    data = json.loads(json.dumps(readout.to_json()))
    assert data == {"taps": ["mid.res1", "dec.7x7.res0"], "level": 11.0, "pool": 2, "seed": 3}
    assert Readout.from_json({**data, "l2": 0.1, "kind": "finetune"}) == readout  # other keys ignored
    assert {readout: 1}[Readout.from_json(data)] == 1  # hashable: usable as a candidate's key
    with pytest.raises(ValueError, match="missing key.*'seed'"):
        Readout.from_json({"taps": ["mid.res1"], "level": 11, "pool": 1})
    with pytest.raises(ValueError, match="the string 'mid.res1'"):
        Readout.from_json({"taps": "mid.res1", "level": 11, "pool": 1, "seed": 0})


def test_the_precision_is_part_of_the_readout_and_old_files_read_as_fp32():
    bf16 = Readout(("mid.res1", "dec.7x7.res0"), 11.0, 2, 3, "bf16")
    assert bf16.to_json()["precision"] == "bf16"
    assert Readout.from_json(json.loads(json.dumps(bf16.to_json()))) == bf16
    assert bf16 != Readout(("mid.res1", "dec.7x7.res0"), 11.0, 2, 3)  # the same taps read in fp32 are other features
    assert {m.precision for m in bf16.members} == {"bf16"}
    written_before = {"taps": ["mid.res1"], "level": 11, "pool": 1, "seed": 0}  # selection.json of older versions
    assert Readout.from_json(written_before).precision == "fp32"
    with pytest.raises(ValueError, match="precision.*'fp16'"):
        Readout(("mid.res1",), 11.0, 1, 0, "fp16")
    singles = [Readout(("mid.res1",), 11.0, 1, 0, "bf16"), Readout(("dec.7x7.res0",), 11.0, 1, 0, "fp32")]
    with pytest.raises(ValueError, match="several precisions"):
        candidates(singles, [], {})
    [group] = [c for c in candidates([s.__class__(s.taps, s.level, s.pool, s.seed, "bf16") for s in singles],
                                     [["mid.res1", "dec.7x7.res0"]], {}) if len(c.taps) == 2]
    assert group.precision == "bf16"  # a concatenation reads its members as they were extracted


def test_label_tap_name_and_members():
    single = Readout(("mid.res1",), 11.0, 1, 0)
    assert (single.label, single.tap_name) == ("mid.res1@11/p1", "mid.res1")
    pair = Readout(("mid.res1", "dec.16x16.res0"), 0.0604, 2, 0)
    assert (pair.label, pair.tap_name) == ("mid.res1+dec.16x16.res0@0.0604/p2", "mid.res1+dec.16x16.res0")
    assert pair.key == (("mid.res1", "dec.16x16.res0"), 0.0604, 2)
    assert pair.feature_keys == (("mid.res1", 0.0604, 2), ("dec.16x16.res0", 0.0604, 2))
    assert pair.members == (Readout(("mid.res1",), 0.0604, 2, 0), Readout(("dec.16x16.res0",), 0.0604, 2, 0))


@pytest.mark.parametrize("taps, fragment", [
    ((), "empty"),
    (("mid.res1+dec.7x7.res0",), "without '\\+'"),  # a concatenation travels as taps, never as a fake name
    (("mid.res1", ""), "''"),
    ("mid.res1", "the string"),  # not a tuple of its characters
])
def test_bad_taps_are_rejected(taps, fragment):
    with pytest.raises(ValueError, match=fragment):
        Readout(taps, 11.0, 1, 0)


def test_pool_must_be_a_grid():
    with pytest.raises(ValueError, match="pool must be >= 1"):
        Readout(("mid.res1",), 11.0, 0, 0)


@pytest.mark.parametrize("module", [np, torch], ids=["numpy", "torch"])
def test_concat_follows_tap_order_not_mapping_order(module):
    readout = Readout(("dec.7x7.res0", "mid.res1"), 11.0, 1, 0)
    blocks = {("mid.res1", 11.0, 1): module.ones((4, 2)), ("dec.7x7.res0", 11.0, 1): module.zeros((4, 3))}
    out = readout.concat(blocks)
    assert type(out) is type(module.zeros(1)) and tuple(out.shape) == (4, 5)
    assert out[0].tolist() == [0.0, 0.0, 0.0, 1.0, 1.0]  # first tap's 3 columns, then the second's 2


@pytest.mark.parametrize("module", [np, torch], ids=["numpy", "torch"])
def test_concat_of_one_block_is_that_block(module):
    readout = Readout(("mid.res1",), 11.0, 1, 0)
    block = module.ones((4, 3))
    assert readout.concat({("mid.res1", 11.0, 1): block, ("dec.7x7.res0", 11.0, 1): block * 2}) is block


def test_concat_keeps_the_autograd_graph():
    readout = Readout(("a", "b"), 11.0, 1, 0)
    x = torch.ones(2, 3, requires_grad=True)
    readout.concat({("a", 11.0, 1): x, ("b", 11.0, 1): 2 * x}).sum().backward()
    assert x.grad.tolist() == [[3.0] * 3] * 2


def test_concat_names_a_missing_block():
    readout = Readout(("mid.res1", "dec.7x7.res0"), 11.0, 1, 0)
    with pytest.raises(KeyError, match=r"mid.res1\+dec.7x7.res0@11/p1.*'dec.7x7.res0', 11.0, 1"):
        readout.concat({("mid.res1", 11.0, 1): np.ones((2, 2))})


def test_concat_reads_extract_batch_output():
    """The keys of the one feature path fit: the readout of ``extract_batch``'s dict, taps in order."""
    from ddae_core import DiffusionConfig, build_denoiser, build_unet, extract_batch

    torch.manual_seed(0)
    denoiser = build_denoiser(DiffusionConfig(framework="ddpm"), build_unet("ddpm-tiny", in_channels=1, resolution=28))
    readout = Readout(("dec.14x14.res0", "mid.res1"), 11, 2, 0)
    out = extract_batch(denoiser, torch.rand(2, 1, 28, 28) * 2 - 1, [5, 6], taps=readout.taps,
                        levels=[readout.level], pools=[1, readout.pool], seed=readout.seed)
    expected = np.concatenate([out[("dec.14x14.res0", 11.0, 2)], out[("mid.res1", 11.0, 2)]], axis=1)
    np.testing.assert_array_equal(readout.concat(out), expected)


@pytest.mark.parametrize("text, kind", [(PROBE_SELECTION, "probe"), (FINETUNE_SELECTION, "finetune")])
def test_todays_selection_files_read_and_rewrite_byte_identically(tmp_path, text, kind):
    from ddae_core.atomic import write_json_atomic  # the writer both stages use

    (tmp_path / SELECTION_FILE).write_text(text)
    selection = Selection.read(tmp_path)
    assert selection.kind == kind
    assert selection.readout == Readout(("mid.res1", "dec.16x16.res0"), 11.0, 2, 0)
    assert selection.class_names[0] == "T-shirt/top" and len(selection.class_names) == 10
    if kind == "probe":
        assert (selection.l2, selection.val_acc, selection.test_acc) == (0.0001, 0.8333333333333334, 0.735)
    else:
        assert (selection.l2, selection.val_acc, selection.test_acc) == (None, None, 0.725)
    write_json_atomic(tmp_path / "again" / SELECTION_FILE, selection.to_json())
    assert (tmp_path / "again" / SELECTION_FILE).read_bytes() == text.encode()
    assert Selection.from_json(selection.to_json()) == selection


def test_selection_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        Selection.read(tmp_path)
    data = json.loads(PROBE_SELECTION)
    del data["data_checksum"]
    (tmp_path / SELECTION_FILE).write_text(json.dumps(data))
    with pytest.raises(ValueError, match=rf"{SELECTION_FILE}: missing key.*'data_checksum'"):
        Selection.read(tmp_path)
    (tmp_path / SELECTION_FILE).write_text(json.dumps({**json.loads(PROBE_SELECTION), "kind": "knn"}))
    with pytest.raises(ValueError, match=rf"{SELECTION_FILE}: selection kind: expected 'probe', 'finetune' or 'anomaly'"):
        Selection.read(tmp_path)


KNOWN = ["enc.28x28.res0", "mid.res1", "dec.7x7.res0", "dec.7x7.res1"]
ALIASES = {"out_1": ("dec.7x7.res0",), "out_2": ("dec.7x7.res1",)}
SELECTORS = {"mid": ("mid.res1",), "dec1": ("dec.7x7.res0", "dec.7x7.res1"), **ALIASES}


def test_resolve_taps_translates_aliases():
    assert resolve_taps(("out_2", "mid.res1"), KNOWN, ALIASES, "extract.taps") == ("dec.7x7.res1", "mid.res1")


def test_resolve_taps_expands_selectors_and_lists_each_block_once():
    assert resolve_taps(("mid", "dec1"), KNOWN, SELECTORS, "extract.taps") == ("mid.res1", "dec.7x7.res0",
                                                                               "dec.7x7.res1")
    assert resolve_taps(("out_2", "dec1", "mid.res1", "mid"), KNOWN, SELECTORS, "extract.taps") == (
        "dec.7x7.res1", "dec.7x7.res0", "mid.res1")


@pytest.mark.parametrize("taps, key, aliases, message", [
    (("mid.res1", "mid.res9"), "extract.taps", ALIASES,
     "extract.taps[1]: unknown tap 'mid.res9'; this network's taps: enc.28x28.res0, mid.res1, dec.7x7.res0, "
     "dec.7x7.res1; selectors: out_1, out_2"),
    (("mid.res1", "nope"), "probe.concat[0]", {},
     "probe.concat[0][1]: unknown tap 'nope'; this network's taps: enc.28x28.res0, mid.res1, dec.7x7.res0, "
     "dec.7x7.res1"),
])
def test_resolve_taps_errors_name_the_key_the_tap_and_the_choices(taps, key, aliases, message):
    with pytest.raises(ConfigError) as info:  # the wording validation has always used
        resolve_taps(taps, KNOWN, aliases, key)
    assert str(info.value) == message


def _singles(taps, levels, pools, seed=0):
    """Single-tap readouts in the extract stage's key order: tap, then level, then pool."""
    return [Readout((t,), level, p, seed) for t in taps for level in levels for p in pools]


def test_candidates_order_singles_then_groups_by_sorted_level_and_pool():
    singles = _singles(["mid.res1", "dec.7x7.res0", "dec.7x7.res1"], [50.0, 11.0], [2, 1])
    found = candidates(singles, [["out_2", "mid.res1"], ["mid.res1", "out_1"]], ALIASES)
    assert [r.label for r in found] == [s.label for s in singles] + [
        "dec.7x7.res1+mid.res1@11/p1", "dec.7x7.res1+mid.res1@11/p2",
        "dec.7x7.res1+mid.res1@50/p1", "dec.7x7.res1+mid.res1@50/p2",
        "mid.res1+dec.7x7.res0@11/p1", "mid.res1+dec.7x7.res0@11/p2",
        "mid.res1+dec.7x7.res0@50/p1", "mid.res1+dec.7x7.res0@50/p2",
    ]
    assert all(r.seed == 0 for r in found)


def test_candidates_list_a_repeated_readout_once_in_its_first_place():
    singles = _singles(["mid.res1", "dec.7x7.res0"], [11.0], [1])
    found = candidates(singles, [["out_1"], ["mid.res1", "dec.7x7.res0"], ["mid.res1", "out_1"]],
                       {"out_1": ("dec.7x7.res0",)})
    assert [r.label for r in found] == ["mid.res1@11/p1", "dec.7x7.res0@11/p1", "mid.res1+dec.7x7.res0@11/p1"]


def test_candidates_with_aliases_hold_block_names():
    singles = _singles(["mid.res1", "dec.7x7.res0", "dec.7x7.res1"], [11.0], [1])
    by_alias = candidates(singles, [["out_1", "out_2"]], ALIASES)
    assert by_alias == candidates(singles, [["dec.7x7.res0", "dec.7x7.res1"]], ALIASES)
    assert by_alias[-1].taps == ("dec.7x7.res0", "dec.7x7.res1")
    by_level = candidates(singles, [["mid", "dec1"]], SELECTORS)
    assert by_level[-1].taps == ("mid.res1", "dec.7x7.res0", "dec.7x7.res1")


def test_candidates_name_an_unextracted_alias_and_its_block():
    singles = _singles(["mid.res1", "dec.7x7.res0"], [11.0], [1])
    with pytest.raises(ConfigError) as info:
        candidates(singles, [["mid.res1", "out_1"], ["mid.res1", "out_2"]], ALIASES)
    assert str(info.value) == ("probe.concat[1][1]: tap 'out_2' (block 'dec.7x7.res1') was not extracted; "
                               "extracted taps: mid.res1, dec.7x7.res0")
    with pytest.raises(ConfigError, match=r"probe.concat\[0\]\[0\]: tap 'mid.res0' was not extracted"):
        candidates(singles, [["mid.res0"]], ALIASES)
    incomplete = [s for s in _singles(["mid.res1", "dec.7x7.res0"], [11.0], [1, 2]) if s.label != "dec.7x7.res0@11/p2"]
    with pytest.raises(ConfigError, match=r"probe.concat\[0\]: no extracted features for dec.7x7.res0@11/p2"):
        candidates(incomplete, [["mid.res1", "out_1"]], ALIASES)


def test_candidates_reject_a_mixed_store():
    with pytest.raises(ValueError, match="not a single-tap"):
        candidates([Readout(("a", "b"), 11.0, 1, 0)], [], {})
    with pytest.raises(ValueError, match="several seeds"):
        candidates(_singles(["a"], [11.0], [1], seed=0) + _singles(["b"], [11.0], [1], seed=1), [], {})


def test_an_anomaly_selection_has_an_auroc_and_no_accuracy():
    readout = Readout(("mid.res1",), 11.0, 1, 0)
    selection = Selection(readout=readout, class_names=("dog",), level_kind="t", test_acc=None, network_hash="n",
                          data_checksum="d", kind="anomaly", test_auroc=0.9)
    data = selection.to_json()
    assert "test_acc" not in data and data["test_auroc"] == 0.9 and data["kind"] == "anomaly"
    assert Selection.from_json(data) == selection
    with pytest.raises(ValueError, match="a probe head needs one"):
        Selection(readout=readout, class_names=("dog",), level_kind="t", test_acc=None, network_hash="n",
                  data_checksum="d")
