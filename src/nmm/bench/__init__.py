"""`nmm bench`: nmm's inference against Hugging Face on the same weights, and the server under load.

    decode.py   text decoding tokens/s, Engine vs HF `generate`          (`nmm bench decode`)
    image.py    seconds per image with classifier-free guidance           (`nmm bench image`)
    server.py   requests/s, tokens/s and latency of `nmm serve` at 1/8/32 clients, fixed-length answers
                                                                          (`nmm bench server`)
    hf.py       nmm weights -> LlamaForCausalLM / Qwen3ForCausalLM, logits parity, HF logits processors,
                the compiled HF baseline (static cache + compiled decode step)
    common.py   loading, turn-taking timing, ratios, JSON;  report.py: the rich tables;  cli.py: the commands

decode and image compare like with like: eager nmm vs eager HF, and with --compile also compiled
nmm vs compiled HF, in the same run.

docs/performance.md describes what is measured and the results.
"""
