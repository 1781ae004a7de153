"""`nmm demo`: train a native early-fusion model from scratch on the shapes world, evaluate it,
and write `metrics.json` and `report.html`, all on a CPU in minutes. `nmm demo speech` does the
same for one model that transcribes and speaks (the speech world, held-out voices), `nmm demo video`
for one that captions and makes clips (the moving shapes world)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from nmm.config import load_config
from nmm.eval.report import machine_info, write_report
from nmm.eval.runner import evaluate
from nmm.train.prepare import make_world
from nmm.train.trainer import train
from nmm.utils import atomic_write_json

HEADLINE = ("m2t_attribute_accuracy", "m2t_exact_match", "qa_accuracy", "m2g_judged_accuracy",
            "m2g_attribute_accuracy")


def run_demo(out: Path, quick: bool = False, overrides: list[str] | None = None, log=print) -> dict:
    t0 = time.time()
    cfg = load_config("shapes-quick" if quick else "shapes-demo", overrides)
    out = Path(out)
    log(f"[1/3] training tokenizers and a {cfg.model.n_layers}-layer d{cfg.model.d_model} early-fusion model "
        f"-> {out}")
    summary = train(cfg, out, log=log)

    log("[2/3] evaluating on held-out scenes and held-out attribute combinations")
    import nmm

    pipe = nmm.load(out)
    metrics, artefacts = evaluate(pipe, cfg, out / "eval", log=log)

    world = make_world(cfg)
    real = np.stack([world.render(s) for s in world.scenes(8, 99, "any")])
    recon = pipe.codecs.image.decode(pipe.codecs.image.encode(real))
    tok = summary["tokenizer"]
    tok = tok.get("image", tok)  # per-modality stats; runs before audio kept the image's at the top
    metrics = {
        **{k: metrics[k] for k in HEADLINE},
        **{f"heldout_combo_{k}": metrics[f"heldout_combo_{k}"] for k in HEADLINE},
        "text_perplexity": metrics["text_perplexity"],
        "train_minutes": summary["train_minutes"],
        "tokenizer_minutes": round(tok.get("train_seconds", 0.0) / 60, 3),
        "tokenizer_psnr_db": tok.get("psnr_db"),
        "tokenizer_judge_exact": tok.get("judge_exact"),
        "tokenizer_judge_exact_heldout_combo": tok.get("judge_exact_heldout_combo"),
        "tokenizer_codebook_usage": tok.get("codebook_usage"),
        "params": summary["params"],
        "steps": summary["steps"],
        "all": metrics,
    }
    metrics["eval_minutes"] = metrics["all"].get("eval_minutes")
    metrics["demo_minutes"] = round((time.time() - t0) / 60, 3)
    machine = machine_info()  # after train(): torch's thread count is the one training used
    metrics["machine"] = machine
    atomic_write_json(out / "metrics.json", metrics)
    log("[3/3] writing report")
    report = write_report(out, {k: v for k, v in metrics.items() if k != "all"}, artefacts, (real, recon),
                          title=f"nmm demo: {cfg.name}", machine=machine,
                          tokenizer_n=cfg.image.eval_images if tok.get("judge_exact") is not None else None)
    metrics["report"] = str(report)
    return metrics


SPEECH_TASKS = ("speech_asr", "speech_tts", "audio_codec", "text_perplexity")
VIDEO_TASKS = ("video_captioning", "text_to_clip", "text_perplexity")


def run_task_demo(out: Path, preset: str, tasks: tuple[str, ...], stages: tuple[str, str], overrides=None,
                  options: dict | None = None, log=print) -> dict:
    """Train `preset`, evaluate `tasks` (metrics.json + eval/report.html): the demos beyond shapes.
    `stages`: what the training and the evaluation steps say they do."""
    import nmm
    from nmm.eval.harness import evaluate_tasks

    t0 = time.time()
    cfg = load_config(preset, overrides)
    out = Path(out)
    log(f"[1/2] {stages[0]} -> {out}")
    summary = train(cfg, out, log=log)
    log(f"[2/2] {stages[1]}")
    outcome = evaluate_tasks(nmm.load(out), cfg, out / "eval", tasks=tasks, log=log, force=True,
                             progress=False, strict=True, report=True, options=options)
    metrics = {**outcome.metrics, "train_minutes": summary["train_minutes"], "params": summary["params"],
               "steps": summary["steps"], "mfu": summary.get("mfu"), "tokenizer": summary["tokenizer"],
               "demo_minutes": round((time.time() - t0) / 60, 3), "machine": machine_info(),
               "report": str(out / "eval" / "report.html")}
    atomic_write_json(out / "metrics.json", metrics)
    return metrics


def run_speech_demo(out: Path, quick: bool = False, overrides: list[str] | None = None, log=print) -> dict:
    """Train `speech-demo` (audio codec, then one model for both directions), evaluate recognition on
    held-out voices, synthesis intelligibility and the codec's ceiling; metrics.json + eval/report.html."""
    cfg = load_config("speech-quick" if quick else "speech-demo", overrides)
    # --quick: a small ruler too (its numbers only show the path works).
    options = {"speech_recognizer": {"utterances": 300, "steps": 150}} if quick else None
    metrics = run_task_demo(out, cfg.name, SPEECH_TASKS, (
        f"training the audio codec, the text tokenizer and a {cfg.model.n_layers}-layer d{cfg.model.d_model} model "
        "that transcribes and speaks", "evaluating: recognition on held-out voices, synthesis intelligibility, "
        "the codec's ceiling"), overrides, options, log)
    codec = metrics.pop("tokenizer").get("audio", {})
    metrics.update(codec_train_seconds=codec.get("train_seconds"), codec_mel_distance=codec.get("mel_distance"))
    atomic_write_json(Path(out) / "metrics.json", metrics)
    return metrics


def run_video_demo(out: Path, quick: bool = False, overrides: list[str] | None = None, log=print) -> dict:
    """Train `video-demo` (frame tokenizer, then one model that captions clips and makes them), evaluate
    captioning and text -> clip on held-out clips and held-out motion combinations."""
    cfg = load_config("video-quick" if quick else "video-demo", overrides)
    metrics = run_task_demo(out, cfg.name, VIDEO_TASKS, (
        f"training the frame tokenizer, the text tokenizer and a {cfg.model.n_layers}-layer d{cfg.model.d_model} "
        f"model that captions and makes {cfg.video.frames}-frame clips ({cfg.video.layout} layout)",
        "evaluating: captions of held-out clips, clips made from held-out captions (clip judge)"), overrides, None, log)
    video = metrics.pop("tokenizer").get("video", {})
    metrics.update({"tokens_per_clip": video.get("tokens_per_clip"), "codec_reconstruction": video.get("reconstruction"),
                    "frame_tokenizer_judge_exact": video.get("judge_exact")})
    atomic_write_json(Path(out) / "metrics.json", metrics)
    return metrics
