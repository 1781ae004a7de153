"""Rich tables for `nmm bench` results (the JSON has every number; the tables show the headline ones)."""

from __future__ import annotations

from rich.table import Table


def _goal_caption(result: dict) -> str:
    g = result["goal"]
    return f"goal: {g['metric']} >= {g['target']:g}x: {g['value']:.2f}x, {'met' if g['met'] else 'NOT met'}"


def _engine(result: dict) -> str:
    return "nmm Engine(compile=True)" if result["config"].get("nmm_compile") else "nmm Engine"


def decode_table(result: dict) -> Table:
    p = result["parity"]
    table = Table(title=f"decode: {_engine(result)} vs HF {p['hf_arch']}.generate (same weights, max |logit diff| "
                        f"{p['max_abs_diff']:.1e})", caption=_goal_caption(result))
    for col in ("batch", "new tokens", "nmm tok/s", "HF tok/s", "nmm/HF", "best", "paired", "CPU time", "same tokens"):
        table.add_column(col, justify="right")
    for r in result["rows"]:
        table.add_row(str(r["batch"]), str(r["new_tokens"]), f"{r['nmm_tokens_per_s']:.0f}", f"{r['hf_tokens_per_s']:.0f}",
                      f"{r['speedup']:.2f}x", f"{r['speedup_best']:.2f}x", f"{r['speedup_paired']:.2f}x",
                      f"{r['speedup_cpu_time']:.2f}x", f"{r['tokens_match']:.0%}")
    return table


def image_table(result: dict) -> Table:
    p = result["parity"]
    table = Table(title=f"image (CFG {result['config']['cfg_scale']:g}): generate_images on {_engine(result)} vs HF "
                        f"{p['hf_arch']}.generate + guidance_scale", caption=_goal_caption(result))
    for col in ("batch", "nmm s/image", "HF s/image", "HF/nmm", "best", "paired", "CPU time", "same images"):
        table.add_column(col, justify="right")
    for r in result["rows"]:
        table.add_row(str(r["batch"]), f"{r['nmm_s_per_image']:.3f}", f"{r['hf_s_per_image']:.3f}",
                      f"{r['speedup']:.2f}x", f"{r['speedup_best']:.2f}x", f"{r['speedup_paired']:.2f}x",
                      f"{r['speedup_cpu_time']:.2f}x", f"{r['images_match']:.0%}")
    return table


def server_table(result: dict) -> Table:
    cfg = result["config"]
    table = Table(title=f"server: nmm serve {cfg['target']}, chat completions, max_tokens {cfg['max_tokens']}, "
                        f"{cfg['requests_per_level']} requests per level", caption=_goal_caption(result))
    for col in ("clients", "req/s", "vs 1 client", "p50 s", "p99 s", "tokens/s", "errors", "429 retries"):
        table.add_column(col, justify="right")
    base = result["levels"][0]["requests_per_s"]
    for r in result["levels"]:
        table.add_row(str(r["clients"]), f"{r['requests_per_s']:.2f}", f"{r['requests_per_s'] / base:.2f}x",
                      f"{r['latency_p50_s']:.3f}", f"{r['latency_p99_s']:.3f}", f"{r['completion_tokens_per_s']:.0f}",
                      str(r["errors"]), str(r["retried_429"]))
    return table


TABLES = {"decode": decode_table, "image": image_table, "server": server_table}
