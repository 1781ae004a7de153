"""`nmm bench`: nmm's inference against Hugging Face on the same weights, and the server under load.

    decode.py   text decoding tokens/s, Engine vs HF `generate`          (`nmm bench decode`)
    image.py    seconds per image with classifier-free guidance           (`nmm bench image`)
    server.py   requests/s and latency of `nmm serve` at 1/8/32 clients   (`nmm bench server`)
    hf.py       nmm weights -> LlamaForCausalLM / Qwen3ForCausalLM, logits parity, HF logits processors
    common.py   loading, turn-taking timing, ratios, JSON;  report.py: the rich tables;  cli.py: the commands

docs/performance.md describes what is measured and the results.
"""
