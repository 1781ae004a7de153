"""`nmm inspect` classifies every preset from the model it builds, and the sweep runs end to end."""

import json

import pytest

from nmm.config import list_presets
from nmm.inspect import describe

# preset suffix -> (fusion, representation, routing, capabilities)
EXPECTED = {
    "": ("early", "discrete", "dense", ["M2T", "M2G", "M2M"]),
    "continuous": ("early", "continuous", "dense", ["M2T", "M2G", "M2M"]),
    "decoupled": ("early", "decoupled", "dense", ["M2T", "M2G", "M2M"]),
    "late": ("late", "continuous", "dense", ["M2T"]),
    "mid": ("mid", "continuous", "dense", ["M2T"]),
    "moe": ("early", "discrete", "moe", ["M2T", "M2G", "M2M"]),
    "moe-aware": ("early", "discrete", "moe-aware", ["M2T", "M2G", "M2M"]),
    "mot": ("early", "discrete", "mot", ["M2T", "M2G", "M2M"]),
}


def expected_for(preset: str):
    for suffix in sorted(EXPECTED, key=len, reverse=True):
        if suffix and preset.endswith("-" + suffix):
            return EXPECTED[suffix]
    return EXPECTED[""]


@pytest.mark.parametrize("preset", list_presets())
def test_every_preset_is_classified(preset):
    info = describe(preset)
    for key in ("fusion", "representation", "capabilities", "routing", "modalities", "params_total",
                "params_active", "flops_per_token"):
        assert key in info
    assert (info["fusion"], info["representation"], info["routing"], info["capabilities"]) == expected_for(preset)
    assert 0 < info["params_active"] <= info["params_total"]
    assert info["flops_per_token"] > 0


def test_sparse_variants_match_dense_active_params_and_flops():
    dense, moe, mot = describe("shapes-demo"), describe("shapes-moe"), describe("shapes-mot")
    assert moe["params_total"] > 2 * dense["params_total"]  # four experts per layer
    assert mot["params_total"] > dense["params_total"]  # a tower per modality
    for other in (moe, mot):
        assert abs(other["params_active"] - dense["params_active"]) / dense["params_active"] < 0.01
        assert abs(other["flops_per_token"] - dense["flops_per_token"]) / dense["flops_per_token"] < 0.01


def test_inspect_cli_json(capsys):
    from typer.testing import CliRunner

    from nmm.cli import app

    res = CliRunner().invoke(app, ["inspect", "shapes-tiny-mid", "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert info["fusion"] == "mid" and info["capabilities"] == ["M2T"]


@pytest.mark.slow
def test_quick_sweep_writes_table_and_plots(tmp_path):
    from nmm.sweep import run_sweep

    out = tmp_path / "sweep"
    res = run_sweep(out, "quick", variants=["early-discrete", "moe"], budget_flops=4e8, log=lambda *a, **k: None)
    points = res["points"]
    assert set(points) == {"early-discrete-xs", "moe-xs"}
    for p in points.values():
        assert p["done"] and p["steps"] >= 4 and len(p["curve"]) >= 2
        assert 0 <= p["m2t_exact_match"]["value"] <= 1 and p["m2t_exact_match"]["n"] > 0
    # matched compute: the training FLOPs agree within one step's worth
    flops = [p["train_flops"] for p in points.values()]
    assert max(flops) / min(flops) < 1.3
    hist = points["moe-xs"]["routing_histogram"]
    assert hist and len(hist[0]) == 2 and sum(map(sum, hist[0])) > 0  # (modality, expert) counts
    table = (out / "sweep.md").read_text()
    assert "moe − dense" in table and "early-discrete" in table
    for f in ("sweep.csv", "loss_vs_compute.png", "accuracy.png", "routing.png"):
        assert (out / f).stat().st_size > 0
    # a second call keeps finished points
    again = run_sweep(out, "quick", variants=["early-discrete", "moe"], budget_flops=4e8, log=lambda *a, **k: None)
    assert again["points"]["moe-xs"]["train_seconds"] == points["moe-xs"]["train_seconds"]


def test_inspect_lists_every_modality_and_its_positions_per_item():
    a2a = describe("any-to-any-tiny")
    assert a2a["modalities"] == ["text", "image", "audio", "video"]
    assert a2a["positions_per_item"]["image"] == 66
    assert a2a["positions_per_item"]["audio"] == "25 per second + 2"
    assert a2a["positions_per_item"]["video"] == "at most 194"  # delta clips: up to video.max_tokens
    assert set(a2a["params_active_by_modality"]) == {"text", "image", "audio", "video"}
    video = describe("video-demo")
    assert video["modalities"] == ["text", "video"] and "positions_per_image" not in video
    assert video["flops_per_token"] > 0


def test_inspect_reports_each_modalitys_interface():
    from nmm.config import load_config
    from nmm.inspect import describe_model

    info = describe_model(load_config("speech-tiny", ["model.audio_fusion=late", "model.audio_repr=continuous"]))
    assert info["interfaces"]["audio"] == {"fusion": "late", "representation": "continuous", "capabilities": ["M2T"]}
    assert describe("speech-tiny")["interfaces"]["audio"]["capabilities"] == ["M2T", "M2G", "M2M"]
