"""The table `llamad bench` prints from its results (the same figures go out as JSON)."""

from __future__ import annotations

from typing import Any


def render_table(r: dict[str, Any]) -> str:
    rows: list[tuple[str, str]] = []
    e, h = r.get("engine"), r.get("http")
    if h is None:  # llamad bench --restart: that case alone
        return _table(_restart_rows(r["restart"]))
    if e:
        rows += [
            ("engine decode (llama.cpp generate loop, no HTTP)", f"{e['decode_tokens_per_s']:.1f} tok/s"),
            ("llama-cpp-python create_chat_completion stream", f"{e['llama_cpp_python_stream_chunks_per_s']:.1f} chunks/s"),
        ]
    rows += [
        ("HTTP streamed decode", f"{h['streamed_decode_tokens_per_s']:.1f} tok/s"),
        ("HTTP streamed time to first token", f"{h['streamed_ttft_s'] * 1000:.0f} ms"),
        ("HTTP streamed end to end", f"{h['streamed_tokens_per_s_end_to_end']:.1f} tok/s"),
        ("HTTP non-streamed end to end", f"{h['non_streamed_tokens_per_s_end_to_end']:.1f} tok/s"),
    ]
    if e:
        rows.append(("ratio streamed / engine decode", f"{r['streamed_over_engine']:.3f}"))
    rows.append(("ratio streamed / non-streamed (end to end)", f"{r['streamed_over_non_streamed_end_to_end']:.3f}"))
    rows.append((
        "  the same, client reading the stream at the end",
        f"{r['streamed_read_late_over_non_streamed']:.3f} ({h['streamed_read_late_tokens_per_s_end_to_end']:.1f} tok/s)",
    ))
    if "concurrency" in r:
        c = r["concurrency"]
        rows += [
            (f"{c['streams']} parallel streams: aggregate", f"{c['aggregate_tokens_per_s']:.1f} tok/s ({c['ok']} ok)"),
            ("  time to first token p50 / p90 / max", f"{c['ttft_p50_s']:.2f} / {c['ttft_p90_s']:.2f} / {c['ttft_max_s']:.2f} s"),
        ]
    for c in r.get("parallel", []):
        rows.append((
            f"{c['streams']} parallel streams: aggregate tok/s; TTFT p50 / p90 / max",
            f"{c['aggregate_tokens_per_s']:.1f}; {c['ttft_p50_s']:.2f} / {c['ttft_p90_s']:.2f} / {c['ttft_max_s']:.2f} s",
        ))
    if "prompt_cache" in r:
        p = r["prompt_cache"]
        rows += [
            ("prompt cache: turn 1 / turn 2 time to first token", f"{p['turn1_ttft_s'] * 1000:.0f} / {p['turn2_ttft_s'] * 1000:.0f} ms"),
            ("  turn 2 / turn 1", f"{p['turn2_over_turn1']:.3f} ({p['turn2_cached_tokens']} tokens reused)"),
        ]
    if "hangup" in r:
        g = r["hangup"]
        rows += [
            ("hang-up to next request's first token: decoding", f"{g['decode_to_next_first_token_s'] * 1000:.0f} ms"),
            ("  during prompt evaluation", f"{g['prompt_to_next_first_token_s'] * 1000:.0f} ms"),
        ]
    if "embeddings" in r:
        m = r["embeddings"]
        rows.append((
            f"embeddings: {m['inputs']} inputs in one request",
            f"{m['inputs_per_s']:.2f} inputs/s ({m['prompt_tokens']} tokens, {m['seconds']:.1f} s)",
        ))
    if "agent" in r:
        a = r["agent"]
        rows += [
            (f"agent request ({a['turn1_prompt_tokens']} tokens): cold time to first token", f"{a['turn1_ttft_s']:.2f} s"),
            (
                "  next turn time to first token",
                f"{a['turn2_ttft_s']:.2f} s ({a['turn2_cache_read_tokens']} of {a['turn2_prompt_tokens']} tokens reused)",
            ),
        ]
    return _table(rows)


def _restart_rows(s: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        (f"agent request ({s['prompt_tokens']} tokens): cold time to first token", f"{s['cold_ttft_s']:.2f} s"),
        (
            "  after a restart (the disk cache)",
            f"{s['after_restart_ttft_s']:.2f} s ({s['after_restart_cached_tokens']} tokens reused)",
        ),
        ("  warm (in memory)", f"{s['warm_ttft_s']:.2f} s ({s['warm_cached_tokens']} tokens reused)"),
        ("  after a restart / cold", f"{s['after_restart_over_cold']:.3f}"),
        (
            "  stop (slots written) / start to ready",
            f"{s['stop_s']:.1f} / {s['start_to_ready_s']:.1f} s ({s['disk_files']} files, {s['disk_bytes'] / 2**20:.1f} MiB on disk)",
        ),
    ]


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
