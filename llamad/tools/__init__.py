"""Tool calling and structured output: planning (plan), the tool-call grammar (grammar),
parsing calls back out of model text (parse)."""

from llamad.tools.plan import ToolChoice, ToolHistoryError, ToolPlan, ToolSchemaError, apply, check_history, new_call_id, plan, tools_prompt

__all__ = ["ToolChoice", "ToolHistoryError", "ToolPlan", "ToolSchemaError", "apply", "check_history", "new_call_id", "plan", "tools_prompt"]
