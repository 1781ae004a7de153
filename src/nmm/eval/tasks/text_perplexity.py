"""Text perplexity on held-out general English (paragraphs never used for training or tokenizers)."""

from __future__ import annotations

import numpy as np

from nmm.eval.stats import bootstrap
from nmm.eval.task import EvalContext, SplitResult, Task, register
from nmm.modalities.text import english_corpus

N_DOCUMENTS = 100  # fixed, so perplexities of different runs average the same documents


@register
class TextPerplexity(Task):
    name = "text_perplexity"
    title = "perplexity of held-out English paragraphs"
    kind = "T2T"
    modalities = ("text",)
    splits = ("heldout",)
    headline = ("perplexity",)
    lower_is_better = frozenset({"perplexity"})

    def flat_key(self, split: str, metric: str) -> str:
        return "text_perplexity"  # the one flat key this task has always had

    def build(self, ctx: EvalContext, split: str) -> list[str]:
        # Lower-cased like the training text (the tokenizer is trained on lower-case English).
        return [t.lower() for t in english_corpus("heldout")[:N_DOCUMENTS]]

    def predict(self, ctx: EvalContext, items: list[str]) -> list[tuple[float, int]]:
        """-> (summed negative log-likelihood in nats, predicted tokens) per document."""
        pipe, out = ctx.pipe, []
        for chunk in ctx.chunks(items, 10):
            for text in chunk:
                # Pipeline.perplexity truncates to the context; count the same tokens it scores.
                n = min(len(pipe.codecs.encode_text(text)) + 2, pipe.model.cfg.max_seq_len) - 1
                out.append((float(np.log(pipe.perplexity([text]))) * n, n))
        return out

    def score(self, ctx: EvalContext, split: str, items: list[str], outputs: list[tuple[float, int]]) -> SplitResult:
        nll = np.array([o[0] for o in outputs])
        tokens = np.array([o[1] for o in outputs], dtype=np.float64)

        def perplexity(nll, tokens):  # token-weighted, as Pipeline.perplexity computes it
            return float(np.exp(nll.sum() / max(tokens.sum(), 1)))

        estimate = bootstrap(perplexity, [nll, tokens], ctx.seed(self.name, split), ctx.resamples)
        return SplitResult({"perplexity": estimate})
