"""The tool-call formats of the model families (see llamad.engine.tool_formats, where the
engine detects its model's format at load; re-exported here for the request path and
`llamad check`): `detect(template_text, special_tokens) -> ToolFormat` with `.name`,
`.trigger` and `.reasoning`."""

from llamad.engine.tool_formats import (
    FORMATS,
    HARMONY_REASONING,
    HERMES,
    MARKERS,
    MISTRAL_REASONING,
    THINK_REASONING,
    ToolFormat,
    by_name,
    detect,
    shown_markers,
    special_markers,
)

__all__ = [
    "FORMATS", "HARMONY_REASONING", "HERMES", "MARKERS", "MISTRAL_REASONING", "THINK_REASONING", "ToolFormat", "by_name", "detect",
    "shown_markers", "special_markers",
]
