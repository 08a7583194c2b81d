"""experiments/exact/make_table.py rewrites one part of its README and keeps the others: regenerating the main table
keeps the from-truth table, the calibration and the hand-written analysis; ``--from-truth`` replaces only its own
section (or adds it before the calibration the first time), and so do ``--world`` (after the from-truth table) and
``--learned`` (after the world-variant table).
``--rescore`` recomputes stored methods' metrics from their kept final images."""

from __future__ import annotations

import importlib.util
import json

import pytest

from tests.conftest import ROOT


def _table_module():
    spec = importlib.util.spec_from_file_location("exact_make_table", ROOT / "experiments" / "exact" / "make_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


README = """# The exact-prior table

main table

<!-- calibration:start -->
calibration rows
<!-- calibration:end -->

<!-- analysis:start -->
hand-written analysis
<!-- analysis:end -->
"""


def test_from_truth_section_goes_before_the_calibration_then_is_replaced_in_place(tmp_path):
    table = _table_module()
    path = tmp_path / "README.md"
    path.write_text(README)
    table.write_section(path, README, "from_truth", "first from-truth table")
    first = path.read_text()
    assert first.index("first from-truth table") < first.index("<!-- calibration:start -->")
    assert "main table" in first and "calibration rows" in first and "hand-written analysis" in first
    table.write_section(path, first, "from_truth", "second from-truth table")
    second = path.read_text()
    assert "second from-truth table" in second and "first from-truth table" not in second
    assert second.count("<!-- from_truth:start -->") == 1
    assert second.replace("second", "first") == first  # nothing else changed


def test_every_kept_section_survives_with_its_markers(tmp_path):
    table = _table_module()
    path = tmp_path / "README.md"
    table.write_section(path, README, "from_truth", "the from-truth table")
    table.write_section(path, path.read_text(), "learned", "the learned-prior table")  # before the calibration
    table.write_section(path, path.read_text(), "world", "the world-variant table")  # before the learned one
    text = path.read_text()
    kept = [table.section(text, name) for name in table.SECTIONS]
    assert [k.splitlines()[1] for k in kept] == ["the from-truth table", "the world-variant table",
                                                 "the learned-prior table", "calibration rows", "hand-written analysis"]
    assert (text.index("the from-truth table") < text.index("the world-variant table")
            < text.index("the learned-prior table") < text.index("calibration rows"))
    assert table.section("no markers here", "analysis") == "<!-- analysis:start -->\n<!-- analysis:end -->"


def test_world_variant_keys_are_typed_and_a_bad_one_stops_before_anything_runs(capsys):
    import argparse

    table = _table_module()
    parser = argparse.ArgumentParser(prog="make_table")
    assert table.world_config(["contrast_std=0.35", "clusters=32"], parser) == {"contrast_std": 0.35, "clusters": 32}
    levels = table.world_config(["contrast_levels=0.5,0.75,1"], parser)
    assert levels == {"contrast_levels": [0.5, 0.75, 1.0]}
    assert table.world_override("contrast_levels=0.5,0.75,1", levels) == "prior.contrast_levels=[0.5,0.75,1]"
    for bad, says in [(["contrast_sd=0.35"], "contrast_sd=0.35"), (["clusters=many"], "'many' is not a int"),
                      (["text_adherence=1.5"], "text_adherence"), (["contrast_std"], "KEY=VALUE")]:
        with pytest.raises(SystemExit):
            table.world_config(bad, parser)
        assert says in capsys.readouterr().err


def test_rescore_recomputes_kept_images_and_names_the_methods_without(tmp_path, analytic_prior, capsys):
    """``--rescore``: a stored method whose final images are kept gets the current metric code's numbers (here a
    stale stored value is replaced by the exact metrics of the kept images); one without kept images is named and
    handed back to be rerun; images that do not match the protocol stop the script, naming the file."""
    import torch

    from sdbridge.eval.protocol import ExactProtocol
    from sdbridge.metrics.exact import exact_metrics

    table = _table_module()
    protocol = ExactProtocol(prompts=["a red circle", "a circle"], images_per_prompt=4)
    x0 = torch.cat([analytic_prior.sample(p, 4, torch.Generator().manual_seed(1)) for p in protocol.prompts])
    torch.save(x0, tmp_path / "sds.pt")
    stored = {"sds": {"exact_metrics": {"mean": {"fd": -1.0}}, "wall_clock_s": 5.0}, "vsd": {"exact_metrics": {}}}
    done, missing = table.rescore(analytic_prior, protocol, stored, tmp_path)
    assert (done, missing) == (["sds"], ["vsd"]) and "vsd" in capsys.readouterr().out
    expected = exact_metrics(analytic_prior, x0, ["a red circle"] * 4 + ["a circle"] * 4)
    assert stored["sds"]["exact_metrics"]["mean"] == pytest.approx(expected["mean"])
    assert stored["sds"]["wall_clock_s"] == 5.0  # only the metrics change
    torch.save(x0[:5], tmp_path / "sds.pt")
    with pytest.raises(SystemExit, match="sds.pt holds 5 images"):
        table.rescore(analytic_prior, protocol, stored, tmp_path)
    assert table.samples_dir(protocol) != table.samples_dir(ExactProtocol(prompts=["a circle"]))


def test_fresh_drops_only_this_protocols_results(tmp_path, capsys):
    """``--fresh`` reruns one protocol's methods; the stored results of every other protocol (the main table, the
    from-truth table, the world variants: hours of runs) stay in results.json."""
    table = _table_module()
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"main": {"sds": {"fd": 1}}, "from truth": {"sds": {"fd": 2}}}))
    assert table.load_store(path, "main", fresh=True) == {"from truth": {"sds": {"fd": 2}}}
    assert table.load_store(path, "main", fresh=False) == {"main": {"sds": {"fd": 1}}, "from truth": {"sds": {"fd": 2}}}
    path.write_text('{"main": {"sds"')  # truncated
    assert table.load_store(path, "main", fresh=True) == {}
    with pytest.raises(SystemExit, match="not readable JSON"):
        table.load_store(path, "main", fresh=False)
