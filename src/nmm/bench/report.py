"""Rich tables for `nmm bench` results (the JSON has every number; the tables show the headline ones)."""

from __future__ import annotations

from rich.table import Table


def _goal_caption(result: dict) -> str:
    g = result["goal"]
    if g["value"] is None:
        return f"goal: {g['metric']} >= {g['target']:g}x: not measured ({g.get('note', '')})"
    return f"goal: {g['metric']} >= {g['target']:g}x: {g['value']:.2f}x, {'met' if g['met'] else 'NOT met'}"


def _pairs_caption(result: dict) -> str:
    return "; ".join(f"{name}: {p['nmm']} vs {p['hf']}" for name, p in result["config"]["pairs"].items())


def decode_table(result: dict) -> Table:
    p = result["parity"]
    table = Table(title=f"decode, {result['config']['new_tokens']} new tokens: nmm vs HF {p['hf_arch']}.generate "
                        f"(same weights, max |logit diff| {p['max_abs_diff']:.1e})",
                  caption=_pairs_caption(result) + "\n" + _goal_caption(result))
    for col in ("pair", "batch", "nmm tok/s", "HF tok/s", "nmm/HF", "best", "paired", "CPU time", "same tokens"):
        table.add_column(col, justify="right")
    for r in result["rows"]:
        for name, q in r["pairs"].items():
            table.add_row(name, str(r["batch"]), f"{q['nmm_tokens_per_s']:.0f}",
                          f"{q['hf_tokens_per_s']:.0f}", f"{q['speedup']:.2f}x", f"{q['speedup_best']:.2f}x",
                          f"{q['speedup_paired']:.2f}x", f"{q['speedup_cpu_time']:.2f}x", f"{q['tokens_match']:.0%}")
    return table


def image_table(result: dict) -> Table:
    p = result["parity"]
    table = Table(title=f"image (CFG {result['config']['cfg_scale']:g}): generate_images vs HF {p['hf_arch']}.generate "
                        "(same weights)",
                  caption=_pairs_caption(result) + "; eager (batched): the eager pair against HF with batched CFG "
                  "(unconditional prompts as extra rows)\n" + _goal_caption(result))
    for col in ("pair", "batch", "nmm s/image", "HF s/image", "HF/nmm", "best", "paired", "CPU time", "same images"):
        table.add_column(col, justify="right")
    for r in result["rows"]:
        for name, q in r["pairs"].items():
            table.add_row(name, str(r["batch"]), f"{q['nmm_s_per_image']:.3f}", f"{q['hf_s_per_image']:.3f}",
                          f"{q['speedup']:.2f}x", f"{q['speedup_best']:.2f}x", f"{q['speedup_paired']:.2f}x",
                          f"{q['speedup_cpu_time']:.2f}x", f"{q['images_match']:.0%}")
        e = r["pairs"]["eager"]
        table.add_row("eager (batched)", str(r["batch"]), f"{e['nmm_s_per_image']:.3f}",
                      f"{e['hf_batched_s_per_image']:.3f}", f"{e['vs_hf_batched']['speedup']:.2f}x",
                      f"{e['vs_hf_batched']['speedup_best']:.2f}x", f"{e['vs_hf_batched']['speedup_paired']:.2f}x",
                      f"{e['vs_hf_batched']['speedup_cpu_time']:.2f}x", f"{e['hf_batched_images_match']:.0%}")
    return table


def server_table(result: dict) -> Table:
    cfg = result["config"]
    stream = cfg.get("stream")
    table = Table(title=f"server: nmm serve {cfg['target']}, chat completions of exactly {cfg['max_tokens']} tokens "
                        f"(via {cfg['fixed_length_via']}), {cfg['requests_per_level']} requests per level"
                        f"{', streamed' if stream else ''}", caption=_goal_caption(result))
    cols = ["clients", "req/s", "vs 1 client", "tokens/s", "p50 s", "p99 s"]
    if stream:
        cols += ["TTFT p50 s", "TTFT p99 s"]
    cols += ["tokens/answer", "errors", "429 retries"]
    for col in cols:
        table.add_column(col, justify="right")
    base = result["levels"][0]["requests_per_s"]
    for r in result["levels"]:
        cells = [str(r["clients"]), f"{r['requests_per_s']:.2f}", f"{r['requests_per_s'] / base:.2f}x",
                 f"{r['completion_tokens_per_s']:.0f}", f"{r['latency_p50_s']:.3f}", f"{r['latency_p99_s']:.3f}"]
        if stream:
            cells += [f"{r['ttft_p50_s']:.3f}", f"{r['ttft_p99_s']:.3f}"]
        cells += [f"{r['completion_tokens_mean']:g}", str(r["errors"]), str(r["retried_429"])]
        table.add_row(*cells)
    return table


TABLES = {"decode": decode_table, "image": image_table, "server": server_table}


def speech_table(result: dict) -> Table:
    p = result["parity"]
    table = Table(title=f"speech: real-time factors, nmm vs HF {p['hf_arch']}.generate (same weights, max |logit diff| "
                        f"{p['max_abs_diff']:.1e}); codec encode RTF {result['encode_rtf']:.4f}",
                  caption="RTF = compute seconds / audio seconds (lower is faster); synthesis RTF is token "
                          "generation, the vocoder (Griffin-Lim) apart")
    for col in ("task", "batch", "audio s", "nmm RTF", "HF RTF", "HF/nmm", "best", "same tokens", "vocoder RTF"):
        table.add_column(col, justify="right")
    for r in result["rows"]:
        table.add_row(r["task"], str(r["batch"]), f"{r['audio_seconds']:.1f}", f"{r['nmm_rtf']:.4f}",
                      f"{r['hf_rtf']:.4f}", f"{r['speedup']:.2f}x", f"{r['speedup_best']:.2f}x",
                      f"{r['tokens_match']:.0%}", f"{r['vocoder_rtf']:.4f}" if "vocoder_rtf" in r else "-")
    return table


TABLES["speech"] = speech_table


def video_table(result: dict) -> Table:
    p, c = result["parity"], result["config"]
    table = Table(title=f"video: seconds per clip, nmm vs HF {p['hf_arch']}.generate (same weights, max |logit diff| "
                        f"{p['max_abs_diff']:.1e}); {c['frames']}-frame clips, {c['layout']} layout",
                  caption="s/clip = generation wall seconds / batch (lower is faster); decoding codes to frames apart")
    for col in ("task", "batch", "nmm s/clip", "HF s/clip", "HF/nmm", "best", "same tokens", "tokens", "decode s"):
        table.add_column(col, justify="right")
    for r in result["rows"]:
        table.add_row(r["task"], str(r["batch"]), f"{r['nmm_item_s']:.3f}", f"{r['hf_item_s']:.3f}",
                      f"{r['speedup']:.2f}x", f"{r['speedup_best']:.2f}x", f"{r['tokens_match']:.0%}",
                      f"{r['mean_tokens']:.0f}" if "mean_tokens" in r else "-",
                      f"{r['decode_s']:.4f}" if "decode_s" in r else "-")
    return table


TABLES["video"] = video_table
