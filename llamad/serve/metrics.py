"""Prometheus text-format metrics, kept in-process (one worker, so no multiprocess story)."""

from __future__ import annotations

import bisect
from collections import defaultdict
from typing import Any, Callable

TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
RATE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.total = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.n += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        out = []
        cumulative = 0
        sep = "," if labels else ""
        for bound, count in zip(self.buckets, self.counts):
            cumulative += count
            out.append(f'{name}_bucket{{{labels}{sep}le="{bound}"}} {cumulative}')
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.n}')
        suffix = f"{{{labels}}}" if labels else ""
        out.append(f"{name}_sum{suffix} {self.total}")
        out.append(f"{name}_count{suffix} {self.n}")
        return out


# Label values a client cannot multiply: methods outside this set are "OTHER".
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class Metrics:
    """Request counts and histograms are kept here; token and generation counts are the
    engines' own (`EngineStats`), bumped as the work happens, and summed over every engine
    this process has served with, so a reload that swaps the model does not make a counter
    go down."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, int], int] = defaultdict(int)
        self.requests_in_flight = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.rate = Histogram(RATE_BUCKETS)
        self.duration = Histogram(DURATION_BUCKETS)
        self._engine_stats: list[Any] = []

    def track(self, engine: Any) -> None:
        """Counts `engine`'s work from now on (called for every engine a request takes)."""
        stats = engine.stats
        if not any(seen is stats for seen in self._engine_stats):
            self._engine_stats.append(stats)

    def total(self, name: str) -> int:
        return sum(getattr(stats, name) for stats in self._engine_stats)

    def in_flight(self, delta: int) -> None:
        self.requests_in_flight += delta

    def observe_request(self, record: Any, status: int | None, duration: float) -> None:
        """`record.route` is a route template (or "unmatched"), never the raw path."""
        method = record.method if record.method in METHODS else "OTHER"
        self.requests[(method, record.route, int(status or 0))] += 1
        self.duration.observe(duration)
        if record.time_to_first_token_s is not None:
            self.ttft.observe(record.time_to_first_token_s)
        if record.decode_s > 0 and record.completion_tokens > 1:
            self.rate.observe((record.completion_tokens - 1) / record.decode_s)

    def render(self, engine: Any, pool: Any = None) -> str:
        """`engine`: the default model's; `pool`: every model's, labelled by its configured
        name (llamad.models.pool)."""
        self.track(engine)
        lines: list[str] = []

        def metric(name: str, kind: str, help_text: str, samples: list[str]) -> None:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
            lines.extend(samples)

        def counter(name: str, help_text: str, field: str) -> None:
            metric(name, "counter", help_text, [f"{name} {self.total(field)}"])

        metric(
            "llamad_requests_total",
            "counter",
            "HTTP requests by method, route template (\"unmatched\" when no route matched) and status; "
            "499: the client went away before the answer ended.",
            [
                f'llamad_requests_total{{method="{m}",route="{_escape(r)}",status="{s}"}} {n}'
                for (m, r, s), n in sorted(self.requests.items())
            ],
        )
        counter("llamad_prompt_tokens_total", "Prompt tokens of the generations the engine took (not of requests the queue refused).", "prompt_tokens")
        counter("llamad_prompt_tokens_evaluated_total", "Prompt tokens evaluated, counted per prompt step (cache reuse and steps a hang-up skipped are not).", "prompt_tokens_evaluated")
        counter("llamad_completion_tokens_total", "Tokens decoded, counted as they are decoded, those of cancelled generations too.", "completion_tokens")
        counter("llamad_speculative_draft_tokens_total", "Draft tokens fed for checking by n-gram speculation ([speculative]).", "draft_tokens")
        counter("llamad_speculative_accepted_tokens_total", "Draft tokens the model's own sampling confirmed: tokens decoded without a step of their own.", "draft_accepted")
        counter("llamad_prompt_cache_tokens_total", "Prompt tokens reused from the KV cache instead of evaluated: the cache's primary figure.", "cached_tokens")
        counter("llamad_prompt_cache_hits_total", "Prompts that reused more than llamad_prompt_shared_head_tokens from the cache.", "cache_hits")
        counter("llamad_prompt_cache_lookups_total", "Prompts that looked for a cached prefix.", "cache_lookups")
        hits, lookups = self.total("cache_hits"), self.total("cache_lookups")
        metric("llamad_prompt_cache_hit_ratio", "gauge", "hits / lookups (secondary: see llamad_prompt_cache_tokens_total).", [f"llamad_prompt_cache_hit_ratio {hits / lookups if lookups else 0.0:.4f}"])
        metric("llamad_prompt_shared_head_tokens", "gauge", "Tokens every prompt starts with (BOS, template opening); reusing only these is no hit.", [f"llamad_prompt_shared_head_tokens {engine.shared_head}"])
        metric("llamad_queue_depth", "gauge", "Requests waiting for the engine.", [f"llamad_queue_depth {engine.scheduler.queue_depth}"])
        metric("llamad_generation_active", "gauge", "1 while a generation holds the engine.", [f"llamad_generation_active {int(engine.generating)}"])
        scheduler = engine.scheduler
        metric("llamad_slots_total", "gauge", "Requests the engine decodes together (server.parallel).", [f"llamad_slots_total {scheduler.capacity}"])
        metric("llamad_slots_busy", "gauge", "Slots holding a request now.", [f"llamad_slots_busy {scheduler.active}"])
        # Sampled tokens the grammar rejected, sampled again among the allowed ones.
        fallbacks = getattr(engine, "grammar_fallbacks", 0)
        metric("llamad_grammar_fallbacks_total", "counter", "Sampled tokens a grammar rejected and that were sampled again.", [f"llamad_grammar_fallbacks_total {fallbacks}"])
        evictions = getattr(engine, "slot_evictions", 0)
        metric("llamad_slot_evictions_total", "counter", "Idle slots whose KV moved to the saved-state cache to make room for a long prompt's attention.", [f"llamad_slot_evictions_total {evictions}"])
        disk = getattr(engine, "disk_cache", None)  # [cache]: saved prompt states on disk
        d = disk.stats if disk is not None else None
        metric("llamad_prompt_cache_disk_hits_total", "counter", "Saved prompt states read back from the disk cache (checksum verified) for a prompt that reuses them.", [f"llamad_prompt_cache_disk_hits_total {d.hits if d else 0}"])
        metric("llamad_prompt_cache_disk_writes_total", "counter", "Saved prompt states written to the disk cache.", [f"llamad_prompt_cache_disk_writes_total {d.writes if d else 0}"])
        metric("llamad_prompt_cache_disk_written_bytes_total", "counter", "Bytes of those writes.", [f"llamad_prompt_cache_disk_written_bytes_total {d.write_bytes if d else 0}"])
        metric("llamad_prompt_cache_disk_rejected_total", "counter", "Files in the disk cache that failed a check (corrupt, truncated, another format): removed, never loaded.", [f"llamad_prompt_cache_disk_rejected_total {d.rejected if d else 0}"])
        metric("llamad_prompt_cache_disk_bytes", "gauge", "Bytes the disk cache directory holds (cache.max_bytes bounds it).", [f"llamad_prompt_cache_disk_bytes {disk.size_bytes if disk is not None else 0}"])
        metric("llamad_requests_in_flight", "gauge", "HTTP requests being served.", [f"llamad_requests_in_flight {self.requests_in_flight}"])
        counter("llamad_generations_cancelled_total", "Generations stopped early because the client went away (hang-up, stalled reader, shutdown).", "cancelled")
        counter("llamad_generations_failed_total", "Generations stopped by an error.", "failed")
        states = ("loading", "ready", "failed")
        metric(
            "llamad_model_state",
            "gauge",
            "1 for the model's current load state.",
            [f'llamad_model_state{{state="{s}"}} {int(engine.state == s)}' for s in states],
        )
        if pool is not None:
            self._render_models(pool, metric)
        metric("llamad_time_to_first_token_seconds", "histogram", "Time from request to first token.", self.ttft.lines("llamad_time_to_first_token_seconds"))
        metric("llamad_decode_tokens_per_second", "histogram", "Decode rate of each generation.", self.rate.lines("llamad_decode_tokens_per_second"))
        metric("llamad_request_duration_seconds", "histogram", "Whole request duration.", self.duration.lines("llamad_request_duration_seconds"))
        return "\n".join(lines) + "\n"


    def _render_models(self, pool: Any, metric: Callable[[str, str, str, list[str]], None]) -> None:
        """Per model of the set: the label values are the configured names, never a client's."""
        names = list(pool.catalog.models)
        residents = pool.residents
        counters = pool.counters

        def per_model(name: str, kind: str, help_text: str, value: Callable[[str], float]) -> None:
            metric(name, kind, help_text, [f'{name}{{model="{_escape(m)}"}} {value(m)}' for m in names])

        def live(m: str, field_name: str) -> int:
            resident = residents.get(m)
            return getattr(resident.engine.stats, field_name) if resident is not None else 0

        per_model("llamad_model_loaded", "gauge", "1 while the model is loaded and ready.",
                  lambda m: int(m in residents and residents[m].state == "ready"))
        per_model("llamad_model_loads_total", "counter", "Loads of the model that succeeded.", lambda m: counters[m].loads if m in counters else 0)
        per_model("llamad_model_load_failures_total", "counter", "Loads of the model that failed.",
                  lambda m: counters[m].load_failures if m in counters else 0)
        per_model("llamad_model_load_seconds_total", "counter", "Seconds spent loading the model.",
                  lambda m: round(counters[m].load_seconds, 3) if m in counters else 0)
        metric("llamad_model_unloads_total", "counter", "Unloads by reason: keep_alive (idle past it), room (for another model), "
               "request (keep_alive 0), reload, shutdown.",
               [f'llamad_model_unloads_total{{model="{_escape(m)}",reason="{r}"}} {counters[m].unloads.get(r, 0) if m in counters else 0}'
                for m in names for r in ("keep_alive", "room", "request", "reload")])
        per_model("llamad_model_memory_bytes", "gauge", "Memory the loaded model takes (estimated before the load, measured after).",
                  lambda m: residents[m].memory if m in residents else 0)
        per_model("llamad_model_queue_depth", "gauge", "Requests waiting for the model: for its load, or in its queue.",
                  lambda m: (residents[m].waiting + residents[m].engine.scheduler.queue_depth) if m in residents else 0)
        per_model("llamad_model_prompt_tokens_total", "counter", "Prompt tokens of the generations the model took.",
                  lambda m: (counters[m].prompt_tokens if m in counters else 0) + live(m, "prompt_tokens"))
        per_model("llamad_model_completion_tokens_total", "counter", "Tokens the model decoded.",
                  lambda m: (counters[m].completion_tokens if m in counters else 0) + live(m, "completion_tokens"))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
