"""The real engine: a llama.cpp model whose requests decode in the step loop.

One decode path for every `server.parallel`, 1 included, as `llama-server -np 1` runs its
one slot through the same loop: `parallel` requests hold the engine at once, each one's
text handling runs in a worker thread of its own (llamad.engine.base) and feeds the step
loop (llamad.engine.slots), which decodes them together in one llama.cpp context
(llamad.engine.llama_slots). A `llama_cpp.Llama` with a tiny context of its own supplies the
vocabulary, tokenizer and chat template. Which cached prefix a prompt reuses is
llamad.engine.prompt_cache's policy.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import msgspec
import structlog

from llamad.engine.chat import (
    FOLD_SYSTEM_FORMATS,
    fallback_format,
    Chat,
    ChatTemplate,
    gguf_formatter,
    named_formatter,
)
from llamad.config import KV_CACHE_TYPES, UNQUANTIZED_KV_TYPES, Config, file_identity, sampling_defaults
from llamad.engine import Engine, FimTokens, Generation, GrammarRejected, Prompt, PromptError, TokenLogprob
from llamad.engine.llama_slots import LlamaSlotsBackend
from llamad.engine.disk_cache import open_disk_cache
from llamad.engine.flash_attn import FlashAttnChoice, MeasurementStore, choose, measurement_key, store_path
from llamad.engine.prompt_cache import PromptStateCache
from llamad.engine.slots import StepLoop
from llamad.engine.speculative import Speculation
from llamad.engine.stdio import keep_stdio
from llamad.grammar.constraint import GrammarError, check_grammar

log = structlog.get_logger("llamad.engine")
native_log = structlog.get_logger("llama.cpp")

# llama.cpp's own log lines (levels: 1 info, 2 warn, 3 error, 4 debug, 5 continuation).
_NATIVE_LEVELS = {1: "debug", 2: "warning", 3: "error", 4: "debug"}


class NativeLog:
    """Routes llama.cpp's log through structlog (so journald gets JSON, not raw stderr).

    While a model loads, llama-cpp-python silences stderr, so lines are kept and logged
    after the load; the load summary also reads the GPU offload count from them.
    """

    def __init__(self) -> None:
        self.partial = ""
        self.level = 1
        self.captured: list[str] | None = None
        self._callback = None

    def install(self) -> None:
        import ctypes

        import llama_cpp

        @llama_cpp.llama_log_callback
        def callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
            if level != 5:
                self.level = level
            self.partial += text.decode("utf-8", errors="replace")
            while "\n" in self.partial:
                line, self.partial = self.partial.split("\n", 1)
                if not line.strip():
                    continue
                if self.captured is not None:
                    self.captured.append(line)
                else:
                    getattr(native_log, _NATIVE_LEVELS.get(self.level, "debug"))(line.strip())

        self._callback = callback  # keep a reference: ctypes does not
        llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
        keep_stdio()

    def capture(self) -> None:
        self.captured = []

    def release(self) -> list[str]:
        lines, self.captured = self.captured or [], None
        if logging.getLogger("llama.cpp").isEnabledFor(logging.DEBUG):  # thousands of lines a load
            for line in lines:
                native_log.debug(line.strip())
        return lines


native = NativeLog()


def kv_cache_mib(lines: list[str]) -> float | None:
    """llama.cpp's own figure for the KV cache it allocated: the sum of its
    `llama_kv_cache: size = N MiB (...)` lines (a sliding-window model has two caches)."""
    sizes = [float(m.group(1)) for line in lines if (m := re.search(r"llama_kv_cache: size =\s*([\d.]+) MiB", line))]
    return round(sum(sizes), 2) if sizes else None


def context_value(lines: list[str], key: str) -> float | None:
    """A number llama.cpp printed about the context it made ("llama_context: freq_scale = 0.5")."""
    for line in lines:
        match = re.search(rf"llama_context: {re.escape(key)}\s*=\s*([-\d.e]+)", line)
        if match:
            return float(match.group(1))
    return None


def context_flash_attn(lines: list[str]) -> str | None:
    """Flash attention as llama.cpp made the context ("on" / "off"), from its load log:
    `flash_attn = enabled`, or for its own "auto" the line that resolves it."""
    found = None
    for line in lines:
        match = re.search(r"flash_attn\s*=\s*(enabled|disabled)|Flash Attention (enabled|disabled)", line)
        if match:
            found = "on" if "enabled" in match.group(0) else "off"
    return found


def offloaded_layers(lines: list[str]) -> str | None:
    for line in lines:
        match = re.search(r"offloaded (\d+)/(\d+) layers to GPU", line)
        if match:
            return f"{match.group(1)}/{match.group(2)}"
    return None

# On the CPU, llama.cpp's matrix kernels take a batch four rows at a time (the repacked
# weights' gemm, and llamafile's tiles for q8_0 and the like), and each row past the last
# group of four costs about what a plain step's matrix work does. Measured on the demo model
# at 1,645 tokens of context (docs/benchmark.md): a 32-entry step 167 ms, 33 entries 189,
# 31 181; 8 entries 57 ms, 7 68. Drafts are cut to end a step on such an edge. Where the
# kernels go row by row (SmolLM2's Q4_1) a step's cost is linear in its width, and the cut
# costs nothing.
CPU_BATCH_ROWS = 4

# GGUF general.file_type -> the quantization name Ollama's clients show.
FILE_TYPES = {"0": "F32", "1": "F16", "2": "Q4_0", "3": "Q4_1", "7": "Q8_0", "8": "Q5_0", "9": "Q5_1", "10": "Q2_K",
              "11": "Q3_K_S", "12": "Q3_K_M", "13": "Q3_K_L", "14": "Q4_K_S", "15": "Q4_K_M", "16": "Q5_K_S",
              "17": "Q5_K_M", "18": "Q6_K", "32": "BF16"}
# The `Llama` object only tokenizes and renders templates; its own context (and compute
# buffer, n_batch x n_vocab logits) stays tiny.
HELPER_CONTEXT = 32
# At start, with model.flash_attn = "auto" and no stored measurement, the probe may take this
# long (SmolLM2-135M took 30-55 s on this project's busy 2-core CPU); past it, llama.cpp's own choice
# stands until `llamad check` measures with no limit.
PROBE_BUDGET_S = 90.0
# At close, how long the saved slots may take to reach the disk (systemd's stop timeout is
# 60 s): a few hundred MiB on a slow card.
KEEP_TIMEOUT_S = 20.0


ROPE_SCALING_TYPES = {"": -1, "none": 0, "linear": 1, "yarn": 2}  # llama.cpp's LLAMA_ROPE_SCALING_TYPE_*


def rope_settings(m: Any) -> dict[str, Any]:
    """model.rope_* as llama.cpp's context parameters (0 and "" leave the GGUF's own)."""
    settings: dict[str, Any] = {"rope_scaling_type": ROPE_SCALING_TYPES[m.rope_scaling], "rope_freq_base": m.rope_freq_base}
    if m.rope_scaling in ("linear", "yarn"):
        settings["rope_freq_scale"] = 1.0 / m.rope_scale  # --rope-scale N is a frequency scale of 1/N
    return settings


class LlamaEngine(Engine):
    """`server.parallel` requests decode together in one context (one for parallel = 1)."""

    def __init__(self, config: Config, model_path: Path, remeasure: bool = False, probe_budget_s: float | None = PROBE_BUDGET_S):
        super().__init__(
            model_id=config.model.name,
            n_ctx=config.model.n_ctx,
            max_queue=config.server.max_queue,
            queue_timeout=config.server.queue_timeout,
            capacity=config.server.parallel,
        )
        self.config = config
        self.model_path = model_path
        self.parallel = config.server.parallel
        self.default_sampling = sampling_defaults(config)
        self.default_template_switches = dict(config.model.chat_template_kwargs)
        self.llm = None  # the helper: vocabulary, tokenizer, chat template
        self.template: ChatTemplate | None = None
        self.backend: LlamaSlotsBackend | None = None  # the context the requests decode in
        self.loop: StepLoop | None = None
        # The file as loaded (path, size, mtime): a reload swaps the model when it changes.
        self.model_identity: tuple[str, int, int] | None = None
        self.embedder = None  # llamad.engine.llama_embed.Embedder, made on the first embedding request
        self._no_speculation = "off"
        self.draft_model = None  # llamad.engine.llama_draft.LlamaDraftModel, with [speculative] draft_model
        # model.flash_attn = "auto": re-run the probe even when a measurement is stored
        # (`llamad check --measure`), and how long the probe may take (None: no limit).
        self.remeasure = remeasure
        self.probe_budget_s = probe_budget_s
        self.flash_attn: FlashAttnChoice | None = None
        capacity = config.model.prompt_cache_bytes
        # In memory (model.prompt_cache_bytes) and on disk ([cache], attached at load).
        self.prompt_cache = PromptStateCache(capacity) if capacity > 0 or config.cache.max_bytes > 0 else None

    @property
    def template_supports_tools(self) -> bool:
        return bool(self.template and self.template.supports_tools)

    # -- loading ---------------------------------------------------------------------------
    def _load(self) -> None:
        import llama_cpp


        m = self.config.model
        threads = m.n_threads or os.cpu_count() or 1
        started = time.monotonic()
        self.model_identity = file_identity(self.model_path)
        log.info(
            "model_loading",
            path=str(self.model_path),
            size_bytes=self.model_path.stat().st_size,
            n_ctx=m.n_ctx,
            n_threads=threads,
            n_gpu_layers=m.n_gpu_layers,
            gpu_offload_supported=bool(llama_cpp.llama_supports_gpu_offload()),
        )
        if native._callback is None:
            native.install()
        native.capture()
        try:
            self.llm = llama_cpp.Llama(
                model_path=str(self.model_path),
                n_ctx=HELPER_CONTEXT,
                n_batch=m.n_batch,
                n_threads=threads,
                n_threads_batch=threads,
                n_gpu_layers=m.n_gpu_layers,
                type_k=KV_CACHE_TYPES[m.type_k],
                type_v=KV_CACHE_TYPES[m.type_v],
                # The helper decodes nothing; a quantized V cache still needs it on.
                flash_attn=m.type_v not in UNQUANTIZED_KV_TYPES,
                **rope_settings(m),
                verbose=False,
            )
        except (ValueError, RuntimeError) as exc:
            raise RuntimeError(f"llama.cpp could not load {self.model_path}: {exc}") from None
        finally:
            load_lines = native.release()
        self.template = self._choose_template()
        n_ctx = self._trained_cap(m.n_ctx)
        self._tool_format = self._detect_tool_format()
        offloaded = offloaded_layers(load_lines)
        # A prompt read alone goes in n_batch steps (in 128-token steps a cold 2,300-token
        # prompt took 1.7x llama-server's time here); beside running streams, chunks are
        # sized by the step loop. A hang-up is noticed between steps.
        prompt_step = m.n_batch
        self.flash_attn = self._choose_flash_attn(threads)
        native.capture()
        try:
            self.backend = LlamaSlotsBackend(
                self.llm, self.parallel, n_ctx, m.n_batch, prompt_step, threads, flash_attn=self.flash_attn.effective,
                batch_rows=1 if offloaded and not offloaded.startswith("0/") else CPU_BATCH_ROWS,
            )
            self.backend.shown_tokens = self._shown_tokens()
        finally:
            context_lines = native.release()
        metadata = self.llm.metadata
        self.info = {
            "path": str(self.model_path),
            "architecture": metadata.get("general.architecture", "unknown"),
            "chat_template": self.template.source,
            "n_ctx": n_ctx,
            "n_ctx_train": self.llm._model.n_ctx_train(),  # noqa: SLF001
            **({"n_ctx_capped": f"model.n_ctx {m.n_ctx} capped at the GGUF's trained context {n_ctx}"
                + (f" (x rope_scale {m.rope_scale})" if m.rope_scaling in ("linear", "yarn") else "")} if n_ctx < m.n_ctx else {}),
            **({"rope_scaling": f"{m.rope_scaling} x{m.rope_scale}"} if m.rope_scaling in ("linear", "yarn") else {}),
            # What llama.cpp's context runs with (1: the positions as trained).
            "rope_freq_scale": context_value(context_lines, "freq_scale"),
            "n_threads": threads,
            "n_gpu_layers": m.n_gpu_layers,
            "gpu_layers_offloaded": offloaded or "0 (CPU build or none requested)",
            "prompt_step": prompt_step,
            "parallel": self.parallel,
            "kv_tokens": self.parallel * n_ctx,
            # The KV cache that serves requests is the slots' context, not the helper's.
            "kv_cache_mib": kv_cache_mib(context_lines),
            "kv_cache_type": f"{m.type_k}/{m.type_v}",
            # "on" / "off" as the context has it ("auto": not measured, llama.cpp's choice), why,
            # and the measurement behind model.flash_attn = "auto".
            **self.flash_attn.describe(),
            # What llama.cpp says it made, the check on the above (and the answer for "auto").
            "flash_attn_context": context_flash_attn(context_lines),
        }
        log.info(
            "model_loaded",
            path=str(self.model_path),
            size_bytes=self.model_path.stat().st_size,
            architecture=self.info["architecture"],
            n_ctx=n_ctx,
            n_threads=threads,
            n_gpu_layers=m.n_gpu_layers,
            gpu_layers_offloaded=self.info["gpu_layers_offloaded"],
            kv_cache_mib=self.info["kv_cache_mib"],
            kv_cache_type=self.info["kv_cache_type"],
            flash_attn=self.info["flash_attn"],
            flash_attn_reason=self.info["flash_attn_reason"],
            parallel=self.parallel,
            kv_tokens=self.info["kv_tokens"],
            chat_template=self.template.source,
            load_s=round(time.monotonic() - started, 3),
            # SCHED_IDLE beside models that serve, where the process may undo it (llamad.engine.background)
            load_priority=self.load_priority.described if self.load_priority else "normal",
        )
        if self.prompt_cache is not None:
            self.prompt_cache.disk = open_disk_cache(self.config, self.model_path, self.flash_attn.effective)
        speculation = self._speculation(self.config)
        if speculation is not None and speculation.draft_model:
            self.draft_model = self._load_draft_model(n_ctx, threads)
        self.loop = StepLoop(
            self.backend,
            self.prompt_cache,
            engine_stats=self.stats,
            someone_waits=self.scheduler.has_waiters,
            speculation=speculation,
            draft_model=self.draft_model,
        )
        self.info["speculative"] = self.loop.speculation.describe() if self.loop.speculation else self._no_speculation

    def _serve(self) -> None:
        assert self.loop is not None
        self.loop.start()

    def _choose_flash_attn(self, threads: int) -> FlashAttnChoice:
        """model.flash_attn as the context gets it: "auto" is the stored measurement for this
        model, threads, offload and build, or a probe now (bounded by probe_budget_s)."""
        import llama_cpp

        from llamad.engine.flash_probe import measure

        m = self.config.model
        key = measurement_key(
            self.model_identity, threads, m.n_gpu_layers, m.type_k, m.type_v,
            build=llama_cpp.__version__, gpu_offload=bool(llama_cpp.llama_supports_gpu_offload()),
        )

        def probe():
            log.info("flash_attn_probe", hint="no stored measurement for this model, threads and build: measuring once")
            native.capture()
            try:
                return measure(self.llm, threads, budget_s=self.probe_budget_s)
            finally:
                native.release()

        return choose(str(m.flash_attn), m.type_v, key, MeasurementStore(store_path()), probe, remeasure=self.remeasure)

    def _speculation(self, config: Config) -> Speculation | None:
        """The [speculative] settings, or None where this model's KV cannot drop a rejected
        draft (a recurrent or hybrid model keeps only whole sequences)."""
        import llama_cpp

        assert self.llm is not None
        model = self.llm._model.model  # noqa: SLF001
        if llama_cpp.llama_model_is_recurrent(model) or llama_cpp.llama_model_is_hybrid(model):
            self._no_speculation = "unavailable (a recurrent model's cache cannot roll a draft back)"
            return None
        s = config.speculative
        return Speculation(
            enabled=s.enabled, ngram=s.ngram, draft_max=s.draft_max, draft_min=s.draft_min,
            # A changed draft_model reloads the engine (ModelSpec.settings), so this names the loaded one.
            draft_model=Path(s.draft_model).name if s.draft_model else "",
            draft_p_min=s.draft_p_min,
        )

    def _load_draft_model(self, n_ctx: int, threads: int):
        """[speculative] draft_model, in a context of its own with one sequence per slot. A
        vocabulary that differs from the target's is a load error: its drafts would be ids
        the target reads as other text, none accepted, and a configured draft model that
        silently does nothing is a slower server nobody asked for."""
        from llamad.engine.llama_draft import LlamaDraftModel, vocabulary_mismatch

        assert self.llm is not None
        s, m = self.config.speculative, self.config.model
        path = Path(s.draft_model).expanduser()
        started = time.monotonic()
        native.capture()
        try:
            draft = LlamaDraftModel(path, self.parallel, n_ctx, m.n_batch, threads, s.draft_n_gpu_layers, m.flash_attn)
        finally:
            native.release()
        mismatch = vocabulary_mismatch(self.llm._model.vocab, draft.vocab)  # noqa: SLF001
        if mismatch is not None:
            draft.close()
            raise RuntimeError(
                f"speculative.draft_model {path} cannot draft for {self.model_path}: their vocabularies differ"
                f" ({mismatch}); a draft model must share the target's tokenizer (the same family), or leave"
                " speculative.draft_model empty for n-gram drafts only"
            )
        log.info("draft_model_loaded", path=str(path), target=str(self.model_path), load_s=round(time.monotonic() - started, 3))
        return draft

    def configure_speculation(self, config: Config) -> None:
        """Applies a reloaded [speculative] table to the requests admitted from now on."""
        if self.loop is not None and self.loop.speculation is not None:
            self.loop.speculation = self._speculation(config)
            self.info["speculative"] = self.loop.speculation.describe() if self.loop.speculation else self._no_speculation

    def _choose_template(self) -> ChatTemplate:
        llm = self.llm
        assert llm is not None
        metadata = llm.metadata
        wanted = self.config.model.chat_format
        architecture = metadata.get("general.architecture", "")
        if wanted:
            log.info("chat_template_chosen", source=f"format:{wanted}", reason="model.chat_format")
            return ChatTemplate(
                source=f"format:{wanted}",
                render_fn=named_formatter(wanted),
                fold_system_prompt=wanted in FOLD_SYSTEM_FORMATS,
            )
        template = metadata.get("tokenizer.chat_template")
        if template:
            eos = llm.token_eos()
            bos = llm.token_bos()
            formatter = gguf_formatter(
                template,
                eos_token=llm._model.token_get_text(eos) if eos != -1 else "",  # noqa: SLF001
                bos_token=llm._model.token_get_text(bos) if bos != -1 else "",  # noqa: SLF001
            )
            log.info("chat_template_chosen", source="gguf", reason="the GGUF carries tokenizer.chat_template")
            return ChatTemplate(source="gguf", render_fn=formatter, supports_tools="tools" in template)
        finetune = metadata.get("general.finetune", "")
        name = fallback_format(architecture, finetune)
        log.info(
            "chat_template_chosen",
            source=f"format:{name}",
            reason=f"the GGUF has no chat template; chose '{name}' for architecture '{architecture or 'unknown'}'"
            f" and finetune '{finetune or 'none: a base model'}'",
        )
        return ChatTemplate(
            source=f"format:{name}", render_fn=named_formatter(name), fold_system_prompt=name in FOLD_SYSTEM_FORMATS
        )

    def _shown_tokens(self) -> frozenset[int]:
        """The token ids of the family's markers (llamad.tools.formats.shown_markers)."""
        from llamad.engine import tool_formats as formats

        assert self.llm is not None
        shown = set()
        for marker in formats.shown_markers(self.tool_format):
            tokens = self.llm.tokenize(marker.encode("utf-8"), add_bos=False, special=True)
            if len(tokens) == 1:
                shown.add(tokens[0])
        return frozenset(shown)

    def _detect_tool_format(self):
        """The family's tool format (llamad.tools.formats) from the GGUF template and vocabulary."""
        from llamad.engine import tool_formats as formats

        assert self.llm is not None and self.template is not None
        text = self.llm.metadata.get("tokenizer.chat_template") if self.template.source == "gguf" else None

        def tokenize(marker: str) -> list[int]:
            return self.llm.tokenize(marker.encode("utf-8"), add_bos=False, special=True)

        found = formats.detect(text, formats.special_markers(tokenize))
        log.info("tool_format_detected", tool_format=found.name, reasoning=found.reasoning)
        return found

    def _trained_cap(self, wanted: int) -> int:
        """model.n_ctx, capped at the context the GGUF was trained on (as llama-server does):
        past it, positions the model never saw make it repeat itself. With RoPE scaling
        configured (model.rope_scaling, rope_scale N) the cap is N times the trained context."""
        assert self.llm is not None
        trained = self.llm._model.n_ctx_train()  # noqa: SLF001
        m = self.config.model
        scaled = m.rope_scaling in ("linear", "yarn")
        limit = int(trained * m.rope_scale) if scaled else trained
        if 0 < limit < wanted:
            log.warning(
                "n_ctx_capped",
                n_ctx=wanted,
                n_ctx_train=trained,
                limit=limit,
                reason=f"model.n_ctx is past {'the scaled' if scaled else 'the GGUF' + chr(39) + 's trained'} context; capped at it",
            )
            self.n_ctx = limit
            return limit
        self.n_ctx = wanted
        return wanted

    # -- prompts ---------------------------------------------------------------------------
    def _prepare(self, chat: Chat) -> Prompt:
        assert self.llm is not None and self.template is not None
        try:
            text, stops, _ = self.template.render(chat)
        except Exception as exc:  # a Jinja template may raise_exception() on odd histories
            raise PromptError(f"the chat template refused these messages: {exc}") from None
        tokens = self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        bos = self.llm.token_bos()
        if self.llm._model.add_bos_token() and bos != -1 and (not tokens or tokens[0] != bos):  # noqa: SLF001
            tokens.insert(0, bos)
        return Prompt(
            text=text,
            tokens=tokens,
            template_stops=stops,
            opens_reasoning=text.rstrip().endswith("<think>"),
        )

    def _check_grammar(self, grammar: str) -> None:
        assert self.llm is not None
        try:
            check_grammar(self.llm._model.vocab, grammar)  # noqa: SLF001
        except GrammarError as exc:
            raise GrammarRejected(str(exc)) from None

    def expected_reuse(self, prompt: Prompt) -> int:
        return self.loop.forecast_reuse(prompt.tokens) if self.loop is not None else 0

    def count_tokens(self, text: str) -> int:
        assert self.llm is not None
        return len(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))

    # -- raw text, tokens, fill-in-the-middle, embeddings ----------------------------------------
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        assert self.llm is not None
        # llama.cpp adds BOS only when the vocabulary asks for it (add_bos_token).
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=parse_special)

    def token_pieces(self, tokens: list[int]) -> list[bytes]:
        import llama_cpp

        assert self.llm is not None
        vocab = self.llm._model.vocab  # noqa: SLF001
        buffer = ctypes.create_string_buffer(256)
        # special=True: a control token shows as its text ("<start_of_turn>"), not as nothing.
        pieces = []
        for token in tokens:
            n = llama_cpp.llama_token_to_piece(vocab, token, buffer, 256, 0, True)
            pieces.append(buffer.raw[: max(n, 0)])
        return pieces

    @property
    def n_vocab(self) -> int:
        assert self.llm is not None
        return self.llm.n_vocab()

    def fim_tokens(self) -> FimTokens | None:
        import llama_cpp

        assert self.llm is not None
        vocab = self.llm._model.vocab  # noqa: SLF001
        ids = (llama_cpp.llama_vocab_fim_pre(vocab), llama_cpp.llama_vocab_fim_suf(vocab), llama_cpp.llama_vocab_fim_mid(vocab))
        if any(i < 0 for i in ids):  # LLAMA_TOKEN_NULL: the GGUF names no such token
            return None
        return FimTokens(*ids)

    def describe(self) -> dict[str, object]:
        import llama_cpp

        llm = self.llm
        assert llm is not None
        metadata = llm.metadata
        buffer = ctypes.create_string_buffer(128)
        llama_cpp.llama_model_desc(llm._model.model, buffer, 128)  # noqa: SLF001  "gemma3 270M Q4_K - Medium"
        description = buffer.value.decode("utf-8", errors="replace")
        return {
            "architecture": metadata.get("general.architecture", "unknown"),
            "parameter_count": llm._model.n_params(),  # noqa: SLF001
            "size_label": metadata.get("general.size_label", ""),
            "quantization": FILE_TYPES.get(metadata.get("general.file_type", ""), description.split(" ", 2)[-1]),
            "embedding_length": llm.n_embd(),
            "context_length": llm._model.n_ctx_train(),  # noqa: SLF001
            "chat_template": metadata.get("tokenizer.chat_template", ""),
        }

    @property
    def embed_max_tokens(self) -> int:
        return min(self.n_ctx, self.config.embeddings.batch_tokens)

    def _embed(self, batch: list[list[int]]) -> list[list[float]]:
        from llamad.engine.llama_embed import Embedder

        assert self.llm is not None
        if self.embedder is None:  # made on first use: a chat-only server pays nothing
            settings = msgspec.structs.replace(self.config.embeddings, batch_tokens=self.embed_max_tokens)
            self.embedder = Embedder(self.llm._model, settings, n_threads=int(self.info.get("n_threads", 1)))  # noqa: SLF001
        return self.embedder.embed(batch)

    # -- generation ------------------------------------------------------------------------
    def _decode(self, generation: Generation, cancel: threading.Event) -> Iterator[str | int | TokenLogprob]:
        assert self.loop is not None
        tokens = generation.prompt.tokens
        if self.prompt_cache is not None:  # a saved state on disk is read here, not in the step loop
            self.prompt_cache.prefetch(tokens, held=self.loop.forecast_reuse(tokens))
        return self.loop.generate(generation, cancel)

    @property
    def slot_evictions(self) -> int:
        return self.loop.stats.evictions if self.loop is not None else 0

    @property
    def speculation(self) -> Speculation | None:
        return self.loop.speculation if self.loop is not None else None

    @property
    def grammar_fallbacks(self) -> int:
        return self.backend.grammar_fallbacks if self.backend is not None else 0

    @property
    def disk_cache(self):
        """The on-disk saved-state cache (llamad.engine.disk_cache), or None."""
        return self.prompt_cache.disk if self.prompt_cache is not None else None

    def close(self) -> None:
        if self.loop is not None:
            self.loop.close()  # ends what it still runs; the worker threads then return
            self._keep_slots()
        super().close()
        if self.draft_model is not None:
            self.draft_model.close()
            self.draft_model = None
        if self.backend is not None:
            self.backend.close()
            self.backend = None

    def _keep_slots(self) -> None:
        """Once the step loop has stopped: what the slots hold goes to the saved-state cache
        and so to disk (waiting for the writes), so that the next start, or the engine a
        reload swapped in, reuses it."""
        cache, loop = self.prompt_cache, self.loop
        if cache is None or cache.disk is None or loop is None or self.backend is None:
            return
        for slot in loop.slots:
            if slot.cached:
                try:
                    loop._save(slot)  # noqa: SLF001 - the loop's thread is gone; the context is free
                except Exception as exc:
                    log.warning("slot_not_kept", slot=slot.id, error=str(exc))
        cache.close(timeout=KEEP_TIMEOUT_S)
