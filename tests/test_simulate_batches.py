"""compress's NNA stage simulates the test images in batches: the same integers, counts and accuracy as one run."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
import torch

from nnlab import nna, pipeline, quant
from nnlab.data import first_images, load_data, random_images
from nnlab.models import build_model


@pytest.fixture(scope="module")
def lenet5_program():
    """LeNet-5 (seeded weights, not trained: the arithmetic is what is compared), 5-bit weights, 8-bit activations."""
    data = load_data(verbose=False)
    torch.manual_seed(0)
    net = build_model("lenet5").eval()
    program = nna.compile_model(quant.quantise_model(net, data, 5, 8), data.input_shape)
    images, labels = first_images(data)
    return program, images.numpy(), labels.numpy()


@pytest.mark.parametrize("accumulator_bits", [32, 16])
@pytest.mark.parametrize("batch_size", [1000, 250, 7])
def test_batches_give_the_integers_and_counts_of_one_run(lenet5_program, accumulator_bits, batch_size):
    program, images, labels = lenet5_program
    config = nna.SERIES2NX.replace(accumulator_bits=accumulator_bits)
    whole = nna.run(program, images, pipeline.NNA_MODE, config=config)
    if accumulator_bits == 16:  # the narrow accumulator overflows, so the per-layer counts are really added up
        assert whole.saturated > 0 and len([n for n, c in whole.saturations.items() if c]) >= 2, whole.saturations
    batched = pipeline.simulate(program, images, config, batch_size=batch_size)
    assert np.array_equal(batched.logits, whole.logits)
    assert batched.saturations == whole.saturations and batched.sum_bits == whole.sum_bits
    assert batched.accumulator_bits == accumulator_bits
    assert np.mean(batched.predictions == labels) == np.mean(whole.predictions == labels)


def test_a_batch_runs_only_its_images(lenet5_program, monkeypatch):
    """Memory stays bounded: the engine never sees more than batch_size images at once."""
    program, images, _ = lenet5_program
    sizes, run = [], nna.run

    def spy(program, x, *args, **kwargs):
        sizes.append(len(x))
        return run(program, x, *args, **kwargs)

    monkeypatch.setattr(nna, "run", spy)
    pipeline.simulate(program, images, batch_size=300)
    assert sizes == [300, 300, 300, 100]


def test_bad_batch_size_is_named(lenet5_program):
    program, images, _ = lenet5_program
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        pipeline.simulate(program, images, batch_size=0)


@pytest.fixture(scope="module")
def lenet5_runs(tmp_path_factory):
    """compress() on LeNet-5 (quick recipes) with the NNA stage in one batch, in batches of 64, and on 200 images."""
    cache = os.environ.setdefault("NNLAB_TEST_CACHE", str(tmp_path_factory.mktemp("nnlab-cache")))
    kwargs = dict(sparsity=0.9, weight_bits=5, act_bits=8, quick=True, verbose=False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NNLAB_CACHE", cache)  # the session's test cache: trained once, then the same networks
        return {"one": pipeline.compress("lenet5", sim_batch_size=1000, **kwargs),
                "lean": pipeline.compress("lenet5", keep_models=False, **kwargs),
                "batches": pipeline.compress("lenet5", sim_batch_size=64, **kwargs),
                "subset": pipeline.compress("lenet5", sim_images=200, sim_batch_size=64, **kwargs)}


def test_compress_gives_the_same_figures_in_batches(lenet5_runs):
    one, batches = lenet5_runs["one"], lenet5_runs["batches"]
    columns = ["stage", "accuracy", "storage_bytes", "energy_uj", "saturated", "test_images"]
    pd.testing.assert_frame_equal(one.stages[columns], batches.stages[columns])
    assert one.agreement == batches.agreement and one.overflow == batches.overflow
    assert one.report["saturated"].tolist() == batches.report["saturated"].tolist()
    pd.testing.assert_series_equal(one.report["sum_bits"], batches.report["sum_bits"])  # NaN for layers without sums
    assert one.settings["sim_images"] is None and batches.settings["sim_batch_size"] == 64
    assert set(one.stages["test_images"]) == {1000}
    # The NNA agrees with the retrained PyTorch model on (almost) every image, and its accuracy is over all 1,000.
    assert one.agreement >= 98.0, one.agreement
    program, data = one.program, load_data(verbose=False)
    images, labels = first_images(data)
    again = nna.run(program, images.numpy(), pipeline.NNA_MODE)
    assert 100.0 * np.mean(again.predictions == labels.numpy()) == one.stages.iloc[-1]["accuracy"]


def test_sim_images_simulates_a_fixed_draw_and_says_so(lenet5_runs, tmp_path):
    import json

    from nnlab.cli import write_report

    subset, one = lenet5_runs["subset"], lenet5_runs["one"]
    assert subset.settings["sim_images"] == 200
    assert subset.stages["test_images"].tolist() == [1000] * (len(subset.stages) - 1) + [200]
    pd.testing.assert_frame_equal(subset.stages.iloc[:-1], one.stages.iloc[:-1])  # only the NNA stage differs
    images, labels = random_images(load_data(verbose=False), 200, seed=pipeline.SIM_IMAGES_SEED)
    assert len(set(labels.tolist())) == 10  # a draw over every class, not the class-sorted first images
    again = nna.run(subset.program, images.numpy(), pipeline.NNA_MODE)
    assert 100.0 * np.mean(again.predictions == labels.numpy()) == subset.stages.iloc[-1]["accuracy"]
    doc = write_report(subset, tmp_path)
    assert doc["settings"]["sim_images"] == 200 and doc["stages"][-1]["test_images"] == 200
    page = (tmp_path / "report.html").read_text()
    assert "The NNA stage simulated 200 of the 1,000 test images (a fixed random draw)" in page
    assert json.loads((tmp_path / "report.json").read_text())["agreement"] == subset.agreement


def test_keep_models_false_keeps_only_the_deployed_stages(lenet5_runs):
    """The same figures; result.models holds only the retrained network and the program."""
    lean, full = lenet5_runs["lean"], lenet5_runs["one"]
    pd.testing.assert_frame_equal(lean.stages, full.stages)
    assert list(lean.models) == ["retrained low-bit", "NNA (integer)"]
    assert lean.models["NNA (integer)"] is lean.program
    assert list(full.models) == [s for s in pipeline.STAGES if s != "L1 + pruned + distilled"]
    assert lean.settings["keep_models"] is False and full.settings["keep_models"] is True
