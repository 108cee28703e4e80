"""Perplexity as an `evaluate` metric that works offline and on model objects.

    import evaluate, optimum_sparsesched
    metric = evaluate.load(optimum_sparsesched.PERPLEXITY_METRIC)
    metric.compute(predictions=texts, model=model_or_path, tokenizer=tokenizer_or_path)
    # -> {"perplexities": [one per text], "mean_perplexity": float}          (the Hub `perplexity` metric's output)
    metric.compute(predictions=texts, model=model, tokenizer=tokenizer, protocol="sparsegpt", seq_len=2048)
    # -> {"perplexity": float, "num_windows": int, "seq_len": int, "scored_tokens": int}

Default (``protocol="per-text"``): the conventions of the Hub ``perplexity`` metric — each text scored on its own
(after a start token, truncated to ``max_length``), texts shorter than any window included, batched
``batch_size`` at a time. ``protocol="sparsegpt"``: the benchmarks' protocol of `optimum_sparsesched.perplexity`
(texts joined with blank lines, tokenized once, non-overlapping windows of ``seq_len``, or strided with ``stride``),
with the same defaults, so it reports the same number as ``optimum-sparsesched eval``.
"""

import warnings

import datasets
import evaluate

PROTOCOLS = ("per-text", "sparsegpt")
_DESCRIPTION = "Perplexity of a causal LM (object or path): per text (Hub convention) or SparseGPT windows."
_KWARGS = """
Args:
    predictions (list[str]): the texts.
    model: a transformers causal LM object, or a model folder / hub id (loaded in float32).
    run_compressed (bool or str, False): with a path compressed by optimum-sparsesched, keep its compressed Linears
        compressed in memory: True/"compact", "int4" or "sparse" (SparseScheduleConfig(run_compressed=...)).
    tokenizer: a tokenizer object or name/path (default: the model's path).
    protocol (str): "per-text" (default, the Hub `perplexity` metric's) or "sparsegpt".
    per-text: batch_size (int, 16), add_start_token (bool, True), max_length (int, default the model's positions).
    sparsegpt: seq_len (int, default 2048 or the model's positions), stride (int, optional: strided windows),
        max_windows (int, optional: at most this many windows).
Returns:
    per-text: perplexities (list[float], one per text), mean_perplexity (float, their mean)
    sparsegpt: perplexity (float), num_windows (int), seq_len (int), scored_tokens (int)
"""


class SparsePerplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("string")}))

    def _compute(self, predictions, model=None, tokenizer=None, protocol="per-text", batch_size=16,
                 add_start_token=True, max_length=None, seq_len=None, stride=None, max_windows=None,
                 run_compressed=False):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from optimum_sparsesched.eval.perplexity import perplexity_report, text_perplexities

        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol: {protocol!r} is not valid; allowed: {' | '.join(map(repr, PROTOCOLS))}")
        if model is None:
            raise ValueError("model: pass a causal LM object or a model path/hub id")
        if isinstance(model, str):
            tokenizer = tokenizer or model
            extra = {}
            if run_compressed:
                from optimum_sparsesched.config import SparseScheduleConfig

                extra["quantization_config"] = SparseScheduleConfig(run_compressed=run_compressed)
            with warnings.catch_warnings():  # transformers' note that only our loading attributes are merged
                warnings.filterwarnings("ignore", message="You passed `quantization_config`")
                model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, **extra)
        if tokenizer is None:
            tokenizer = model.name_or_path
        if isinstance(tokenizer, str):
            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        texts = list(predictions)
        if not texts:
            raise ValueError("predictions: no text given; allowed: a non-empty list of strings")
        if protocol == "per-text":
            ppls = text_perplexities(model, tokenizer, texts, batch_size=batch_size,
                                     add_start_token=add_start_token, max_length=max_length)
            return {"perplexities": ppls, "mean_perplexity": sum(ppls) / len(ppls)}
        report = perplexity_report(model, tokenizer, texts, seq_len=seq_len, max_windows=max_windows, stride=stride)
        return {"perplexity": report.value, "num_windows": report.windows, "seq_len": report.seq_len,
                "scored_tokens": report.scored_tokens}
