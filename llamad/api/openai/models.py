"""GET /v1/models and /v1/models/{id}: the served model, in OpenAI's shape with Anthropic's
fields too (both families list models at this path)."""

from __future__ import annotations

import os
import time
from typing import Any

from litestar import Request, Router, get

from llamad.engine import Engine


@get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    # Both families list models at this path: OpenAI's list fields and Anthropic's
    # pagination fields side by side (each SDK ignores the other's).
    card = model_card(request.app.state.engine)
    return {"object": "list", "data": [card], "has_more": False, "first_id": card["id"], "last_id": card["id"]}


@get("/v1/models/{model_id:path}")
async def get_model(request: Request) -> dict[str, Any]:
    # Clients ask for names of their own (also "org/model"); there is one model, so every
    # name resolves to it.
    return model_card(request.app.state.engine)


def model_card(engine: Engine) -> dict[str, Any]:
    """The served model in OpenAI's shape, with Anthropic's fields too. `created` is the
    GGUF file's modification time."""
    try:
        created = int(os.stat(str(engine.info.get("path", ""))).st_mtime)
    except OSError:
        created = 0
    return {
        "id": engine.model_id,
        "object": "model",
        "created": created,
        "owned_by": "llamad",
        "type": "model",
        "display_name": engine.model_id,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created)),
    }


router = Router(path="/", route_handlers=[list_models, get_model])
