"""Renamed public names: each old name still works for one release, warns, and names its replacement."""

import importlib
import sys

import pytest

import nnlab
from nnlab import nna, quant
from nnlab.quant import model as quant_model
from nnlab.quant import modules as quant_modules
from nnlab.quant import retraining

# (module, old name, new name)
RENAMES = [
    (quant, "WeightQuantizer", "WeightQuantiser"),
    (quant, "ActQuantizer", "ActQuantiser"),
    (quant, "weight_quantizer", "weight_quantiser"),
    (quant, "act_quantizers", "act_quantisers"),
    (quant, "act_quantizer_names", "act_quantiser_names"),
    (quant, "INPUT_QUANTIZER", "INPUT_QUANTISER"),
    (quant, "describe", "describe_quantisers"),
    (quant, "SCHEDULES", "SUBSET_SCHEDULES"),
    (quant_modules, "WeightQuantizer", "WeightQuantiser"),
    (quant_modules, "ActQuantizer", "ActQuantiser"),
    (quant_model, "weight_quantizer", "weight_quantiser"),
    (quant_model, "act_quantizers", "act_quantisers"),
    (quant_model, "act_quantizer_names", "act_quantiser_names"),
    (quant_model, "INPUT_QUANTIZER", "INPUT_QUANTISER"),
    (quant_model, "describe", "describe_quantisers"),
    (retraining, "SCHEDULES", "SUBSET_SCHEDULES"),
    (nna, "summary", "headline"),
]


@pytest.mark.parametrize("module, old, new", RENAMES, ids=[f"{m.__name__}.{o}" for m, o, _ in RENAMES])
def test_old_name_warns_and_is_the_new_object(module, old, new):
    with pytest.warns(DeprecationWarning, match=rf"{module.__name__}\.{old} is deprecated.*use "
                                                 rf"{module.__name__}\.{new}\b") as record:
        value = getattr(module, old)
    assert value is getattr(module, new)
    assert record[0].filename == __file__  # attributed to the caller, where the old name is written
    assert old not in module.__all__ and new in module.__all__


@pytest.mark.parametrize("old", ["WeightQuantizer", "act_quantizers", "INPUT_QUANTIZER"])
def test_from_import_of_old_name_warns(old):
    namespace = {}
    with pytest.warns(DeprecationWarning, match=old):
        exec(f"from nnlab.quant import {old}", namespace)
    assert namespace[old] is getattr(quant, quant.RENAMED[old])


def test_unknown_name_still_raises_attribute_error():
    with pytest.raises(AttributeError, match="WeightQuantizr"):
        quant.WeightQuantizr  # noqa: B018
    with pytest.raises(AttributeError, match="summry"):
        nna.summry  # noqa: B018


def test_old_class_name_still_matches_instances():
    import torch

    q = quant.WeightQuantiser(quant.QuantSpec(4), torch.ones(3, 4))
    with pytest.warns(DeprecationWarning):
        assert isinstance(q, quant.WeightQuantizer)


def test_regularize_module_warns_and_reexports_regularise(monkeypatch):
    from nnlab import regularise

    monkeypatch.delitem(sys.modules, "nnlab.regularize", raising=False)
    with pytest.warns(DeprecationWarning, match=r"nnlab\.regularize is deprecated.*use nnlab\.regularise"):
        old = importlib.import_module("nnlab.regularize")
    assert old.__all__ == regularise.__all__
    for name in regularise.__all__:
        assert getattr(old, name) is getattr(regularise, name)
    monkeypatch.delitem(sys.modules, "nnlab.regularize")
    monkeypatch.delattr(nnlab, "regularize")
    with pytest.warns(DeprecationWarning, match="nnlab.regularise"):
        assert nnlab.regularize.l1_penalty is regularise.l1_penalty


def test_headline_behaves_as_summary_did():
    table = nna.report(_tiny_program())
    with pytest.warns(DeprecationWarning):
        old = nna.summary(table)
    assert old == nna.headline(table) and {"storage_bytes", "compression", "energy_uj"} <= set(old)
    bare = table.copy()
    bare.attrs = {}
    with pytest.raises(ValueError, match="nnlab.nna.report"):
        nna.headline(bare)


def _tiny_program():
    import torch
    from torch import nn

    from nnlab.data import load_data

    torch.manual_seed(0)
    data = load_data("mnist", verbose=False)
    model = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))
    q = quant.quantise_model(model, data, 8, 8, calibration_batches=1)
    return nna.compile_model(q, data.input_shape)
