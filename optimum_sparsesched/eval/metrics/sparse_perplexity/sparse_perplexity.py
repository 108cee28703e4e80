"""Perplexity as an `evaluate` metric that works offline and on model objects.

    import evaluate, optimum_sparsesched
    metric = evaluate.load(optimum_sparsesched.PERPLEXITY_METRIC)
    metric.compute(predictions=texts, model=model_or_path, tokenizer=tokenizer_or_path, seq_len=2048)
    # -> {"perplexity": float, "num_windows": int}

Same protocol as `optimum_sparsesched.perplexity` (texts joined with blank lines, tokenized once, non-overlapping
windows of ``seq_len``, or strided windows with ``stride``), so it reports the same number as the benchmarks.
"""

import datasets
import evaluate

_DESCRIPTION = "Perplexity of a causal LM (object or path) on texts, SparseGPT protocol, non-overlapping or strided."
_KWARGS = """
Args:
    predictions (list[str]): the texts.
    model: a transformers causal LM object, or a model folder / hub id.
    tokenizer: a tokenizer object or name/path (default: the model's path).
    seq_len (int): window length in tokens (default 2048).
    stride (int, optional): window start spacing for strided evaluation (default: non-overlapping).
    max_windows (int, optional): evaluate at most this many windows.
Returns:
    perplexity (float), num_windows (int)
"""


class SparsePerplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("string")}))

    def _compute(self, predictions, model=None, tokenizer=None, seq_len=2048, stride=None, max_windows=None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from optimum_sparsesched.eval.perplexity import eval_spans, perplexity

        if model is None:
            raise ValueError("model: pass a causal LM object or a model path/hub id")
        if isinstance(model, str):
            tokenizer = tokenizer or model
            model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
        if tokenizer is None:
            tokenizer = model.name_or_path
        if isinstance(tokenizer, str):
            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        texts = list(predictions)
        ppl = perplexity(model, tokenizer, texts, seq_len=seq_len, max_windows=max_windows, stride=stride)
        n_tokens = tokenizer("\n\n".join(texts), return_tensors="pt", add_special_tokens=False).input_ids.shape[1]
        return {"perplexity": ppl, "num_windows": len(eval_spans(n_tokens, seq_len, stride, max_windows))}
